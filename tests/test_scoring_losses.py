"""Scoring, losses and adapters on small hand-made inputs with known answers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from CLIP import create_model
from loss import BinaryDiceLoss, FocalLoss
from mvfa.method import scoring
from mvfa.method import text
from mvfa.method.losses import det_loss
from mvfa.method.model import ADAPTER_MIX, STREAM_KEEP, AdaptedViT, read_checkpoint, save_checkpoint
from mvfa.runs.training import make_optimizers, train_step
from mvfa.runtime.errors import CheckpointFormatError
from utils import augment, cos_sim

TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # 2-d "text space": normal = e0, abnormal = e1


def test_patch_abnormality_is_the_softmax_of_scaled_cosines():
    tokens = torch.tensor([[[3.0, 0.0], [0.0, 0.5], [1.0, 1.0]]])  # normal, abnormal, halfway
    prob = scoring.patch_abnormality(tokens, TEXT)
    expected_normal = 1 / (1 + math.exp(100))
    assert prob[0, 0].item() == pytest.approx(expected_normal, abs=1e-30)
    assert prob[0, 1].item() == pytest.approx(1.0)
    assert prob[0, 2].item() == pytest.approx(0.5)


def test_zero_shot_image_score_sums_stage_means():
    normal, abnormal = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    stage_a = torch.stack([normal, abnormal, abnormal, abnormal])[None]  # mean 0.75
    stage_b = torch.stack([normal, normal, normal, abnormal])[None]  # mean 0.25
    assert scoring.zero_shot_image_score([stage_a, stage_b], TEXT).item() == pytest.approx(1.0, abs=1e-6)


def test_zero_shot_map_upsamples_logits_then_softmax():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])  # 2 x 2 grid
    size = 5
    result = scoring.zero_shot_map([tokens], TEXT, size)
    logits = 100 * F.normalize(tokens, dim=-1) @ TEXT
    grid = logits.transpose(1, 2).reshape(1, 2, 2, 2)
    expected = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True).softmax(dim=1)[:, 1]
    torch.testing.assert_close(result, expected)
    assert result[0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)  # corners keep grid values
    assert result[0, 0, -1].item() == pytest.approx(1.0, abs=1e-6)
    assert result[0, 2, 2].item() == pytest.approx(0.5, abs=1e-6)  # centre: logits tie


def test_memory_map_is_one_minus_best_cosine_and_chunking_does_not_change_it():
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    grids = scoring.memory_distance_grids([tokens], [bank])
    expected = torch.tensor([0.0, 0.0, 1 - 1 / math.sqrt(2), 1.0]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(grids[0], expected)
    big_bank = torch.randn(1000, 8)
    queries = torch.randn(37, 8)
    reference = cos_sim(queries, big_bank).amax(dim=1)
    torch.testing.assert_close(scoring.max_cosine_to_bank(queries, big_bank, max_elements=37 * 7), reference)


def test_a_bank_normalised_once_gives_the_same_maps_bit_for_bit():
    generator = torch.Generator().manual_seed(3)
    banks = [3 * torch.randn(500, 8, generator=generator) for _ in range(2)]
    tokens = [torch.randn(2, 9, 8, generator=generator) for _ in range(2)]
    unit = [scoring.normalize_bank(bank) for bank in banks]
    assert all(torch.allclose(bank.norm(dim=-1), torch.ones(500)) for bank in unit)
    for chunk in (1 << 24, 7 * 18):
        plain = scoring.max_cosine_to_bank(tokens[0].flatten(0, 1), banks[0], chunk)
        assert torch.equal(scoring.max_cosine_to_bank(tokens[0].flatten(0, 1), unit[0], chunk, normalized=True), plain)
        expected = scoring.few_shot_map(tokens, banks, 24, chunk)
        assert torch.equal(scoring.few_shot_map(tokens, unit, 24, chunk, normalized=True), expected)
        grids = scoring.memory_distance_grids(tokens, unit, chunk, normalized=True)
        assert all(torch.equal(a, b) for a, b in zip(grids, scoring.memory_distance_grids(tokens, banks, chunk)))


def test_fuse_min_max_normalises_each_branch():
    fused = scoring.fuse(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([10.0, 10.0, 20.0]))
    torch.testing.assert_close(fused, torch.tensor([0.0, 0.25, 1.0]))
    assert torch.equal(scoring.min_max(torch.ones(3)), torch.zeros(3))


def test_focal_loss_known_values():
    p_abnormal = torch.tensor([0.9, 0.2]).reshape(1, 1, 1, 2)
    probabilities = torch.cat([1 - p_abnormal, p_abnormal], dim=1)
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    smooth = 1e-5
    losses = []
    for p_true in (0.9, 0.8):  # probability of the true class
        pt = (1 - smooth) * p_true + smooth * (1 - p_true) + smooth
        losses.append(-((1 - pt) ** 2) * math.log(pt))
    assert FocalLoss()(probabilities, target).item() == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_dice_loss_known_values():
    probabilities = torch.tensor([[[0.5, 0.5], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    first = 1 - (2 * 0.5 + 1) / (1.0 + 1 + 1)
    second = 1 - (2 * 1 + 1) / (1 + 1 + 1)
    assert BinaryDiceLoss()(probabilities, target).item() == pytest.approx((first + second) / 2)


def test_per_image_losses_average_to_the_batch_losses():
    """What the losses of runs trained together (training.group_losses) take per image."""
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(3, 2, 4, 4, generator=generator).softmax(dim=1)
    target = (torch.rand(3, 1, 4, 4, generator=generator) > 0.5).float()
    focal, dice = FocalLoss(), BinaryDiceLoss()
    assert focal.per_image(probabilities, target).shape == (3,)
    torch.testing.assert_close(focal.per_image(probabilities, target).mean(), focal(probabilities, target))
    torch.testing.assert_close(focal.per_image(probabilities[1:2], target[1:2])[0], focal(probabilities[1:2], target[1:2]))
    torch.testing.assert_close(dice.per_image(probabilities[:, 1], target).mean(), dice(probabilities[:, 1], target))
    scores, labels = torch.tensor([0.7, 0.2]), torch.tensor([1.0, 0.0])
    for form in ("release", "bce"):
        torch.testing.assert_close(det_loss(scores, labels, form, reduction="none").mean(), det_loss(scores, labels, form))


def test_det_loss_forms():
    probability, label = torch.tensor([0.7]), torch.tensor([1.0])
    assert det_loss(probability, label).item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.7))))
    assert det_loss(probability, label, "bce").item() == pytest.approx(-math.log(0.7))
    with pytest.raises(ValueError, match="release, bce"):
        det_loss(probability, label, "hinge")


def test_augment_order_and_shapes():
    images = torch.rand(2, 3, 8, 8)
    out, masks = augment(images)
    assert out.shape == (22, 3, 8, 8) and masks.shape == (22, 1, 8, 8) and not masks.any()
    torch.testing.assert_close(out[:2], images)
    torch.testing.assert_close(out[18:20], images.flip(-1))  # horizontal flip, grouped by transform
    torch.testing.assert_close(out[20:22], images.flip(-2))


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return create_model("ViT-Tiny-14", 56)


def test_adapters_for_any_backbone_and_stream_update(tiny_clip):
    model = AdaptedViT(tiny_clip, [2, 5, 8])
    assert len(model.seg_adapters) == 3
    assert model.seg_adapters[0].fc1[0].weight.shape == (64, 128)  # embed x width of this config
    images = torch.rand(3, 3, 56, 56)
    tokens = model(images)
    assert [t.shape for t in tokens.seg] == [(3, 17, 64)] * 3
    # Stage 2 by hand: 0.8 x + 0.1 seg_out + 0.1 det_out.
    x = model.encode_prefix(images)
    seg_mid, seg_out = model.seg_adapters[0](x)
    det_mid, det_out = model.det_adapters[0](x)
    torch.testing.assert_close(tokens.seg[0], seg_mid)
    x = STREAM_KEEP * x + ADAPTER_MIX * seg_out + ADAPTER_MIX * det_out
    for block in tiny_clip.visual.transformer.resblocks[2:5]:
        x = block(x)
    torch.testing.assert_close(tokens.det[1], model.det_adapters[1](x)[0])
    # Batched equals one by one.
    single = model(images[1:2])
    torch.testing.assert_close(single.seg[2][0], tokens.seg[2][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="between 1 and 8"):
        AdaptedViT(tiny_clip, [6, 12, 18, 24])


def test_training_step_changes_adapters_only(tiny_clip):
    model = AdaptedViT(tiny_clip, [2, 4, 6, 8])
    assert all(not p.requires_grad for p in model.visual.parameters())
    assert model.encode_prefix(torch.rand(1, 3, 56, 56)).grad_fn is None  # no graph before stage 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = F.normalize(torch.randn(64, 2), dim=0)
    masks = torch.zeros(2, 1, 56, 56)
    masks[0, :, 10:30, 10:30] = 1
    train_step(model, make_optimizers(model, 1e-3), torch.rand(2, 3, 56, 56), masks, torch.tensor([1.0, 0.0]), text,
               torch.tensor([True, True]))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("adapters" in k for k in changed)
    assert any(k.startswith("seg_adapters") for k in changed) and any(k.startswith("det_adapters") for k in changed)


def test_checkpoint_round_trip_and_errors(tiny_clip, tmp_path):
    model = AdaptedViT(tiny_clip, [2, 4, 6, 8])
    path = tmp_path / "sub" / "adapters.pth"
    save_checkpoint(model.adapter_state(), path)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    state = read_checkpoint(path)
    assert set(state) == {"seg_adapters", "det_adapters"} and "0.fc1.0.weight" in state["seg_adapters"]
    other = AdaptedViT(tiny_clip, [2, 4, 6, 8])
    other.load_adapter_state(state)
    torch.testing.assert_close(other.seg_adapters[3].fc2[0].weight, model.seg_adapters[3].fc2[0].weight)
    with pytest.raises(CheckpointFormatError, match="missing"):
        AdaptedViT(tiny_clip, [2, 4, 6, 7, 8]).load_adapter_state(state)
    with pytest.raises(CheckpointFormatError, match="unexpected"):
        AdaptedViT(tiny_clip, [2, 4, 6]).load_adapter_state(state)
    wide = {g: {k: torch.zeros(v.shape[0] * 2, *v.shape[1:]) for k, v in s.items()} for g, s in state.items()}
    with pytest.raises(CheckpointFormatError, match="has shape"):
        other.load_adapter_state(wide)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="junk.pth is not a readable"):
        read_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(CheckpointFormatError, match="not found"):
        read_checkpoint(tmp_path / "absent.pth")


def test_text_features_are_cached_on_disk_by_weights_and_prompts(tiny_clip, tmp_path, monkeypatch):
    from mvfa.method import text

    bank = text.TextFeatureBank(tiny_clip, tmp_path)
    first = bank("Brain")
    files = list((tmp_path / "text").glob("*.pt"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(text, "encode_prompt_ensemble", lambda *a, **k: calls.append(a) or torch.zeros(64, 2))
    again = text.TextFeatureBank(tiny_clip, tmp_path)("Brain")
    assert torch.equal(first, again) and not calls  # read from disk, not encoded
    text.TextFeatureBank(tiny_clip, tmp_path)("Liver")
    assert len(calls) == 1 and len(list((tmp_path / "text").glob("*.pt"))) == 2
    other_weights = create_model("ViT-Tiny-14", 56)  # another text tower: another key
    text.TextFeatureBank(other_weights, tmp_path)("Brain")
    assert len(calls) == 2
    files[0].write_bytes(b"garbage")  # a corrupt entry is recomputed
    text.TextFeatureBank(tiny_clip, tmp_path)("Brain")
    assert len(calls) == 3
    text.TextFeatureBank(tiny_clip, None)("Brain")  # no disk cache
    assert len(calls) == 4


def test_constant_maps_normalise_to_zeros_not_nan():
    """Saturated maps (e.g. fp16 probabilities flushed to 0) are constant: min-max must not divide 0 by 0."""
    values = torch.full((2, 3), 4.0)
    assert torch.equal(scoring.min_max(values), torch.zeros(2, 3))
    assert torch.equal(scoring.rescale_(values.clone(), 4.0, 4.0), torch.zeros(2, 3))


def test_atomic_writes_leave_no_temporary_file_and_normal_permissions(tmp_path):
    import os

    from mvfa.runtime.files import atomic_target, write_text_atomic

    write_text_atomic(tmp_path / "a" / "out.txt", "done\n")
    assert (tmp_path / "a" / "out.txt").read_text() == "done\n"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "out.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_target(tmp_path / "a" / "broken.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out.txt"]


def test_text_bank_after_dropping_the_text_tower_keeps_computed_words_only():
    from mvfa.runtime.errors import MVFAError

    torch.manual_seed(0)
    clip_model = create_model("ViT-Tiny-14", 56)
    bank = text.TextFeatureBank(clip_model, None)
    brain = bank("Brain").clone()
    bank.drop_text_tower()
    assert torch.equal(bank("Brain"), brain)
    with pytest.raises(MVFAError, match="Liver"):
        bank("Liver")


def test_prompt_ensemble_in_batches_equals_one_batch_per_state(tiny_clip):
    """Batches of PROMPT_BATCH sentences at the state's context length give the features of one
    batch of all the state's sentences, bit for bit (the release encodes each state at once)."""
    from CLIP.tokenizer import tokenize
    from mvfa.method.prompts import ABNORMAL_STATES, NORMAL_STATES, state_sentences

    with torch.no_grad():
        columns = []
        for states in (NORMAL_STATES, ABNORMAL_STATES):
            tokens = tokenize(state_sentences("Liver", states))
            assert tokens.shape[0] > text.PROMPT_BATCH  # more than one batch
            embeddings = F.normalize(tiny_clip.encode_text(tokens).float(), dim=-1)
            columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    assert torch.equal(text.encode_prompt_ensemble(tiny_clip, "Liver"), torch.stack(columns, dim=1))


def test_encode_text_context_must_cover_the_end_tokens(tiny_clip):
    from CLIP.tokenizer import tokenize

    tokens = tokenize(["a photo of a Brain.", "a photo of the large Brain."])
    used = int(tokens.argmax(dim=-1).max()) + 1
    with torch.no_grad():
        assert torch.equal(tiny_clip.encode_text(tokens, context=used), tiny_clip.encode_text(tokens))
        with pytest.raises(ValueError, match="must cover the end tokens"):
            tiny_clip.encode_text(tokens, context=used - 1)
