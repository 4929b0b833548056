"""The on-disk text-feature cache: an entry is used only for the text weights, word and format it was
computed for, with features of the right kind; any other entry is recomputed and atomically replaced
(one note); a cache folder that cannot be written means no disk cache for the run (one note)."""
from __future__ import annotations

import copy
from pathlib import Path
import shutil

import pytest
import torch

from tests import clip_helpers

from CLIP import create_model
from mvfa.method import text
from mvfa.method.text import CACHE_FORMAT, TextFeatureBank, default_cache_dir, encode_prompt_ensemble, text_tower_fingerprint

WORD = "brain"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from clip_helpers.one_torch_thread()


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return create_model("ViT-Tiny-14", 56)


@pytest.fixture(scope="module")
def fresh(tiny_clip) -> torch.Tensor:
    """The features the tiny model computes for WORD, without any cache."""
    return encode_prompt_ensemble(tiny_clip, WORD)


def notes(captured: str) -> list[str]:
    """The cache's notes (not the note that adapters without metadata cannot be checked against the run)."""
    return [line for line in captured.splitlines() if line.startswith("note:") and "has no metadata" not in line]


class Encodings:
    """Counts encode_prompt_ensemble calls (the real computation still runs)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        real = text.encode_prompt_ensemble

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(text, "encode_prompt_ensemble", counted)


def test_a_written_entry_records_its_key_and_is_read_back_silently(tiny_clip, fresh, tmp_path, capsys, monkeypatch):
    first = TextFeatureBank(tiny_clip, tmp_path)(WORD)
    path = TextFeatureBank(tiny_clip, tmp_path).cache_path(WORD)
    entry = torch.load(path, weights_only=True)
    assert set(entry) == {"format", "fingerprint", "object_word", "features"}
    assert (entry["format"], entry["fingerprint"], entry["object_word"]) == (CACHE_FORMAT, text_tower_fingerprint(tiny_clip), WORD)
    assert torch.equal(first, fresh) and torch.equal(entry["features"], fresh)
    encodings = Encodings(monkeypatch)
    assert torch.equal(TextFeatureBank(tiny_clip, tmp_path)(WORD), fresh)
    assert encodings.count == 0 and notes(capsys.readouterr().out) == []


def test_the_key_covers_every_text_weight_and_not_the_visual_tower(tiny_clip, tmp_path):
    path = TextFeatureBank(tiny_clip, tmp_path).cache_path(WORD)
    for name in [n for n in tiny_clip.state_dict() if not n.startswith("visual.")]:
        other = copy.deepcopy(tiny_clip)
        with torch.no_grad():
            other.state_dict()[name].view(-1)[0] += 2**-8
        assert TextFeatureBank(other, tmp_path).cache_path(WORD) != path, name
    other = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        other.visual.proj.add_(1.0)
    assert TextFeatureBank(other, tmp_path).cache_path(WORD) == path
    assert TextFeatureBank(tiny_clip, tmp_path).cache_path("liver") != path
    quick = create_model("ViT-Tiny-14", 56, quick_gelu=True)
    quick.load_state_dict(tiny_clip.state_dict())
    assert TextFeatureBank(quick, tmp_path).cache_path(WORD) != path  # the activation is part of the key


def test_an_entry_of_other_weights_is_not_used_even_under_this_key(tiny_clip, fresh, tmp_path, capsys):
    """Another model's entry (right shape, unit columns, readable) placed under this model's key."""
    torch.manual_seed(1)
    other = create_model("ViT-Tiny-14", 56)
    foreign = TextFeatureBank(other, tmp_path)(WORD)
    assert not torch.allclose(foreign, fresh)
    ours = TextFeatureBank(tiny_clip, tmp_path).cache_path(WORD)
    shutil.copy(TextFeatureBank(other, tmp_path).cache_path(WORD), ours)
    capsys.readouterr()
    assert torch.equal(TextFeatureBank(tiny_clip, tmp_path)(WORD), fresh)
    assert notes(capsys.readouterr().out) == [
        f"note: text-feature cache entry {ours} was computed for other text weights or another word; recomputing and replacing it"
    ]
    assert torch.load(ours, weights_only=True)["fingerprint"] == text_tower_fingerprint(tiny_clip)


def _entry(tiny_clip, **changes) -> dict:
    entry = {"format": CACHE_FORMAT, "fingerprint": text_tower_fingerprint(tiny_clip), "object_word": WORD,
             "features": torch.nn.functional.normalize(torch.ones(64, 2), dim=0)}
    entry.update(changes)
    return {key: value for key, value in entry.items() if value is not None}


MALFORMED = {
    "wrong-shape": (lambda m: _entry(m, features=torch.ones(32, 2) / 32**0.5), "of shape (32, 2), not float32 (64, 2)"),
    "fp16": (lambda m: _entry(m, features=torch.ones(64, 2).half() / 8), "torch.float16 features"),
    "nan": (lambda m: _entry(m, features=torch.full((64, 2), float("nan"))), "NaN or infinite"),
    "not-unit": (lambda m: _entry(m, features=torch.zeros(64, 2)), "not unit vectors"),
    "string-features": (lambda m: _entry(m, features="features"), "of type str, not a tensor"),
    "list-features": (lambda m: _entry(m, features=[[1.0, 0.0]] * 64), "of type list, not a tensor"),
    "no-features": (lambda m: {k: v for k, v in _entry(m).items() if k != "features"}, "of type NoneType"),
    "a-string": (lambda m: "hello", "holds a str, not a dict"),
    "a-tensor": (lambda m: torch.ones(64, 2), "holds a Tensor, not a dict"),
    "old-format": (lambda m: {"features": torch.ones(64, 2), "object_word": WORD}, "another format"),
    "other-word": (lambda m: _entry(m, object_word="liver"), "another word"),
}


@pytest.mark.parametrize("case", [*MALFORMED, "garbage-bytes", "empty-file"])
def test_a_malformed_entry_is_recomputed_and_replaced_once(tiny_clip, fresh, tmp_path, capsys, monkeypatch, case):
    path = TextFeatureBank(tiny_clip, tmp_path).cache_path(WORD)
    path.parent.mkdir(parents=True)
    if case == "garbage-bytes":
        path.write_bytes(b"\x80\x02garbage")
        expected = "is unreadable"
    elif case == "empty-file":
        path.write_bytes(b"")
        expected = "is unreadable"
    else:
        make, expected = MALFORMED[case]
        torch.save(make(tiny_clip), path)
    encodings = Encodings(monkeypatch)
    assert torch.equal(TextFeatureBank(tiny_clip, tmp_path)(WORD), fresh)
    lines = notes(capsys.readouterr().out)
    assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], lines
    assert lines[0].endswith("recomputing and replacing it") and encodings.count == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # replaced in place, no temporary left
    assert torch.equal(TextFeatureBank(tiny_clip, tmp_path)(WORD), fresh)  # the next run reads it, silently
    assert encodings.count == 1 and notes(capsys.readouterr().out) == []


def _unwritable(tmp_path: Path) -> Path:
    """A folder that cannot be created, even by root: its parent is a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    return blocker / "cache"


