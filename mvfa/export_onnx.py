"""python -m mvfa.export_onnx: the adapted visual model (frozen CLIP ViT + seg/det adapters) as ONNX.

    python -m mvfa.export_onnx --ckpt ADAPTERS --output model.onnx [--clip_ckpt CLIP_WEIGHTS] [--check]

The exported graph maps `images` (float32 [B, 3, S, S], RGB in [0, 1] after the release's bicubic
resize to S x S; no mean/std normalisation) to `seg_tokens` and `det_tokens`, each
[stages, B, 1 + grid^2, embed] (class token first), with a dynamic batch axis. Scoring (text
alignment, memory bank, normalisation, threshold) stays outside the graph: `<output>.json` holds
what it needs, namely the checkpoint's metadata (normalisation statistics, threshold, ...), the
input and output layout and, when the object word is known, the text features T [embed, 2].

It uses torch.onnx's TorchScript exporter (dynamo=False), which needs the `onnx` package
(requirements-optional.txt). Attention (scaled_dot_product_attention) exports as its explicit
MatMul/Softmax form, numerically the same. `--check` runs the file in onnxruntime and compares its
tokens with PyTorch's.

The CLIP weights are found as in mvfa.predict (--clip_ckpt, else the file recorded in the
checkpoint, else OpenAI's file of the model) and recorded in `<output>.json`. The output path is
checked before the model is built: a folder, or a place that cannot be written, is one error line.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
import sys
import warnings

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("export-onnx")

import torch
from torch import nn

from mvfa.adapter_settings import read_adapters, resolve_clip_weights, resolve_settings
from mvfa.method.backbone import build_adapted_model
from mvfa.method.model import AdaptedViT
from mvfa.parsers import export_onnx_parser as build_parser
from mvfa.runtime.errors import MVFAError, single_line
from mvfa.runtime.files import atomic_target, check_writable_file, os_error_text, write_text_atomic
from mvfa.runtime.process import INTERRUPTED, USER_ERRORS, resolve_cache_dir

DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("seg_tokens", "det_tokens")


class TokenGraph(nn.Module):
    """images -> (seg tokens, det tokens), each stacked over stages: [stages, B, 1 + N, embed]."""

    def __init__(self, model: AdaptedViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(images)
        return torch.stack(tokens.seg), torch.stack(tokens.det)


def export(model: AdaptedViT, path: Path, opset: int = DEFAULT_OPSET, metadata: dict | None = None) -> Path:
    """Write the ONNX graph of `model` (on the CPU, fp32) to `path` through a temporary file."""
    if importlib.util.find_spec("onnx") is None:
        raise MVFAError("the ONNX export needs the onnx package: pip install -r requirements-optional.txt")
    import onnx

    graph = TokenGraph(model).to("cpu").float().eval()
    example = torch.rand(2, 3, model.image_size, model.image_size)
    with atomic_target(path) as tmp:  # whole or not at all, with the usual file mode
        with warnings.catch_warnings():  # the tracer's notes on Python-level shape checks, the exporter's deprecation
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {1: "batch"} for name in OUTPUT_NAMES}},
            )
        if metadata:
            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
            onnx.save(proto, str(tmp))
    return Path(path)


def run_onnx(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported graph's tokens in onnxruntime (CPU)."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise MVFAError("--check needs onnxruntime: pip install -r requirements-optional.txt")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seg, det = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.cpu().float().numpy()})
    return torch.from_numpy(seg), torch.from_numpy(det)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = Path(args.output)
        check_writable_file(output, "--output")  # before the model is built
        check_writable_file(output.with_name(output.name + ".json"), "--output's description")
        ckpt = Path(args.ckpt)
        state, meta = read_adapters(ckpt)
        settings = resolve_settings(args, meta, str(ckpt), ("model_name", "img_size", "features_list"))
        clip, notes = resolve_clip_weights(args.clip_ckpt, meta, settings.model_name, str(ckpt))
        for note in notes:
            print(note)
        model, text_bank = build_adapted_model(
            settings.model_name, settings.img_size, settings.features_list, clip.path, "openai", settings.quick_gelu,
            torch.device("cpu"), resolve_cache_dir(args.cache_dir),
        )
        model.load_adapter_state(state, source=str(ckpt))
        model.eval()
        description = {
            "format": "mvfa-onnx/1",
            "checkpoint": str(ckpt),
            "clip_ckpt": str(clip.path),
            "clip_ckpt_source": clip.source,
            "model_name": settings.model_name,
            "img_size": settings.img_size,
            "features_list": list(settings.features_list),
            "quick_gelu": settings.quick_gelu,
            "object_word": settings.object_word,
            "has_masks": settings.has_masks,
            "input": f"{INPUT_NAME}: float32 [batch, 3, {settings.img_size}, {settings.img_size}], RGB in [0, 1], "
                     "bicubic resize, no mean/std normalisation",
            "outputs": f"{', '.join(OUTPUT_NAMES)}: float32 [stages, batch, 1 + grid^2, embed], class token first",
            "checkpoint_meta": meta,
        }
        export(model, output, args.opset, {"mvfa": {k: v for k, v in description.items() if k != "checkpoint_meta"}})
        if settings.object_word:
            description["text_features"] = text_bank(settings.object_word).cpu().tolist()  # [embed, 2]: normal, abnormal
        sidecar = output.with_name(output.name + ".json")
        write_text_atomic(sidecar, json.dumps(description, indent=2) + "\n")
        print(f"wrote {output} and {output.name}.json ({len(settings.features_list)} stages, input {settings.img_size} px)")
        if args.check:
            images = torch.rand(2, 3, settings.img_size, settings.img_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                expected = TokenGraph(model)(images)
            found = run_onnx(output, images)
            error = max(float((a - b).abs().max()) for a, b in zip(found, expected))
            scale = max(float(t.abs().max()) for t in expected)
            print(f"check: onnxruntime tokens differ from PyTorch's by at most {error:.2e} (largest token value {scale:.2e})")
    except USER_ERRORS as err:
        print(f"error: {single_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted: nothing half-written at --output {args.output}", file=sys.stderr)
        return INTERRUPTED
    except OSError as err:  # a write that failed midway (disk full, ...)
        print(f"error: {os_error_text(err)}: nothing half-written at --output {args.output}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
