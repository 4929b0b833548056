"""A run's adapter checkpoint: its metadata, where a test run finds it, the checks of its settings
against the run's, saving it, and what a diverged run keeps."""
from __future__ import annotations

from pathlib import Path

from CLIP.config import load_config

from mvfa.method.model import AdaptedViT, read_checkpoint, save_checkpoint
from mvfa.runs.config import TRAINING_SETTINGS, RunConfig
from mvfa.runtime.distributed import Dist
from mvfa.runtime.errors import CheckpointFormatError, MVFAError

def checkpoint_metadata(config: RunConfig, dataset: MedicalDataset, word: str) -> dict:
    """Plain data stored beside the adapters, so the checkpoint says what it was trained for."""
    return {
        "format": "mvfa-adapters/1",
        "mode": config.mode,
        "obj": config.obj,
        "object_word": word,
        "has_masks": dataset.has_masks,
        "model_name": str(config.model_name),
        "img_size": config.img_size,
        "features_list": list(config.features_list),
        "quick_gelu": bool(load_config(config.model_name).with_quick_gelu(config.quick_gelu).quick_gelu),
        "shot": config.shot if config.mode == "few-shot" else 0,
        "iterate": config.iterate if config.mode == "few-shot" else -1,
        "seed": config.seed,
        "select": config.select,
        # the CLIP weights (absolute, so predict finds them from any folder; None: OpenAI's file of the model)
        "pretrain": config.pretrain,
        "clip_ckpt": str(Path(config.clip_ckpt).resolve()) if config.clip_ckpt is not None else None,
        **{key: getattr(config, key) for key in TRAINING_SETTINGS},
        "trained": config.epoch > 0,  # --epoch 0 saves the initial random adapters
    }


