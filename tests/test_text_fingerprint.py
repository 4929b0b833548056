"""The text-cache fingerprint: hashed from the tensors' own buffers, with the value the former
`.numpy().tobytes()` form gave (so existing on-disk text caches stay valid)."""
from __future__ import annotations

import hashlib
import json

import torch

from CLIP import create_model
from mvfa.method.text import text_tower_fingerprint

# text_tower_fingerprint of the model below, computed with the former form (tobytes copies) at commit 7ee9729.
EXPECTED_FP32 = "666aa7745a19b96ab5d6bbf12eaf95f8ef52ff52f11d320f06a7cb9886d1c2cb"
EXPECTED_FP16 = "43b45d7b3c24f6129d2430268512b2a0a0ec9c201810809b61af683aaf85d47e"


def exact_model():
    """ViT-Tiny-14 with weights exactly representable and independent of the random generator."""
    model = create_model("ViT-Tiny-14", 56)
    with torch.no_grad():
        for i, (_, parameter) in enumerate(model.named_parameters()):
            values = (torch.arange(parameter.numel()) % 251 - 125).float() / 64 * (i + 1)
            parameter.copy_(values.reshape(parameter.shape))
    return model


def former_fingerprint(clip_model) -> str:
    """The former implementation: a bytes copy of every tensor."""
    digest = hashlib.sha256(json.dumps({"quick_gelu": clip_model.config.quick_gelu}).encode())
    for name, tensor in clip_model.state_dict().items():
        if name.startswith("visual."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_fingerprint_value_is_unchanged():
    model = exact_model()
    assert text_tower_fingerprint(model) == EXPECTED_FP32 == former_fingerprint(model)
    model.half()  # converted tensor by tensor: the same bytes as before
    assert text_tower_fingerprint(model) == EXPECTED_FP16 == former_fingerprint(model)


def test_fingerprint_of_random_and_non_contiguous_weights_matches_the_former_form():
    torch.manual_seed(3)
    model = create_model("ViT-Tiny-14", 56)
    assert text_tower_fingerprint(model) == former_fingerprint(model)
    with torch.no_grad():  # a transposed (non-contiguous) text projection
        model.text_projection = torch.nn.Parameter(model.text_projection.detach().t().contiguous().t())
    assert not model.text_projection.is_contiguous()
    assert text_tower_fingerprint(model) == former_fingerprint(model)


def test_fingerprint_ignores_the_visual_tower_and_sees_each_text_weight():
    model = exact_model()
    with torch.no_grad():
        model.visual.proj.add_(1.0)
    assert text_tower_fingerprint(model) == EXPECTED_FP32
    with torch.no_grad():
        model.ln_final.bias[0] += 2**-10
    assert text_tower_fingerprint(model) != EXPECTED_FP32


def test_fingerprint_copies_no_weight():
    """Hashing reads fp32 contiguous tensors in place: no allocation of a tensor's size."""
    import tracemalloc

    model = exact_model()
    largest = max(t.numel() * 4 for n, t in model.state_dict().items() if not n.startswith("visual."))
    tracemalloc.start()
    text_tower_fingerprint(model)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < largest / 2, (peak, largest)
