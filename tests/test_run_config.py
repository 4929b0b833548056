"""--config FILE and run_config.json: a run's every flag written beside its results, read back to repeat
it (flags on the command line win), and one error line for a bad file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mvfa import cli
from tests.scripts_helpers import tiny_argv


@pytest.fixture(scope="module")
def bench(tmp_path_factory, synthetic_data, tiny_clip) -> dict[str, Path]:
    """conftest.py's benchmark (its Brain: seed 1, 64 px, 6 + 6 valid, 5 + 5 test) and tiny CLIP, read only."""
    return {"root": tmp_path_factory.mktemp("bench"), "data": synthetic_data, "clip": tiny_clip}


def without_time(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "seconds"}


def test_a_run_repeats_from_its_run_config(bench, tmp_path, capsys):
    first = tmp_path / "first"
    argv = tiny_argv(bench["data"], bench["clip"], tmp_path / "ckpt", first, "Brain", "--shot", "2", "--epoch", "1",
                     "--learning_rate", "0.002")
    assert cli.main_train_few(argv) == 0
    written = json.loads((first / cli.RUN_CONFIG_FILE).read_text())
    parser = cli.build_parser("few-shot", True)
    assert list(written) == list(cli.run_flags(parser, parser.parse_args([])))  # every listed flag, in order
    assert written["epoch"] == 1 and written["shot"] == 2 and written["learning_rate"] == 0.002
    assert written["features_list"] == [2, 4, 6, 8] and written["output_dir"] == str(first)
    assert written["device"] == "cpu" and written["precision"] is None and "config" not in written

    again = tmp_path / "again"
    assert cli.main_train_few(["--config", str(first / cli.RUN_CONFIG_FILE), "--output_dir", str(again)]) == 0
    capsys.readouterr()
    expected = json.loads((first / "metrics.json").read_text())
    repeated = json.loads((again / "metrics.json").read_text())
    assert without_time(repeated["metrics"]) == without_time(expected["metrics"])
    assert repeated["support"] == expected["support"]
    assert repeated["training"]["epoch_losses"] == expected["training"]["epoch_losses"]
    rewritten = json.loads((again / cli.RUN_CONFIG_FILE).read_text())
    assert rewritten == {**written, "output_dir": str(again)}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_flags_on_the_command_line_override_the_file(tmp_path):
    parser = cli.build_parser("few-shot", True)
    config = write(tmp_path / "c.json", json.dumps({"epoch": 3, "obj": "Brain", "learning_rate": 1,
                                                    "fewshot_seed_dir": ["a", "b"], "features_list": [1, 2]}))
    args = cli.parse_flags(parser, ["--config", config])  # "obj": one value of a flag that takes several
    assert (args.epoch, args.obj, args.fewshot_seed_dir, args.features_list) == (3, ["Brain"], ["a", "b"], [1, 2])
    assert args.learning_rate == 1.0 and isinstance(args.learning_rate, float)
    args = cli.parse_flags(cli.build_parser("few-shot", True),
                           ["--epoch", "5", "--config", config, "--fewshot_seed_dir", "c", "--features_list", "3"])
    assert (args.epoch, args.obj, args.fewshot_seed_dir, args.features_list) == (5, ["Brain"], ["c"], [3])
    # null keeps a flag's "not given" (a None default); switches take booleans
    test_parser = cli.build_parser("few-shot", False)
    config = write(tmp_path / "t.json", json.dumps({"save_maps": None, "quick_gelu": True, "normalize": "valid"}))
    args = cli.parse_flags(test_parser, ["--config", config, "--save_maps", "2"])
    assert (args.save_maps, args.quick_gelu, args.normalize) == (2, True, "valid")


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{epoch: 3}", "is not JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ("[1, 2]", "must hold a JSON object of flag values"),
    ('{"epoch": 3, "epochs": 4, "config": "x"}', "unknown keys epochs, config; train_few.py takes obj, data_path"),
    ('{"epoch": "3"}', 'epoch must be an integer, found "3" (a string)'),
    ('{"epoch": 2.5}', "epoch must be an integer, found 2.5 (a number)"),
    ('{"learning_rate": true}', "learning_rate must be a number, found true (a boolean)"),
    ('{"features_list": "6 12"}', 'features_list must be a list of integers, found "6 12" (a string)'),
    ('{"features_list": []}', "features_list must be a list of integers, found [] (a list)"),
    ('{"select": "best"}', 'select must be a string among test, valid, last, found "best" (a string)'),
    ('{"compile": 1}', "compile must be true or false, found 1 (an integer)"),
    ('{"obj": null}', "obj must be a list of strings, found null (null)"),
    ('{"obj": 3}', "obj must be a list of strings, found 3 (an integer)"),
    ('{"save_maps": 3}', "unknown key save_maps"),  # a test script's flag
])
def test_a_bad_config_file_is_one_error_line(tmp_path, capsys, content, message):
    path = tmp_path / "run_config.json"
    if content is not None:
        path.write_text(content)
    assert cli.main_train_few(["--config", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"error: --config {path}") and message in captured.err, captured.err
    assert not (tmp_path / "out").exists()
