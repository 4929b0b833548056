"""What a trained adapter checkpoint needs to be used again, for the commands that load one
(mvfa.predict, mvfa.export_onnx): the model settings (the checkpoint's metadata, flags override or
fill in) and the CLIP weights it was trained with."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from CLIP.config import CKPT_DIR, load_config

from mvfa.method.model import read_checkpoint
from mvfa.runtime.errors import MVFAError

RELEASE_HINT = (
    "the release's checkpoints: --model_name ViT-L-14-336 --img_size 240 --features_list 6 12 18 24, "
    "--has_masks 1 for Brain, Liver and Retina_RESC, 0 for the others"
)


@dataclass
class ModelSettings:
    """What the adapters were trained with: from the checkpoint's metadata, flags override or fill in."""

    model_name: str
    img_size: int
    features_list: tuple[int, ...]
    quick_gelu: bool | None
    object_word: str | None
    has_masks: bool | None


# (settings field, meta key, flag)
_FACTS = (
    ("model_name", "model_name", "--model_name"),
    ("img_size", "img_size", "--img_size"),
    ("features_list", "features_list", "--features_list"),
    ("object_word", "object_word", "--prompt_name"),
    ("has_masks", "has_masks", "--has_masks"),
)
SETTING_NAMES = tuple(name for name, _, _ in _FACTS)  # every fact: what predict needs
# Facts a flag may fill in but not contradict: other values build another model than the adapters'.
# (--prompt_name may differ on purpose: another object word; --has_masks chooses the scoring branch.)
_MUST_MATCH = ("model_name", "img_size", "features_list")


def _fact_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resolve_settings(args: argparse.Namespace, meta: dict, source: str, needed: tuple[str, ...]) -> ModelSettings:
    """Flags first, then the checkpoint's metadata; the `needed` facts missing from both give one error
    line, and so does a model flag (_MUST_MATCH) that contradicts the metadata."""
    flags = {
        "model_name": args.model_name,
        "img_size": args.img_size,
        "features_list": tuple(args.features_list) if args.features_list else None,
        "object_word": getattr(args, "prompt_name", None),
        "has_masks": None if getattr(args, "has_masks", None) is None else bool(args.has_masks),
    }
    values, missing = {}, []
    for name, key, flag in _FACTS:
        stored = meta.get(key)
        if name == "features_list" and stored is not None:
            stored = tuple(int(v) for v in stored)
        if name in _MUST_MATCH and flags[name] is not None and stored is not None:
            same = str(flags[name]) == str(stored) if name == "model_name" else flags[name] == stored
            if not same:
                raise MVFAError(
                    f"{flag} {_fact_text(flags[name])} does not match {source}, whose adapters were trained with "
                    f"{key} {_fact_text(stored)}: drop {flag} (the checkpoint's metadata gives it) or pass the "
                    "checkpoint trained for it"
                )
        value = flags[name] if flags[name] is not None else stored
        if name == "features_list" and value is not None:
            value = tuple(int(v) for v in value)
        values[name] = value
        if value is None and name in needed:
            missing.append(flag)
    if missing:
        what = "has no metadata (a release checkpoint?)" if not meta else "has no " + ", ".join(m.lstrip("-") for m in missing) + " in its metadata"
        raise MVFAError(f"{source} {what}: pass {', '.join(missing)} ({RELEASE_HINT})")
    quick_gelu = args.quick_gelu if args.quick_gelu is not None else meta.get("quick_gelu")
    return ModelSettings(
        model_name=str(values["model_name"]) if values["model_name"] is not None else None,
        img_size=int(values["img_size"]) if values["img_size"] is not None else None,
        features_list=values["features_list"],
        quick_gelu=None if quick_gelu is None else bool(quick_gelu),
        object_word=values["object_word"],
        has_masks=values["has_masks"],
    )


@dataclass(frozen=True)
class ClipWeights:
    """The CLIP weights file a run loads, and where that choice came from (recorded in the outputs)."""

    path: Path
    source: str  # "--clip_ckpt", "checkpoint metadata" or "OpenAI's file of the model"


def resolve_clip_weights(flag: str | None, meta: dict, model_name: str, source: str) -> tuple[ClipWeights, list[str]]:
    """(the CLIP weights to load, notes to print): --clip_ckpt, else the file the checkpoint's metadata
    records as `clip_ckpt` when it exists here, else OpenAI's file of the model in CLIP/ckpt/.

    The metadata's `clip_ckpt` is the path given at training (None: OpenAI's default file); older
    checkpoints do not have it. Nothing found is one error line naming the --clip_ckpt to pass.
    """
    if flag is not None:
        path = Path(flag)
        if not path.is_file():
            raise MVFAError(f"--clip_ckpt {path} not found: pass the CLIP weights file the adapters were trained with")
        return ClipWeights(path, "--clip_ckpt"), []
    recorded = meta.get("clip_ckpt")
    recorded = str(recorded) if isinstance(recorded, (str, Path)) and str(recorded) else None
    if recorded is not None and Path(recorded).is_file():
        return ClipWeights(Path(recorded), "checkpoint metadata"), []
    config = load_config(model_name)
    default = CKPT_DIR / config.openai_file if config.openai_file else None
    if default is not None and default.is_file():
        notes = []
        if recorded is not None:
            notes.append(f"note: {source} was trained with the CLIP weights {recorded}, not found here: using "
                         f"{default} instead (pass --clip_ckpt to choose)")
        return ClipWeights(default, "OpenAI's file of the model"), notes
    if recorded is not None:
        why = f"it was trained with the CLIP weights {recorded}, which is not found here"
        if default is not None:
            why += f", and OpenAI's file {default} is absent too"
        todo = f"pass --clip_ckpt {recorded} (or that file's new place)"
    elif default is not None:
        why = f"it was trained with OpenAI's {config.openai_file}, which is not found at {default}"
        todo = f"download it there or pass --clip_ckpt PATH_TO_{config.openai_file}"
    else:
        why = (f"model {model_name!r} has no OpenAI weights file and the checkpoint does not record which CLIP "
               "weights it was trained with")
        todo = "pass --clip_ckpt PATH (the CLIP weights given to training with --clip_ckpt)"
    raise MVFAError(f"no CLIP weights for {source}: {why}; {todo}")


def read_adapters(path: Path) -> tuple[dict, dict]:
    """(adapter state, metadata dict: empty for the release's checkpoints)."""
    state = read_checkpoint(path)
    meta = state.get("meta")
    return state, meta if isinstance(meta, dict) else {}
