"""AdaptedViT.float_with_block_workspace: frozen blocks stored in fp16, computed in fp32 through one
workspace block. fp16 -> fp32 is exact, so the tokens must equal those of the model converted with
.float(), bit for bit, with and without autograd."""
from __future__ import annotations

import pytest
import torch

from CLIP import create_model
from mvfa.method.model import AdaptedViT
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

STAGES = [int(s) for s in TINY_STAGES]


def _pair() -> tuple[AdaptedViT, AdaptedViT]:
    """The same tiny model twice: blocks kept in fp16 with the workspace, and converted with .float()."""
    torch.manual_seed(0)
    clip_model = create_model(TINY_MODEL, TINY_SIZE)
    fp16_weights = {k: v.half() for k, v in clip_model.state_dict().items()}
    torch.manual_seed(1)
    stored = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), STAGES)
    stored.visual.load_state_dict({k[len("visual."):]: v for k, v in fp16_weights.items() if k.startswith("visual.")})
    stored.visual.half()
    torch.manual_seed(1)
    plain = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), STAGES)
    plain.visual.load_state_dict({k[len("visual."):]: v.float() for k, v in fp16_weights.items() if k.startswith("visual.")})
    plain.load_adapter_state(stored.adapter_state())
    stored.float_with_block_workspace()
    return stored, plain


def test_blocks_stay_fp16_and_the_rest_becomes_fp32():
    stored, plain = _pair()
    blocks = stored.visual.transformer.resblocks
    assert {p.dtype for p in blocks.parameters()} == {torch.float16}
    others = [p for name, p in stored.named_parameters() if not name.startswith("visual.transformer.")]
    assert others and {p.dtype for p in others} == {torch.float32}
    # the workspace is not part of the model: same parameters and state_dict keys as the plain model
    assert list(stored.state_dict()) == list(plain.state_dict())
    assert len(list(stored.parameters())) == len(list(plain.parameters()))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_equals_the_fp32_model_bit_for_bit(mode):
    stored, plain = _pair()
    images = torch.rand(3, 3, TINY_SIZE, TINY_SIZE)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        ours, reference = stored(images), plain(images)
        prefix = stored.encode_prefix(images)
        assert torch.equal(prefix, plain.encode_prefix(images))
    for a, b in zip([*ours.seg, *ours.det], [*reference.seg, *reference.det]):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_with_autograd_tokens_and_gradients_equal_the_fp32_model():
    """A training-style call (autograd recording): each block gets its own fp32 weights, so the
    backward pass reads the right ones; adapter gradients equal the plain model's."""
    stored, plain = _pair()
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    losses = []
    for model in (stored, plain):
        tokens = model(images)
        loss = sum(t.square().mean() for t in [*tokens.seg, *tokens.det])
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(*losses)
    graded = 0
    for a, b in zip(stored.adapter_parameters(), plain.adapter_parameters()):
        assert (a.grad is None) == (b.grad is None)  # the last stage's fc2 feeds no token: no gradient
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
            graded += 1
    assert graded >= 2 * len(STAGES)
    assert all(p.grad is None for p in stored.visual.parameters())


def test_fp32_blocks_need_no_workspace():
    torch.manual_seed(0)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), STAGES)
    model.float_with_block_workspace()
    assert model._block_workspace is None


def test_blocks_of_another_shape_are_refused():
    """One workspace serves every block: a block of another shape (here a narrower MLP) is an error."""
    from CLIP.model import ResidualAttentionBlock

    torch.manual_seed(0)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), STAGES)
    width = model.visual.conv1.out_channels
    model.visual.transformer.resblocks[1] = ResidualAttentionBlock(width, 2, 2.0, False)
    model.visual.half()
    with pytest.raises(ValueError, match="blocks of one shape"):
        model.float_with_block_workspace()
