"""Malformed adapter checkpoints: each is a one-line CheckpointFormatError naming the file and what is
wrong (read_checkpoint, AdaptedViT.load_adapter_state), and exit code 2 with one stderr line from a script."""
from __future__ import annotations

import pytest
import torch

from tests import clip_helpers

from CLIP import create_model
from mvfa.method.model import AdaptedViT, read_checkpoint, save_checkpoint
from mvfa.runtime.errors import CheckpointFormatError

STAGES = [2, 4, 6, 8]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from clip_helpers.one_torch_thread()


@pytest.fixture(scope="module")
def model() -> AdaptedViT:
    torch.manual_seed(0)
    return AdaptedViT(create_model("ViT-Tiny-14", 56), STAGES)


def good_state(model: AdaptedViT, **meta) -> dict:
    state = model.adapter_state()
    state["meta"] = {"threshold": 0.5, "threshold_rule": "f1", "target_fpr": None, **meta}
    return state


def replaced(state: dict, group: str, key: str, value) -> dict:
    state[group] = {**state[group], key: value}
    return state


KEY = "0.fc1.0.weight"  # [64, 128] in ViT-Tiny-14

# case -> (state from a good one, words the message must hold)
CASES = {
    "a-list": (lambda s: [s], "holds a list, not an adapter checkpoint dict"),
    "a-tensor": (lambda s: torch.zeros(3), "holds a Tensor, not an adapter checkpoint dict"),
    "int-group": (lambda s: {**s, "seg_adapters": 7}, "seg_adapters is a int, expected a dict of adapter weights"),
    "list-group": (lambda s: {**s, "det_adapters": [1.0]}, "det_adapters is a list, expected a dict"),
    "missing-group": (lambda s: {"seg_adapters": s["seg_adapters"]}, "has no 'det_adapters' entry"),
    "flat-state-dict": (lambda s: {f"{g}.{k}": v for g in ("seg_adapters", "det_adapters") for k, v in s[g].items()},
                        "has no 'seg_adapters' entry"),
    "int-value": (lambda s: replaced(s, "seg_adapters", KEY, 3), f"seg_adapters.{KEY} is a int, not a tensor"),
    "string-value": (lambda s: replaced(s, "det_adapters", KEY, "w"), f"det_adapters.{KEY} is a str, not a tensor"),
    "int-tensor": (lambda s: replaced(s, "seg_adapters", KEY, torch.zeros(64, 128, dtype=torch.int64)),
                   f"seg_adapters.{KEY} has dtype torch.int64, expected floating-point"),
    "int-key": (lambda s: {**s, "seg_adapters": {**s["seg_adapters"], 0: torch.zeros(1)}}, "has the key 0 (int)"),
    "nan": (lambda s: replaced(s, "seg_adapters", KEY, torch.full((64, 128), float("nan"))), f"seg_adapters.{KEY} holds NaN or infinite"),
    "inf": (lambda s: replaced(s, "det_adapters", KEY, torch.full((64, 128), float("inf"))), f"det_adapters.{KEY} holds NaN or infinite"),
    "unknown-top-level": (lambda s: {**s, "optimizer": {}}, "unexpected top-level entry 'optimizer'"),
    "mixed-top-level": (lambda s: {**s, f"seg_adapters.{KEY}": s["seg_adapters"][KEY]}, f"unexpected top-level entry 'seg_adapters.{KEY}'"),
    "meta-a-list": (lambda s: {**s, "meta": [0.5]}, "'meta' is a list, expected a dict"),
    "threshold-string": (lambda s: {**s, "meta": {**s["meta"], "threshold": "high"}}, "meta['threshold'] is 'high' (str), expected a finite number"),
    "threshold-numeric-string": (lambda s: {**s, "meta": {**s["meta"], "threshold": "0.5"}}, "meta['threshold'] is '0.5' (str)"),
    "threshold-nan": (lambda s: {**s, "meta": {**s["meta"], "threshold": float("nan")}}, "meta['threshold'] is 'nan' (float)"),
    "threshold-bool": (lambda s: {**s, "meta": {**s["meta"], "threshold": True}}, "meta['threshold'] is 'True' (bool)"),
    "target_fpr-list": (lambda s: {**s, "meta": {**s["meta"], "target_fpr": [0.05]}}, "meta['target_fpr'] is '[0.05]' (list)"),
}

