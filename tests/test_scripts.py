"""The four scripts end to end on a tiny random CLIP and small synthetic data, and every bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path
import shutil

from PIL import Image
import pytest
import torch

from CLIP import create_model
from mvfa import cli
from mvfa.method.model import AdaptedViT, save_checkpoint
from tests.scripts_helpers import SYNTHETIC_N_TEST, SYNTHETIC_N_VALID, TINY_MODEL, TINY_SIZE, TINY_STAGES, tiny_argv

N_VALID, N_TEST = (6, 6), (5, 5)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, synthetic_data, tiny_clip) -> dict[str, Path]:
    """conftest.py's benchmark (seed 1, 64 px, N_VALID / N_TEST) and tiny CLIP: read only (copy_brain copies)."""
    assert (SYNTHETIC_N_VALID, SYNTHETIC_N_TEST) == (N_VALID, N_TEST)
    return {"root": tmp_path_factory.mktemp("bench"), "data": synthetic_data, "clip": tiny_clip}


def run_script(main, argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_same_adapters(expected: dict, found: dict) -> None:
    """Two saved adapter checkpoints hold bit-identical seg and det adapters."""
    for group in ("seg_adapters", "det_adapters"):
        for key, value in expected[group].items():
            assert torch.equal(value, found[group][key]), f"{group}.{key}"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_train_few_then_test_few(bench, tmp_path, capsys):
    save, out = tmp_path / "ckpt", tmp_path / "train"
    argv = tiny_argv(bench["data"], bench["clip"], save, out, "Brain", "--shot", "2", "--epoch", "2")
    code, printed, _ = run_script(cli.main_train_few, argv, capsys)
    assert code == 0
    assert "uses test labels" in printed  # --select test (the default) says so
    checkpoint = save / "Brain-2shot-it0-seed111.pth"
    assert checkpoint.is_file() and [p.name for p in save.iterdir()] == [checkpoint.name]
    state = torch.load(checkpoint, weights_only=True)
    assert state["meta"]["img_size"] == TINY_SIZE and state["meta"]["features_list"] == [2, 4, 6, 8]
    assert state["meta"]["object_word"] == "Brain" and state["meta"]["shot"] == 2

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        assert 0.0 <= metrics["metrics"][key] <= 1.0
    assert metrics["config"]["shot"] == 2 and metrics["script"] == "train_few"
    predictions = read_csv(out / "predictions.csv")
    assert len(predictions) == sum(N_TEST) and predictions[0]["path"].startswith("Brain_AD/test/good/img/")
    log = read_csv(out / "train_log.csv")
    assert [int(row["epoch"]) for row in log] == [1, 2] and "test_pixel_auroc" in log[0]
    support = (out / "2-shot.txt").read_text().splitlines()
    assert support[0].startswith("# iterate 0: random draw (seed 111, iterate 0")  # where the support came from
    assert support[1].startswith("a-0: ") and support[2].startswith("n-0: ") and len(support[1].split()) == 3
    assert metrics["support"]["source"].startswith("random draw (seed 111, iterate 0")
    assert metrics["support"]["abnormal"] == support[1].split()[1:]
    assert f"Brain AUC : {round(metrics['metrics']['image_auroc'], 4)}" in printed

    # test_few finds the checkpoint by its name and reproduces the selected epoch's numbers.
    test_out = tmp_path / "test"
    code, printed, _ = run_script(cli.main_test_few, tiny_argv(bench["data"], bench["clip"], save, test_out, "Brain", "--shot", "2"), capsys)
    assert code == 0 and f"loaded adapters from {checkpoint}" in printed
    tested_payload = json.loads((test_out / "metrics.json").read_text())
    # the training settings are the checkpoint's, not the test script's defaults (--epoch 50, ...)
    assert tested_payload["training"]["epoch"] == 2 and tested_payload["training"]["learning_rate"] == 1e-3
    assert (tested_payload["training"]["best_epoch"], tested_payload["training"]["best_step"]) == (
        metrics["training"]["best_epoch"], metrics["training"]["best_step"])
    assert "epoch" not in tested_payload["config"] and "learning_rate" not in tested_payload["config"]
    tested = tested_payload["metrics"]
    assert tested["image_auroc"] == metrics["metrics"]["image_auroc"]
    assert tested["pixel_auroc"] == pytest.approx(metrics["metrics"]["pixel_auroc"], abs=1e-12)
    assert read_csv(test_out / "predictions.csv") == predictions

    # The release's file name <obj>.pth is found too, and --seed 5 with a fresh draw writes its own name.
    shutil.copy(checkpoint, save / "Brain.pth")
    checkpoint.unlink()
    code, printed, _ = run_script(cli.main_test_few, tiny_argv(bench["data"], bench["clip"], save, test_out, "Brain", "--shot", "2"), capsys)
    assert code == 0 and "Brain.pth" in printed


def test_no_mask_dataset_select_valid_and_last(bench, tmp_path, capsys):
    for select in ("valid", "last"):
        out = tmp_path / select
        argv = tiny_argv(bench["data"], bench["clip"], tmp_path / f"ckpt-{select}", out, "Chest", "--shot", "2", "--epoch", "1",
                         "--select", select, "--batch_size", "4")  # a checkpoint of other settings is not replaced
        code, printed, _ = run_script(cli.main_train_few, argv, capsys)
        assert code == 0 and "uses test labels" not in printed
        assert "Chest AUC : " in printed and "pAUC" not in printed
        metrics = json.loads((out / "metrics.json").read_text())["metrics"]
        assert "pixel_auroc" not in metrics
        log = read_csv(out / "train_log.csv")
        if select == "valid":
            assert "valid_image_auroc" in log[0]
        else:  # nothing is scored: one row per epoch with its mean loss, as printed
            assert [(row["epoch"], row["step"]) for row in log] == [("1", "11")]  # 2 x 2 x 11 images / batch 4
            epoch_loss = json.loads((out / "metrics.json").read_text())["training"]["epoch_losses"][0]
            assert float(log[0]["loss"]) == pytest.approx(epoch_loss) and f"loss {epoch_loss:.4f}" in printed


def test_train_zero_then_test_zero(bench, tmp_path, capsys):
    save, out = tmp_path / "ckpt", tmp_path / "train"
    argv = tiny_argv(bench["data"], bench["clip"], save, out, "Liver", "--epoch", "1", "--batch_size", "8")
    code, printed, _ = run_script(cli.main_train_zero, argv, capsys)
    assert code == 0 and (save / "Liver-zero-seed111.pth").is_file()
    assert len(read_csv(out / "train_log.csv")) == 5  # the release evaluates 5 times per epoch
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "pixel_auroc" in metrics and "Liver pAUC : " in printed

    # test_zero needs only the target's own data.
    alone = tmp_path / "alone"
    shutil.copytree(bench["data"] / "Liver_AD", alone / "Liver_AD")
    code, printed, _ = run_script(cli.main_test_zero, tiny_argv(alone, bench["clip"], save, tmp_path / "test", "Liver"), capsys)
    assert code == 0
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["metrics"]["image_auroc"] == metrics["image_auroc"]


def test_own_dataset_needs_prompt_name(bench, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(bench["data"] / "Brain_AD", data / "Knee_AD")
    argv = tiny_argv(data, bench["clip"], tmp_path / "ckpt", tmp_path / "out", "Knee", "--shot", "1", "--epoch", "0")
    code, _, err = run_script(cli.main_train_few, argv, capsys)
    assert code == 2 and "--prompt_name" in err
    code, printed, _ = run_script(cli.main_train_few, argv + ["--prompt_name", "knee MRI"], capsys)
    assert code == 0 and "Knee AUC : " in printed


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the path or flag, exit code 2, no results written.


def copy_brain(bench, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(bench["data"] / "Brain_AD", data / "Brain_AD")
    return data


def first_file(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def break_missing_split(data: Path) -> str:
    shutil.rmtree(data / "Brain_AD" / "test")
    return "Brain_AD/test"


def break_empty_split(data: Path) -> str:
    for folder in ("good", "Ungood"):
        for path in (data / "Brain_AD" / "test" / folder / "img").iterdir():
            path.unlink()
    shutil.rmtree(data / "Brain_AD" / "test" / "Ungood" / "anomaly_mask")
    (data / "Brain_AD" / "test" / "Ungood" / "anomaly_mask").mkdir()
    return "Brain_AD/test"


def break_truncated_image(data: Path) -> str:
    image = first_file(data / "Brain_AD" / "test" / "good" / "img")
    image.write_bytes(image.read_bytes()[:100])
    return image.name


def break_mask_size(data: Path) -> str:
    mask = first_file(data / "Brain_AD" / "test" / "Ungood" / "anomaly_mask")
    Image.new("L", (32, 32)).save(mask)
    return mask.name


def break_missing_mask(data: Path) -> str:
    mask = first_file(data / "Brain_AD" / "test" / "Ungood" / "anomaly_mask")
    mask.unlink()
    return mask.name


def break_one_class(data: Path) -> str:
    shutil.rmtree(data / "Brain_AD" / "test" / "Ungood")
    (data / "Brain_AD" / "test" / "Ungood" / "img").mkdir(parents=True)
    (data / "Brain_AD" / "test" / "Ungood" / "anomaly_mask").mkdir()
    return "only normal"


def break_seed_file(data: Path) -> str:
    seeds = data.parent / "seeds" / "Brain"
    seeds.mkdir(parents=True)
    (seeds / "2-shot.txt").write_text("a-0: nope.png also.png\nn-0: x.png y.png\n")
    return "nope.png"


BREAKS = {
    "missing split": (break_missing_split, []),
    "empty split": (break_empty_split, []),
    "truncated image": (break_truncated_image, []),
    "mask size": (break_mask_size, []),
    "missing mask": (break_missing_mask, []),
    "one class": (break_one_class, []),
    "seed file names absent images": (break_seed_file, ["SEEDS"]),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_bad_data_gives_one_line(bench, tmp_path, capsys, case):
    data = copy_brain(bench, tmp_path)
    breaker, extra = BREAKS[case]
    expected = breaker(data)
    extra = ["--fewshot_seed_dir", str(tmp_path / "seeds")] if extra == ["SEEDS"] else []
    out = tmp_path / "out"
    argv = tiny_argv(data, bench["clip"], tmp_path / "ckpt", out, "Brain", "--shot", "2", "--epoch", "1", *extra)
    code, _, err = run_script(cli.main_train_few, argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err
    assert not (out / "metrics.json").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--data_path", "/nonexistent/data"], "/nonexistent/data"),
        (["--obj", "Spleen"], "Spleen_AD"),
        (["--shot", "50"], "--shot"),
        (["--model_name", "ViT-Huge-99"], "ViT-L-14-336"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--select", "valid", "--shot", "6"], "--select valid"),
        (["--cuda_graph", "--device", "cpu"], "--cuda_graph replays the training step from CUDA graphs"),
    ],
)
def test_bad_flags_give_one_line(bench, tmp_path, capsys, flags, expected):
    argv = tiny_argv(bench["data"], bench["clip"], tmp_path / "ckpt", tmp_path / "out", "Brain", "--shot", "2", "--epoch", "1")
    code, _, err = run_script(cli.main_train_few, argv + flags, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_missing_clip_checkpoint_says_where_it_goes(bench, tmp_path, capsys):
    argv = tiny_argv(bench["data"], tmp_path / "absent.pt", tmp_path / "ckpt", tmp_path / "out", "Brain")
    code, _, err = run_script(cli.main_test_few, argv, capsys)
    assert code == 2 and "absent.pt" in err and len(err.strip().splitlines()) == 1
    argv = tiny_argv(bench["data"], tmp_path / "x.pt", tmp_path / "ckpt", tmp_path / "out", "Brain")
    argv[argv.index("--model_name") + 1] = "ViT-L-14-336"
    argv[argv.index("--clip_ckpt") : argv.index("--clip_ckpt") + 2] = []
    code, _, err = run_script(cli.main_test_few, argv, capsys)
    assert code == 2 and "CLIP/ckpt/ViT-L-14-336px.pt" in err


def test_checkpoint_of_another_architecture(bench, tmp_path, capsys):
    save = tmp_path / "ckpt"
    argv = tiny_argv(bench["data"], bench["clip"], save, tmp_path / "train", "Brain", "--shot", "2", "--epoch", "0")
    assert cli.main_train_few(argv) == 0
    capsys.readouterr()
    argv = tiny_argv(bench["data"], bench["clip"], save, tmp_path / "test", "Brain", "--shot", "2")
    argv[argv.index("--features_list") + 1 : argv.index("--features_list") + 5] = ["2", "4", "6"]
    code, _, err = run_script(cli.main_test_few, argv, capsys)
    assert code == 2 and "features_list" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_script(cli.main_test_few, argv + ["--checkpoint", str(tmp_path / "nope.pth")], capsys)
    assert code == 2 and "nope.pth" in err


@pytest.mark.parametrize("obj, select", [("Brain", "test"), ("Chest", "valid")])
def test_prefix_cache_changes_no_result(bench, tmp_path, capsys, obj, select):
    """Training and evaluating from cached frozen-block outputs equals the plain path bit for bit."""
    outputs = {}
    for mode in ("off", "on"):
        save, out = tmp_path / mode / "ckpt", tmp_path / mode / "out"
        argv = tiny_argv(bench["data"], bench["clip"], save, out, obj, "--shot", "2", "--epoch", "2",
                         "--select", select, "--prefix_cache", mode, "--eval_batch_size", "3")
        assert cli.main_train_few(argv) == 0
        outputs[mode] = (torch.load(next(save.iterdir()), weights_only=True), out)
    capsys.readouterr()
    (plain, plain_out), (cached, cached_out) = outputs["off"], outputs["on"]
    assert_same_adapters(plain, cached)
    assert read_csv(plain_out / "predictions.csv") == read_csv(cached_out / "predictions.csv")
    assert read_csv(plain_out / "train_log.csv") == read_csv(cached_out / "train_log.csv")


@pytest.mark.parametrize("mode, workers", [("on", "0"), ("off", "1")])
def test_zero_shot_sources_decoded_once_change_no_result(bench, tmp_path, capsys, mode, workers):
    """Zero-shot training from sources decoded once into memory (--prefix_cache on) or decoded by a
    worker process every epoch equals the release's path (decoded in the loop, every epoch)."""
    outputs = {}
    for tag, cache, num_workers in (("plain", "off", "0"), ("other", mode, workers)):
        save, out = tmp_path / tag / "ckpt", tmp_path / tag / "out"
        argv = tiny_argv(bench["data"], bench["clip"], save, out, "Liver", "--epoch", "2", "--select", "last",
                         "--prefix_cache", cache, "--num_workers", num_workers)
        assert cli.main_train_zero(argv) == 0
        outputs[tag] = (torch.load(next(save.iterdir()), weights_only=True), out)
    capsys.readouterr()
    (plain, plain_out), (other, other_out) = outputs["plain"], outputs["other"]
    assert_same_adapters(plain, other)
    assert read_csv(plain_out / "predictions.csv") == read_csv(other_out / "predictions.csv")


def test_test_few_from_a_half_precision_checkpoint_equals_its_fp32_copy(bench, tmp_path, capsys):
    """A test run keeps the visual weights in the checkpoint's dtype until its text features are
    computed and the text tower is dropped; then the frozen blocks stay in fp16 and run through an
    fp32 workspace block: the same results as fp32 weights."""
    weights = torch.load(bench["clip"], weights_only=True)
    half, full = tmp_path / "clip-fp16.pt", tmp_path / "clip-fp32.pt"
    torch.save({k: v.half() for k, v in weights.items()}, half)
    torch.save({k: v.half().float() for k, v in weights.items()}, full)
    torch.manual_seed(3)
    adapted = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES])
    save_checkpoint(adapted.adapter_state(), tmp_path / "adapters.pth")
    outputs = []
    for clip in (half, full):
        out = tmp_path / clip.stem
        argv = tiny_argv(bench["data"], clip, tmp_path / "ckpt", out, "Brain", "--shot", "2",
                         "--checkpoint", str(tmp_path / "adapters.pth"), "--cache_dir", "none")
        code, _, _ = run_script(cli.main_test_few, argv, capsys)
        assert code == 0
        outputs.append((json.loads((out / "metrics.json").read_text())["metrics"], read_csv(out / "predictions.csv")))
    (m16, p16), (m32, p32) = outputs
    assert p16 == p32
    assert {k: v for k, v in m16.items() if k != "seconds"} == {k: v for k, v in m32.items() if k != "seconds"}


@pytest.mark.parametrize("script, extra, dropped, workspace", [
    ("train_few", ["--shot", "1", "--epoch", "1", "--select", "last"], True, False),
    ("train_zero", ["--epoch", "1", "--select", "last"], True, False),
    ("test_few", ["--shot", "1"], True, True),
    ("test_zero", [], True, True),
])
def test_text_tower_and_block_storage_per_script(bench, tmp_path, capsys, monkeypatch, script, extra, dropped, workspace):
    """Every run frees the text tower once it has the features it needs (zero-shot training: the target's
    and each source's, encoded up front). Test runs keep the frozen blocks in the checkpoint's dtype
    behind the fp32 workspace; training runs compute with fp32 blocks."""
    from mvfa.method.text import TextFeatureBank

    calls = []
    drop, float_blocks = TextFeatureBank.drop_text_tower, AdaptedViT.float_with_block_workspace
    monkeypatch.setattr(TextFeatureBank, "drop_text_tower", lambda self: (calls.append("drop"), drop(self))[1])
    monkeypatch.setattr(AdaptedViT, "float_with_block_workspace",
                        lambda self: (calls.append("workspace"), float_blocks(self))[1])
    save = tmp_path / "ckpt"
    if script.startswith("test"):  # adapters to test: saved where the script looks for them
        torch.manual_seed(0)
        adapted = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES])
        save_checkpoint(adapted.adapter_state(), tmp_path / "adapters.pth")
        extra = [*extra, "--checkpoint", str(tmp_path / "adapters.pth")]
    argv = tiny_argv(bench["data"], bench["clip"], save, tmp_path / "out", "Brain", *extra)
    code, _, _ = run_script(getattr(cli, f"main_{script}"), argv, capsys)
    assert code == 0
    assert ("drop" in calls) == dropped and ("workspace" in calls) == workspace


def test_train_zero_with_an_unregistered_source_fails_before_building_the_model(bench, tmp_path, capsys):
    """A dataset folder whose name has no object word cannot be a zero-shot source: one line naming it
    and the fix, exit 2, nothing written (the check runs before CLIP is built)."""
    data = tmp_path / "data"
    for name in ("Liver_AD", "Brain_AD"):
        shutil.copytree(bench["data"] / name, data / name)
    shutil.copytree(bench["data"] / "Brain_AD", data / "Knee_AD")
    argv = tiny_argv(data, bench["clip"], tmp_path / "ckpt", tmp_path / "out", "Liver", "--epoch", "1")
    code, out, err = run_script(cli.main_train_zero, argv, capsys)
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Knee" in lines[0] and "mvfa.method.prompts.REAL_NAME" in lines[0], err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()
