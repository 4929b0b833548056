"""--scoring_dtypes: with the release's dtypes the scoring runs inside the forward's autocast (on CUDA:
fp16 patch-text products, bank similarities and upsampling), otherwise in fp32 after it.

There is no CUDA here: the wiring is shown with CPU bf16 autocast standing in for CUDA fp16 (the
function that builds the autocast context is patched), which rounds visibly; on a GPU
scripts/gpu_golden.py compares both settings with the release's golden values.
"""
from __future__ import annotations

import torch

from CLIP import create_model
from dataset.tensors import TensorSet
from mvfa.method import evaluation
from mvfa.method import scorer
from mvfa.method import scoring
from mvfa.method.evaluation import evaluate
from mvfa.method.memory_bank import build_memory_bank
from mvfa.method.model import AdaptedViT
from mvfa.method.scorer import FewShotScorer
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE


def cpu_autocast(device, precision):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision != "fp32" else torch.autocast("cpu", enabled=False)


def tiny_setup():
    torch.manual_seed(0)
    model = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [2, 4, 6]).eval()
    images = (torch.rand(6, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    masks = torch.zeros(6, TINY_SIZE, TINY_SIZE, dtype=torch.bool)
    masks[3:, 10:20, 10:20] = True
    data = TensorSet(images, masks, torch.tensor([0, 0, 0, 1, 1, 1]), [f"{i}.png" for i in range(6)])
    text = torch.nn.functional.normalize(torch.randn(model.visual.proj.shape[1], 2), dim=0)
    return model, data, text


def test_bank_similarity_keeps_the_autocast_dtype():
    queries, bank = torch.randn(5, 8), scoring.normalize_bank(torch.randn(9, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert scoring.max_cosine_to_bank(queries, bank, normalized=True).dtype == torch.bfloat16
    plain = scoring.max_cosine_to_bank(queries, bank, normalized=True, max_elements=10)  # chunked: the same maxima
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, scoring.max_cosine_to_bank(queries, bank, normalized=True), rtol=0, atol=1e-6)


def test_release_dtypes_score_inside_the_autocast(monkeypatch):
    model, data, text = tiny_setup()
    monkeypatch.setattr(evaluation, "autocast_for", cpu_autocast)  # the forward's autocast
    monkeypatch.setattr(scorer, "autocast_for", cpu_autocast)  # the scoring's, with the release's dtypes
    bank = build_memory_bank(model, data.images[:3].float() / 255, 4, "fp32")

    def evaluate_with(release_dtypes: bool, precision: str):
        return evaluate(model, FewShotScorer(text, True, bank, release_dtypes=release_dtypes), data, batch_size=4,
                        precision=precision)

    results = {flag: evaluate_with(flag, "bf16") for flag in (True, False)}
    # the same autocast forward; only where the scoring runs differs
    assert not torch.equal(torch.as_tensor(results[True].image_scores), torch.as_tensor(results[False].image_scores))
    fp32 = evaluate_with(True, "fp32")
    assert torch.equal(torch.as_tensor(fp32.image_scores), torch.as_tensor(evaluate_with(False, "fp32").image_scores))
