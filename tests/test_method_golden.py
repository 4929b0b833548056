"""Parity with the authors' release on ../shared/golden/tiny (random weights, CPU, fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CLIP import create_model
from dataset.medical import load_image, load_mask, open_dataset, select_support
from mvfa.method.augment import augment
from mvfa.method.model import AdaptedViT, read_checkpoint
from mvfa.method.prompts import REAL_NAME
from mvfa.method.text import encode_prompt_ensemble
from mvfa.runs.training import make_optimizers, train_step

STAGES = [2, 4, 6, 8]
IMG_SIZE = 84


@pytest.fixture(scope="module")
def golden(golden_dir):
    extras = np.load(golden_dir / "golden_extras.npz")
    clip_model = create_model(golden_dir / "config.json", IMG_SIZE, pretrained=golden_dir / "clip_jit.pt")
    return golden_dir, extras, clip_model


def adapted(golden_dir, clip_model, mode: str, obj: str) -> AdaptedViT:
    model = AdaptedViT(clip_model, STAGES)
    model.load_adapter_state(read_checkpoint(golden_dir / "ckpt" / mode / f"{obj}.pth"))
    return model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


@pytest.mark.parametrize("obj", sorted(REAL_NAME))
def test_text_features_match_release(golden, obj):
    golden_dir, extras, clip_model = golden
    ours = encode_prompt_ensemble(clip_model, REAL_NAME[obj])
    reference = torch.from_numpy(extras[f"text_{obj}"])
    assert ours.shape == reference.shape == (64, 2)
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=0)
    assert cosine.min() > 0.99999


def augmented_abnormal_support(golden_dir, obj: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The object's 4-shot abnormal support (seed file line 0), augmented 11x."""
    dataset = open_dataset(golden_dir / "data", obj)
    support = select_support(dataset, 4, 0, 111, [golden_dir / "fewshot_seed"])
    abnormal = torch.stack([load_image(s.path, IMG_SIZE) for s in support.abnormal])
    if not dataset.has_masks:
        return augment(abnormal)
    return augment(abnormal, torch.stack([load_mask(s.mask_path, IMG_SIZE) for s in support.abnormal]))


def test_augmentation_matches_release(golden):
    golden_dir, extras, _ = golden
    brain = open_dataset(golden_dir / "data", "Brain")
    support = select_support(brain, 4, 0, 111, [golden_dir / "fewshot_seed"])
    normal = torch.stack([load_image(s.path, IMG_SIZE) for s in support.normal])
    aug_abnormal, aug_masks = augmented_abnormal_support(golden_dir, "Brain")
    aug_normal, normal_masks = augment(normal)
    assert (aug_abnormal - torch.from_numpy(extras["aug_abnormal_img"])).abs().max() < 1e-5
    assert (aug_masks - torch.from_numpy(extras["aug_abnormal_mask"])).abs().max() < 1e-5
    assert (aug_normal - torch.from_numpy(extras["aug_normal_img"])).abs().max() < 1e-5
    assert aug_normal.shape == (44, 3, IMG_SIZE, IMG_SIZE) and not normal_masks.any()


def test_stage_tokens_match_release(golden):
    golden_dir, extras, clip_model = golden
    model = adapted(golden_dir, clip_model, "few-shot", "Brain")
    with torch.no_grad():
        tokens = model(torch.from_numpy(extras["tokens_image"])[None])
    for stage in range(len(STAGES)):
        assert relative_error(tokens.seg[stage][0], torch.from_numpy(extras[f"tokens_seg_{stage}"])) < 1e-4
        assert relative_error(tokens.det[stage][0], torch.from_numpy(extras[f"tokens_det_{stage}"])) < 1e-4


@pytest.mark.parametrize("obj, has_masks", [("Brain", True), ("Histopathology", False)])
def test_training_step_matches_release(golden, obj, has_masks):
    golden_dir, extras, clip_model = golden
    model = adapted(golden_dir, clip_model, "few-shot", obj)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = encode_prompt_ensemble(clip_model, REAL_NAME[obj])
    # The release's step used the object's own first augmented abnormal support image (label 1).
    images, masks = augmented_abnormal_support(golden_dir, obj)
    image, mask = images[:1], masks[:1]
    optimizers = make_optimizers(model, 1e-3)
    parts = train_step(model, optimizers, image, mask, torch.ones(1), text, torch.tensor([has_masks]))

    assert abs(parts.total.item() - float(extras[f"step_{obj}_loss"])) <= 1e-4 * abs(float(extras[f"step_{obj}_loss"]))
    assert abs(parts.det.item() - float(extras[f"step_{obj}_det_loss"])) <= 1e-4 * abs(float(extras[f"step_{obj}_det_loss"]))
    if has_masks:
        assert abs(parts.seg.item() - float(extras["step_Brain_seg_loss"])) <= 1e-4 * float(extras["step_Brain_seg_loss"])

    for group in ("seg_adapters", "det_adapters"):
        module = getattr(model, group)
        for key, param in module.named_parameters():
            reference_grad = torch.from_numpy(extras[f"grad_{obj}_{group}.{key}"])
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            reference_step = torch.from_numpy(extras[f"step_{obj}_{group}.{key}"])
            if reference_grad.norm() == 0:  # e.g. the last stage's fc2: nothing after it reaches the loss
                assert grad.norm() == 0, f"{group}.{key} should get no gradient"
                assert torch.equal(param.detach(), reference_step), f"{group}.{key} should not move"
                continue
            assert relative_error(grad, reference_grad) < 1e-4, f"{group}.{key}"
            clear = reference_grad.abs() > 1e-6 * reference_grad.abs().max()
            assert (param.detach() - reference_step)[clear].abs().max() < 1e-5, f"{group}.{key}"
            if group == "seg_adapters" and not has_masks:  # only det steps without masks
                assert torch.equal(param.detach(), before[f"{group}.{key}"])

    # Only adapter weights changed; the CLIP backbone is untouched.
    after = model.state_dict()
    for key, value in before.items():
        if "adapters" not in key:
            assert torch.equal(after[key], value), key
