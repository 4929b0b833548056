"""The memory bank: built per branch into preallocated tensors, equal bit for bit to the former build
(both branches per batch, concatenated, then `scoring.normalize_bank`)."""
from __future__ import annotations

import pytest
import torch

from CLIP import create_model
from dataset.tensors import TensorSet
from mvfa.method import scoring
from mvfa.method.evaluation import evaluate
from mvfa.method.memory_bank import MemoryBank, bank_branch, build_memory_bank
from mvfa.method.model import AdaptedViT
from mvfa.method.prefix import adapted_tokens, compute_prefixes
from mvfa.method.scorer import FewShotScorer
from mvfa.runtime.errors import MVFAError
from tests import clip_helpers
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from clip_helpers.one_torch_thread()


@pytest.fixture(scope="module")
def model() -> AdaptedViT:
    torch.manual_seed(0)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [2, 4, 6]).eval()
    for parameter in model.adapter_parameters():  # adapters that change the tokens (not the init)
        parameter.data.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(7, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def former_bank(model: AdaptedViT, images: torch.Tensor, batch_size: int, cache=None) -> MemoryBank:
    """The build before preallocation: both branches per batch, torch.cat, then scoring.normalize_bank."""
    seg, det = [], []
    for index, start in enumerate(range(0, images.shape[0], batch_size)):
        prefix = cache.batch(index) if cache is not None else None
        tokens = adapted_tokens(model, None if prefix is not None else images[start : start + batch_size], prefix)
        seg.append([t.float().flatten(0, 1) for t in tokens.seg])
        det.append([t.float().flatten(0, 1) for t in tokens.det])
    return MemoryBank(
        [scoring.normalize_bank(torch.cat(stage)) for stage in zip(*seg)],
        [scoring.normalize_bank(torch.cat(stage)) for stage in zip(*det)],
    )


def assert_stages_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32 and a.shape == b.shape and a.is_contiguous()
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_each_branch_equals_the_full_build_and_the_former_build(model, images, batch_size):
    full = build_memory_bank(model, images, batch_size)
    former = former_bank(model, images, batch_size)
    assert_stages_equal(full.seg, former.seg)
    assert_stages_equal(full.det, former.det)
    seg = build_memory_bank(model, images, batch_size, branches=("seg",))
    det = build_memory_bank(model, images, batch_size, branches=("det",))
    assert seg.det is None and det.seg is None
    assert_stages_equal(seg.seg, full.seg)
    assert_stages_equal(det.det, full.det)
    rows = images.shape[0] * (model.grid_size**2 + 1)
    assert [t.shape for t in seg.seg] == [(rows, model.visual.proj.shape[1])] * len(model.stages)


def test_bank_from_cached_prefixes_equals_the_bank_from_images(model, images):
    batches = (images[i : i + 3] for i in range(0, images.shape[0], 3))
    cache = compute_prefixes(model, batches, batch_size=3)
    cached = build_memory_bank(model, images, 3, cache=cache, branches=("det",))
    assert_stages_equal(cached.det, former_bank(model, images, 3, cache=cache).det)
    assert_stages_equal(cached.det, build_memory_bank(model, images, 3).det)


def test_in_place_normalisation_is_normalize_bank_bit_for_bit():
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(1000, 48, generator=generator) * torch.rand(1000, 1, generator=generator) * 10
    bank[3] = 0.0  # a zero row: the eps clamp, as F.normalize
    bank[4] = 1e-30
    expected = scoring.normalize_bank(bank)
    assert torch.equal(scoring.normalize_bank_(bank.clone()), expected)


@pytest.mark.parametrize("has_masks", [True, False])
def test_scores_with_the_one_branch_bank_equal_the_full_bank(model, images, has_masks):
    data = TensorSet(
        (torch.rand(5, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8),
        torch.zeros(5, TINY_SIZE, TINY_SIZE, dtype=torch.bool), torch.tensor([0, 1, 0, 1, 1]), [f"{i}.png" for i in range(5)],
    )
    text = torch.nn.functional.normalize(torch.randn(64, 2, generator=torch.Generator().manual_seed(4)), dim=0)
    full = evaluate(model, FewShotScorer(text, has_masks, build_memory_bank(model, images, 3)), data, batch_size=2,
                    metrics=False)
    one = build_memory_bank(model, images, 3, branches=(bank_branch(has_masks),))
    alone = evaluate(model, FewShotScorer(text, has_masks, one), data, batch_size=2, metrics=False)
    assert (full.image_scores == alone.image_scores).all()
    if has_masks:
        assert torch.equal(full.maps, alone.maps)
    other = build_memory_bank(model, images, 3, branches=(bank_branch(not has_masks),))
    with pytest.raises(MVFAError, match=f"holds no {bank_branch(has_masks)} tokens"):
        evaluate(model, FewShotScorer(text, has_masks, other), data, batch_size=2, metrics=False)


def test_refresh_keeps_the_bank_of_equal_adapters_and_rebuilds_after_any_change(images):
    """A scorer rebuilds its bank only when the model or its adapter values changed since the last build,
    whatever changed them (an optimiser step, a loaded state, or a write through .data)."""
    torch.manual_seed(0)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [2, 4, 6]).eval()
    text = torch.nn.functional.normalize(torch.randn(64, 2, generator=torch.Generator().manual_seed(4)), dim=0)
    scorer = FewShotScorer(text, True, support_images=images, batch_size=3)
    scorer.refresh(model)
    first = scorer.bank
    scorer.refresh(model)
    assert scorer.bank is first  # the same adapters: kept
    saved = model.adapter_state()
    with torch.no_grad():
        next(iter(model.adapter_parameters())).data.add_(0.01)  # through .data: no version bump
    scorer.refresh(model)
    assert scorer.bank is not first
    assert not torch.equal(scorer.bank.stages("seg")[0], first.stages("seg")[0])
    model.load_adapter_state(saved)
    scorer.refresh(model)  # back to the first adapters: rebuilt, equal to the first build bit for bit
    assert_stages_equal(scorer.bank.stages("seg"), first.stages("seg"))
    sibling = model.sibling()
    sibling.load_adapter_state(saved)
    kept = scorer.bank
    scorer.refresh(sibling)  # another model: rebuilt
    assert scorer.bank is not kept


def test_unknown_branch_is_refused(model, images):
    with pytest.raises(ValueError, match="memory bank branches"):
        build_memory_bank(model, images, 3, branches=("cls",))
    with pytest.raises(ValueError, match="memory bank branches"):
        build_memory_bank(model, images, 3, branches=())


def test_the_model_states_its_widths(model):
    """Callers ask the adapted ViT for its token width and text-space width instead of reading the backbone's layers."""
    from CLIP.config import load_config

    config = load_config(TINY_MODEL)
    assert (model.width, model.embed_dim) == (config.vision.width, config.embed_dim)
    assert model.seg_adapters[0].fc1[0].weight.shape == (model.embed_dim, model.width)