def find_checkpoint(config: RunConfig) -> Path:
    """The adapters a test script reads: --checkpoint, else <save_path>/<our name>, else <save_path>/<obj>.pth."""
    if config.checkpoint is not None:
        if not config.checkpoint.is_file():
            raise MVFAError(f"adapter checkpoint not found: {config.checkpoint} (from --checkpoint)")
        return config.checkpoint
    candidates = [config.save_path / config.checkpoint_name(), config.save_path / f"{config.obj}.pth"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MVFAError(
        f"no adapter checkpoint for {config.obj} in {config.save_path}: looked for "
        f"{' and '.join(c.name for c in candidates)}; train first or pass --save_path"
    )


# a test run's settings that must be those the adapters were trained with (meta key -> flag)
MODEL_SETTINGS = {
    "mode": "mode", "obj": "--obj", "object_word": "--prompt_name", "model_name": "--model_name", "img_size": "--img_size",
    "features_list": "--features_list", "quick_gelu": "--quick_gelu", "pretrain": "--pretrain",
}
# settings that change what training makes; a checkpoint's name records only object, shot, iterate and seed
SAME_RUN_SETTINGS = (*MODEL_SETTINGS, "shot", "iterate", "seed", "select", "clip_ckpt", *TRAINING_SETTINGS)
NOT_RECORDED = "not recorded"


def _shown_setting(key: str, value) -> str:
    if key == "clip_ckpt" and value is None:
        return "OpenAI's file of the model"
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _change(key: str, ours, theirs) -> str:
    flag = MODEL_SETTINGS.get(key, f"--{key}")
    return f"{flag} {_shown_setting(key, ours)} (checkpoint: {_shown_setting(key, theirs)})"


def _same_model(ours: str, theirs) -> bool:
    """Model names agree as written, or as the same JSON config file."""
    if str(ours) == str(theirs):
        return True
    return Path(ours).is_file() and Path(str(theirs)).is_file() and Path(ours).resolve() == Path(str(theirs)).resolve()


def check_checkpoint_meta(config: RunConfig, meta: dict, path: Path, word: str) -> None:
    """A test run's settings against the metadata of the adapters it scores, before anything is scored.

    Adapters trained for another object, mode, model, input size, stages, activation, prompt word or
    CLIP weights (--pretrain) still give plausible AUCs and apply their stored threshold, so every
    mismatch is named in one error line (flag, this run's value, the checkpoint's). --only_normal
    scores with zero-shot adapters on purpose: it expects a zero-shot checkpoint. Decision: another
    --obj is refused even from an explicit --checkpoint, with no override: a zero-shot checkpoint of
    Liver was trained on the other datasets' test images (on Brain it has seen the test set), and a
    few-shot one on another dataset's support. A release checkpoint (no metadata) cannot be checked:
    a note says so. Other CLIP weights than recorded (--clip_ckpt) give a note (a copy is fine).
    """
    if not meta:
        print(f"note: {path} has no metadata (a release checkpoint?): its model, input size, stages and "
              "object cannot be checked against this run's flags")
        return
    ours = {
        "mode": "zero-shot" if config.only_normal else config.mode, "obj": config.obj, "object_word": word,
        "model_name": str(config.model_name), "img_size": config.img_size, "features_list": list(config.features_list),
        "quick_gelu": bool(load_config(config.model_name).with_quick_gelu(config.quick_gelu).quick_gelu),
        "pretrain": config.pretrain,
    }
    differ = [key for key, value in ours.items()
              if key in meta and not (_same_model(value, meta[key]) if key == "model_name" else value == meta[key])]
    if "obj" in differ and "object_word" in differ:  # the word follows from the object
        differ.remove("object_word")
    changes = [_mode_change(config, meta["mode"]) if key == "mode" else _change(key, ours[key], meta[key]) for key in differ]
    if changes:
        raise MVFAError(f"{path} does not fit this run: {'; '.join(changes)}: pass the checkpoint's values, or a "
                        "checkpoint trained for this run")
    recorded, loaded = meta.get("clip_ckpt"), config.clip_ckpt
    if recorded is not None and loaded is not None and Path(recorded) != Path(loaded).resolve():
        print(f"note: {path} was trained on the CLIP weights {recorded}; this run loads {loaded}")
    if meta.get("trained") is False:
        print(f"note: {path} holds untrained adapters (trained with --epoch 0)")


def _mode_change(config: RunConfig, theirs) -> str:
    if config.only_normal:
        return f"--zero_shot_ckpt needs a zero-shot checkpoint (this one is {theirs})"
    other = "test_few.py" if theirs == "few-shot" else "test_zero.py" if theirs == "zero-shot" else "?"
    return f"a {config.mode} test needs a {config.mode} checkpoint (this one is {theirs}: test it with {other})"


def read_test_checkpoint(config: RunConfig, word: str) -> tuple[Path, dict, dict]:
    """The adapters a test run scores (path, state, meta), read and checked before any model is built."""
    path = find_checkpoint(config)
    state = read_checkpoint(path)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    check_checkpoint_meta(config, meta, path, word)
    return path, state, meta


def check_replaced_checkpoint(config: RunConfig, planned: dict, dist: Dist) -> None:
    """Before training: keep an earlier run's work. The checkpoint this run saves may exist already; its
    name records only object, shot, iterate and seed, so one made with other settings (another
    learning rate, epoch count, --epoch 0, ...) is replaced only with --overwrite; the same
    settings are a re-run, replaced with a note. --epoch 0 is said at once (untrained adapters)."""
    if config.epoch == 0:
        print("note: --epoch 0: the adapters are not trained; their initial random values are evaluated "
              "(and saved, marked untrained)")
    path = config.save_path / config.checkpoint_name()
    if not (config.save_model and dist.is_main and path.exists()):
        return
    try:
        old = read_checkpoint(path).get("meta") or {}
    except CheckpointFormatError as err:
        if not config.overwrite:
            raise MVFAError(f"{err}; this run would replace it: pass --overwrite to do so, or choose another --save_path") from None
        print(f"note: --overwrite: this run replaces {path}, which is not a readable checkpoint")
        return
    if old:
        changes = [_change(key, planned[key], old.get(key, NOT_RECORDED)) for key in SAME_RUN_SETTINGS
                   if old.get(key, NOT_RECORDED) != planned[key]]
    else:
        changes = ["no metadata: its settings are unknown"]
    if old.get("trained", old.get("epoch") != 0) and not planned["trained"]:
        changes.insert(0, "trained adapters would be replaced by untrained ones")
    if not changes:
        print(f"note: {path} exists, made with the same settings: this run replaces it (a re-run)")
    elif config.overwrite:
        print(f"note: --overwrite: this run replaces {path} ({'; '.join(changes)})")
    else:
        raise MVFAError(
            f"{path} holds adapters made with other settings: {'; '.join(changes)}; a checkpoint's name records only "
            "the object, shot, iterate and seed: pass --overwrite to replace it, or choose another --save_path"
        )


def save_adapters(config: RunConfig, model: AdaptedViT, meta: dict, dist: Dist) -> Path | None:
    """--save_model: the adapters and their metadata to <save_path>/<checkpoint name> (rank 0 writes)."""
    if not config.save_model:
        return None
    path = config.save_path / config.checkpoint_name()
    state = model.adapter_state()
    state["meta"] = meta
    if dist.is_main:
        save_checkpoint(state, path)
    print(f"saved {'' if meta.get('trained', True) else 'untrained (--epoch 0) '}adapters to {path}")
    return path


def keep_last_good(config: RunConfig, model: AdaptedViT, best: dict | None, where: dict, meta: dict, dist: Dist) -> str:
    """What a diverged run keeps, said in a clause of its error line: its last good selection `best` is
    saved (uncalibrated, with `where` it diverged) when there is one and --save_model is on."""
    if best is None:
        return f"no adapters saved (no evaluation had selected adapters yet, --select {config.select})"
    if not config.save_model:
        return "nothing saved (--save_model 0)"
    model.load_adapter_state(best["adapters"])
    selected = {"best_epoch": best["epoch"], "best_step": best["step"]}
    path = save_adapters(config, model, {**meta, **selected, "diverged": where}, dist)
    return f"saved the last good selection (epoch {best['epoch']} step {best['step']}, uncalibrated) to {path}"


def support_names(support) -> dict[str, list[str]]:
    return {"abnormal": [s.path.name for s in support.abnormal], "normal": [s.path.name for s in support.normal]}


def warn_other_support(meta: dict, support, checkpoint_path: Path) -> None:
    """test_few: one line when the checkpoint was trained on another support than the memory bank's."""
    recorded = meta.get("support")
    if not isinstance(recorded, dict) or recorded == support_names(support):
        return
    differs = [kind for kind in ("abnormal", "normal") if recorded.get(kind) != support_names(support)[kind]]
    print(
        f"warning: {checkpoint_path} was trained on another support ({' and '.join(differs)} images differ) than "
        f"this run's {support.source}: pass the --shot/--iterate/--fewshot_seed_dir of its training"
    )
