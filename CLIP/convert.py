"""Convert OpenAI's TorchScript CLIP archive into a plain state dict.

    python -m CLIP.convert ViT-L-14-336px.pt ViT-L-14-336px.state_dict.pt [--force]

The output holds the weights under OpenAI's key names in their original dtype (the three integer
hyper-parameter entries of the archive are dropped), so it loads with `torch.load(weights_only=True)`
and with `CLIP.create_model(..., pretrained=OUTPUT)` without TorchScript. Any accepted checkpoint form
is read (see `CLIP.loading.read_state_dict`). When the input's file name is the OpenAI file name of a
registered config, its sha256 is checked first. The output is written to a temporary file beside it
and moved into place, so an interrupted run never leaves a partial file under the output name.

Exit codes: 0 written; 1 sha256 mismatch (nothing written); 2 bad input or output (one line on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

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


class ShaMismatch(Exception):
    pass


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
    known = registered_openai_files().get(source.name)
    if known is not None and known[1]:
        name, expected = known
        found = sha256_of(source)
        if found != expected.lower():
            raise ShaMismatch(
                f"sha256 mismatch for {source}: {found}, but OpenAI's {source.name} (config {name}) has {expected}; "
                "the file is corrupt, truncated or not OpenAI's; nothing written"
            )
    state_dict = read_state_dict(source)
    try:
        config = infer_config(state_dict)
    except KeyError as err:
        raise CheckpointError(f"{source} lacks the entry {err.args[0]!r}; cannot infer its architecture") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
    temporary = Path(handle.name)
    try:
        with handle:
            torch.save(state_dict, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return state_dict, config, sha256_of(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m CLIP.convert",
        description="Convert OpenAI's TorchScript CLIP archive (or any accepted checkpoint form) "
        "into a plain state dict that loads with torch.load(weights_only=True).",
    )
    parser.add_argument("input", type=Path, help="checkpoint to read, e.g. CLIP/ckpt/ViT-L-14-336px.pt")
    parser.add_argument("output", type=Path, help="plain state dict to write (torch.save)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    args = parser.parse_args(argv)
    try:
        state_dict, config, digest = convert(args.input, args.output, force=args.force)
    except ShaMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
