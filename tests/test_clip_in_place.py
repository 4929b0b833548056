"""The inference form of a transformer block (in-place sums, in-place activation) against the plain
form autograd uses: the same outputs within fp32 rounding, the input never written, and the plain
form wherever autograd or autocast is on."""
from __future__ import annotations

import pytest
import torch

import clip_helpers as helpers
from CLIP import create_model, tokenize
from CLIP.model import QuickGELU, ResidualAttentionBlock, activate_in_place, can_write_in_place
from mvfa.model import AdaptedViT

WIDTH, HEADS = 64, 4
ROUNDING = 1e-6  # relative: the in-place form sums in another order


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from helpers.one_torch_thread()


def _block(quick_gelu: bool) -> ResidualAttentionBlock:
    torch.manual_seed(0)
    block = ResidualAttentionBlock(WIDTH, HEADS, mlp_ratio=4.0, quick_gelu=quick_gelu)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.1)
    return block


def _plain(block: ResidualAttentionBlock, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The block's definition, written out: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    x = x + block.attn(block.ln_1(x), causal=causal)
    return x + block.mlp(block.ln_2(x))


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_in_place_block_equals_the_plain_block(quick_gelu, causal):
    block = _block(quick_gelu)
    x = torch.randn(3, 11, WIDTH)
    before = x.clone()
    with torch.no_grad():
        assert can_write_in_place(x, block.attn.in_proj_weight)
        ours = block(x, causal=causal)
        expected = _plain(block, x, causal)
    assert torch.equal(x, before)  # the input is never written
    assert helpers.relative_error(ours, expected) < ROUNDING
    with torch.enable_grad():  # under autograd the block is the plain form, gradients included
        assert torch.equal(block(x, causal=causal), _plain(block, x, causal))


def test_activation_in_place_gives_the_same_values():
    x = torch.linspace(-6, 6, 1001)
    assert torch.equal(activate_in_place(torch.nn.GELU(), x.clone()), torch.nn.GELU()(x))
    assert torch.equal(activate_in_place(torch.nn.GELU(approximate="tanh"), x.clone()), torch.nn.GELU("tanh")(x))
    assert torch.equal(activate_in_place(QuickGELU(), x.clone()), QuickGELU()(x))
    with pytest.raises(TypeError):
        activate_in_place(torch.nn.ReLU(), x)


def test_the_plain_form_runs_under_autograd_and_autocast():
    block = _block(quick_gelu=False)
    weight = block.attn.in_proj_weight
    x = torch.randn(2, 5, WIDTH)
    assert not can_write_in_place(x, weight)  # grad mode is on here
    with torch.no_grad():
        assert can_write_in_place(x, weight)
        assert not can_write_in_place(x.double(), weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not can_write_in_place(x, weight)
            ours = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = _plain(block, x, False)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)
    loss = block(x.requires_grad_()).square().sum()
    loss.backward()
    assert x.grad is not None and block.mlp.c_fc.weight.grad is not None


def test_whole_towers_and_a_cached_prefix():
    """ViT-Tiny-14: image and text features, and the adapters' tokens from a cached prefix, against the
    plain form (forced by running under autograd); the prefix is left as it was."""
    torch.manual_seed(0)
    clip_model = create_model("ViT-Tiny-14", 56)
    model = AdaptedViT(clip_model, [2, 4, 6, 8]).eval()
    images = helpers.sample_images(56)
    tokens = tokenize(helpers.PROMPTS)
    with torch.no_grad():
        image, text = clip_model.encode_image(images), clip_model.encode_text(tokens)
        prefix = model.encode_prefix(images)
        kept = prefix.clone()
        stages = model.forward_from_prefix(prefix)
    assert torch.equal(prefix, kept)
    assert helpers.relative_error(image, clip_model.encode_image(images).detach()) < ROUNDING
    assert helpers.relative_error(text, clip_model.encode_text(tokens).detach()) < ROUNDING
    plain = model.forward_from_prefix(prefix)
    for ours, expected in zip(stages.seg + stages.det, plain.seg + plain.det, strict=True):
        assert helpers.relative_error(ours, expected.detach()) < ROUNDING
