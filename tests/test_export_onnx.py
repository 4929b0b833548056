"""mvfa.export_onnx: the adapted visual model's tokens in onnxruntime equal PyTorch's (tiny backbone)."""
from __future__ import annotations

import json
import os
from pathlib import Path
import stat

import numpy as np
import pytest
import torch

from CLIP import create_model
from mvfa import export_onnx
from mvfa.method.model import AdaptedViT, save_checkpoint
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES, write_tiny_clip


def tiny_adapters(tmp_path: Path, meta: bool = True, **extra_meta) -> tuple[Path, Path, AdaptedViT]:
    clip_path = write_tiny_clip(tmp_path / "tiny.pt")
    clip = create_model(TINY_MODEL, TINY_SIZE, pretrained=clip_path)
    torch.manual_seed(1)
    model = AdaptedViT(clip, [int(s) for s in TINY_STAGES]).eval()
    state = model.adapter_state()
    if meta:
        state["meta"] = {"model_name": TINY_MODEL, "img_size": TINY_SIZE, "features_list": [int(s) for s in TINY_STAGES],
                         "object_word": "Brain", "has_masks": True, "quick_gelu": False, **extra_meta}
    save_checkpoint(state, tmp_path / "adapters.pth")
    return tmp_path / "adapters.pth", clip_path, model


def test_onnx_tokens_equal_pytorch(tmp_path, capsys):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    ckpt, clip_path, model = tiny_adapters(tmp_path)
    output = tmp_path / "model.onnx"
    argv = ["--ckpt", str(ckpt), "--output", str(output), "--clip_ckpt", str(clip_path), "--cache_dir", "none", "--check"]
    assert export_onnx.main(argv) == 0
    assert "check: onnxruntime tokens differ" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch axis is dynamic
        images = torch.rand(batch, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(batch))
        seg, det = session.run(["seg_tokens", "det_tokens"], {"images": images.numpy()})
        with torch.no_grad():
            tokens = model(images)
        for found, expected in ((seg, tokens.seg), (det, tokens.det)):
            expected = torch.stack(expected).numpy()
            assert found.shape == expected.shape == (len(TINY_STAGES), batch, (TINY_SIZE // 14) ** 2 + 1, 64)
            np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-5)
    description = json.loads((tmp_path / "model.onnx.json").read_text())
    assert description["img_size"] == TINY_SIZE and description["object_word"] == "Brain"
    assert np.asarray(description["text_features"]).shape == (64, 2)


def test_checkpoint_without_metadata_needs_flags(tmp_path, capsys):
    ckpt, clip_path, _ = tiny_adapters(tmp_path, meta=False)
    code = export_onnx.main(["--ckpt", str(ckpt), "--output", str(tmp_path / "m.onnx"), "--clip_ckpt", str(clip_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--model_name" in err and "--img_size" in err and "--features_list" in err and "--prompt_name" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_uses_the_clip_weights_recorded_in_the_checkpoint(tmp_path, capsys):
    """No --clip_ckpt: the metadata's clip_ckpt; the description records it; usual file modes."""
    pytest.importorskip("onnx")
    ckpt, clip_path, _ = tiny_adapters(tmp_path, clip_ckpt=str(tmp_path / "tiny.pt"))
    output = tmp_path / "out" / "model.onnx"
    umask = os.umask(0o022)
    try:
        assert export_onnx.main(["--ckpt", str(ckpt), "--output", str(output), "--cache_dir", "none"]) == 0
    finally:
        os.umask(umask)
    description = json.loads((tmp_path / "out" / "model.onnx.json").read_text())
    assert description["clip_ckpt"] == str(clip_path) and description["clip_ckpt_source"] == "checkpoint metadata"
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx", "model.onnx.json"]  # no temporary left
    for path in output.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
