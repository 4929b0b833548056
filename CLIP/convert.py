"""Convert OpenAI's TorchScript CLIP archive into a plain state dict.

    python -m CLIP.convert ViT-L-14-336px.pt ViT-L-14-336px.state_dict.pt [--force]

The output holds the weights under OpenAI's key names in their original dtype (the three integer
hyper-parameter entries of the archive are dropped), so it loads with `torch.load(weights_only=True)`
and with `CLIP.create_model(..., pretrained=OUTPUT)` without TorchScript. Any accepted checkpoint form
is read (see `CLIP.loading.read_state_dict`): the archive is read as data, nothing in it is run, under
any file name. When a registered config has OpenAI's published sha256 (by the input's file name, else by
the architecture of its weights), one line says whether the input is that file: information, not the
safety mechanism. The output is written to a temporary file beside it and moved into place, so an
interrupted run never leaves a partial file under the output name.

Exit codes: 0 written; 2 bad input or output (one line on stderr, nothing written).
"""
from __future__ import annotations

from pathlib import Path
import sys

if __name__ == "__main__":  # flags and --help answer before torch is imported (mvfa.commands), then main runs
    from mvfa.commands import run_as_module

    run_as_module("convert")

import torch

from mvfa.parsers import convert_parser as build_parser
from mvfa.runtime.files import save_torch_atomic

from .config import CLIPConfig, list_models, load_config
from .errors import CheckpointError, CLIPError
from .loading import infer_config, read_state_dict, sha256_of


def registered_openai_files() -> dict[str, tuple[str, str | None]]:
    """OpenAI file name -> (registered config name, expected sha256) for every registered config."""
    files = {}
    for name in list_models():
        config = load_config(name)
        if config.openai_file:
            files[config.openai_file] = (name, config.openai_sha256)
    return files


def matching_registered_config(config: CLIPConfig) -> str | None:
    """The registered config with exactly these sizes, if any."""
    for name in list_models():
        registered = load_config(name)
        if (registered.embed_dim, registered.vision, registered.text) == (config.embed_dim, config.vision, config.text):
            return name
    return None


def describe(config: CLIPConfig) -> str:
    vision, text = config.vision, config.text
    return (
        f"embed {config.embed_dim}; vision width {vision.width}, {vision.layers} blocks, patch {vision.patch_size}, "
        f"trained at {vision.image_size} px ({vision.grid_size} x {vision.grid_size} grid); "
        f"text width {text.width}, {text.layers} blocks, context {text.context_length}, vocab {text.vocab_size}"
    )


def convert(source: Path, target: Path, force: bool = False) -> tuple[dict[str, torch.Tensor], CLIPConfig, str]:
    """Write `source`'s weights to `target` as a plain state dict.

    Returns (state dict, inferred architecture, sha256 of the output).
    """
    if not source.is_file():
        raise CheckpointError(f"input checkpoint not found: {source}")
    if target.is_dir():
        raise CheckpointError(f"output {target} is a folder; give a file path")
    if target.exists() and not force:
        raise CheckpointError(f"output {target} already exists; pass --force to overwrite it")
    state_dict = read_state_dict(source)
    try:
        config = infer_config(state_dict)
    except KeyError as err:
        raise CheckpointError(f"{source} lacks the entry {err.args[0]!r}; cannot infer its architecture") from None
    save_torch_atomic(state_dict, target)
    return state_dict, config, sha256_of(target)


def published_sha256_note(source: Path, config: CLIPConfig) -> str | None:
    """One line saying whether `source` is OpenAI's published file for its model (by its file name, else
    by the architecture of its weights), or None when no published sha256 is registered for either."""
    known = registered_openai_files().get(source.name)
    name = known[0] if known is not None and known[1] else matching_registered_config(config)
    registered = load_config(name) if name is not None else None
    if registered is None or not registered.openai_file or not registered.openai_sha256:
        return None
    found = sha256_of(source)
    if found == registered.openai_sha256.lower():
        return f"input sha256 {found}: OpenAI's published {registered.openai_file} (config {name})"
    return (
        f"input sha256 {found}: not OpenAI's published {registered.openai_file} (config {name}, sha256 "
        f"{registered.openai_sha256}); its weights were read as data, nothing in the file was run"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        state_dict, config, digest = convert(args.input, args.output, force=args.force)
    except CLIPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable input, unwritable output folder, full disk, ...
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in state_dict.values()})
    registered = matching_registered_config(config)
    print(f"wrote {len(state_dict)} tensors ({', '.join(dtypes)}) to {args.output}")
    print(f"architecture: {describe(config)}" + (f" (registered config {registered})" if registered else ""))
    print(f"sha256: {digest}")
    note = published_sha256_note(args.input, config)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