def test_an_unwritable_cache_dir_means_no_disk_cache_and_one_note(tiny_clip, fresh, tmp_path, capsys):
    cache_dir = _unwritable(tmp_path)
    bank = TextFeatureBank(tiny_clip, cache_dir)
    assert torch.equal(bank(WORD), fresh)
    lines = notes(capsys.readouterr().out)
    assert lines == [
        f"note: cannot write the text-feature cache in {cache_dir} (Not a directory); running without the disk "
        "cache (give a writable --cache_dir, or --cache_dir none)"
    ]
    bank("liver")  # later words: computed, no further note
    assert bank.cache_dir is None and notes(capsys.readouterr().out) == []


def test_an_entry_path_taken_by_a_folder(tiny_clip, fresh, tmp_path, capsys):
    path = TextFeatureBank(tiny_clip, tmp_path).cache_path(WORD)
    path.mkdir(parents=True)
    assert torch.equal(TextFeatureBank(tiny_clip, tmp_path)(WORD), fresh)
    lines = notes(capsys.readouterr().out)
    assert len(lines) == 1 and "running without the disk cache" in lines[0]
    assert path.is_dir() and [p.name for p in path.parent.iterdir()] == [path.name]


def test_an_unwritable_home_folder(tiny_clip, fresh, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a folder\n")
    monkeypatch.delenv("MVFA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(home))
    assert default_cache_dir() == home / ".cache" / "mvfa"
    assert torch.equal(TextFeatureBank(tiny_clip, default_cache_dir())(WORD), fresh)
    assert len(notes(capsys.readouterr().out)) == 1


def test_the_scripts_run_with_an_unusable_cache(tmp_path, capsys):
    """test_zero: an unwritable --cache_dir and then a corrupt entry each give one note and the same result."""
    import json

    from dataset.synthetic import generate_benchmark
    from mvfa import cli
    from mvfa.method.model import AdaptedViT, save_checkpoint
    from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES, tiny_argv, write_tiny_clip

    data = tmp_path / "data"
    generate_benchmark(data, seed=1, image_size=64, n_valid=(2, 2), n_test=(3, 3), datasets=["Liver"])
    clip_path = write_tiny_clip(tmp_path / "tiny.pt")
    torch.manual_seed(3)
    adapters = tmp_path / "adapters.pth"
    save_checkpoint(AdaptedViT(create_model(TINY_MODEL, TINY_SIZE, pretrained=clip_path), [int(s) for s in TINY_STAGES]).adapter_state(), adapters)

    def run(cache_dir: Path, out: str) -> tuple[dict, list[str]]:
        argv = tiny_argv(data, clip_path, tmp_path / "ckpt", tmp_path / out, "Liver", "--checkpoint", str(adapters),
                         "--cache_dir", str(cache_dir))
        assert cli.main_test_zero(argv) == 0
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return json.loads((tmp_path / out / "metrics.json").read_text())["metrics"], notes(captured.out)

    reference, lines = run(tmp_path / "cache", "first")
    assert lines == []
    metrics, lines = run(_unwritable(tmp_path), "unwritable")
    assert len(lines) == 1 and "running without the disk cache" in lines[0]
    entries = list((tmp_path / "cache" / "text").glob("*.pt"))
    assert len(entries) == 1
    entries[0].write_bytes(b"corrupt")
    repaired, repair_lines = run(tmp_path / "cache", "corrupt")
    again, again_lines = run(tmp_path / "cache", "again")
    assert len(repair_lines) == 1 and "recomputing and replacing it" in repair_lines[0] and again_lines == []
    for result in (metrics, repaired, again):
        assert {k: v for k, v in result.items() if k != "seconds"} == {k: v for k, v in reference.items() if k != "seconds"}