# Structure that fits no model: found by load_adapter_state (read_checkpoint does not know the model).
FIT_CASES = {
    "wrong-shape": (lambda s: replaced(s, "seg_adapters", KEY, torch.zeros(64, 256)),
                    f"seg_adapters.{KEY} has shape (64, 256) in the checkpoint, (64, 128) in the model"),
    "transposed": (lambda s: replaced(s, "det_adapters", KEY, s["det_adapters"][KEY].t()),
                   f"det_adapters.{KEY} has shape (128, 64) in the checkpoint, (64, 128) in the model"),
    "missing-stage": (lambda s: {**s, "seg_adapters": {k: v for k, v in s["seg_adapters"].items() if not k.startswith("3.")}},
                      "seg_adapters.3.fc1.0.weight is missing"),
    "extra-stage": (lambda s: replaced(s, "seg_adapters", "4.fc1.0.weight", torch.zeros(64, 128)), "unexpected seg_adapters.4.fc1.0.weight"),
    "foreign-key": (lambda s: replaced(s, "det_adapters", "module.0.fc1.0.weight", torch.zeros(64, 128)),
                    "unexpected entry det_adapters.module.0.fc1.0.weight (adapter weights are named like '0.fc1.0.weight')"),
}


def one_line(err: pytest.ExceptionInfo, source) -> str:
    message = str(err.value)
    assert "\n" not in message and str(source) in message, message
    return message


@pytest.mark.parametrize("case", list(CASES))
def test_read_checkpoint_refuses_malformed_files(model, tmp_path, case):
    make, expected = CASES[case]
    path = tmp_path / f"{case}.pth"
    torch.save(make(good_state(model)), path)
    with pytest.raises(CheckpointFormatError) as err:
        read_checkpoint(path)
    assert expected in one_line(err, path)


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith(("unknown", "mixed", "meta", "threshold", "target", "nan", "inf"))])
def test_load_adapter_state_refuses_malformed_states_and_loads_nothing(model, case):
    make, expected = CASES[case]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointFormatError) as err:
        model.load_adapter_state(make(good_state(model)), source="given.pth")
    assert expected in one_line(err, "given.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_load_adapter_state_refuses_states_that_do_not_fit_and_loads_nothing(model, tmp_path, case):
    make, expected = FIT_CASES[case]
    path = tmp_path / f"{case}.pth"
    torch.save(make(good_state(model)), path)
    state = read_checkpoint(path)  # well-formed: only the model can tell
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointFormatError) as err:
        model.load_adapter_state(state, source=str(path))
    assert expected in one_line(err, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_well_formed_checkpoints_still_load(model, tmp_path):
    """Ours with meta (threshold None or an int too), the release's two-key form, fp16 weights."""
    variants = {
        "ours": good_state(model),
        "no-threshold": good_state(model, threshold=None),
        "int-threshold": good_state(model, threshold=1),
        "release": {g: model.adapter_state()[g] for g in ("seg_adapters", "det_adapters")},
        "half": {g: {k: v.half() for k, v in s.items()} for g, s in model.adapter_state().items()},
    }
    for name, state in variants.items():
        path = tmp_path / f"{name}.pth"
        save_checkpoint(state, path)
        model.load_adapter_state(read_checkpoint(path), source=str(path))


@pytest.mark.parametrize("case", ["int-group", "threshold-string", "nan", "wrong-shape"])
def test_test_zero_exits_2_with_one_line(model, synthetic_data, tiny_clip, tmp_path, capsys, case):
    from mvfa import cli
    from tests.scripts_helpers import tiny_argv

    data = synthetic_data  # conftest.py: read only
    make, expected = {**CASES, **FIT_CASES}[case]
    torch.manual_seed(0)
    state = AdaptedViT(create_model("ViT-Tiny-14", 56), STAGES).adapter_state()
    state["meta"] = {"threshold": 0.5}
    checkpoint = tmp_path / "bad.pth"
    torch.save(make(state), checkpoint)
    argv = tiny_argv(data, tiny_clip, tmp_path / "ckpt", tmp_path / "out", "Liver",
                     "--checkpoint", str(checkpoint), "--cache_dir", "none")
    assert cli.main_test_zero(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(checkpoint) in err and expected in err, err
    assert "Traceback" not in err
