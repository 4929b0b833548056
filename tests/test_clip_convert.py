"""`python -m CLIP.convert`: OpenAI TorchScript archive -> plain state dict through the safe reader, a
line on whether the input is OpenAI's published file, atomic write, no overwrite without --force,
one-line errors. (Hostile archives through convert: tests/test_clip_safe_archive.py.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_helpers as helpers
from CLIP import create_model, tokenize
from CLIP.convert import main
from CLIP.loading import OPENAI_METADATA_KEYS, infer_config, read_state_dict, sha256_of

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py; `checkpoints` is there too


def _leftovers(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


def test_convert_archive(checkpoints, tmp_path, capsys):
    output = tmp_path / "out" / "tiny_state_dict.pt"  # the folder is created
    assert main([str(checkpoints.archive), str(output)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    state_dict = torch.load(output, map_location="cpu", weights_only=True)
    assert type(state_dict) is dict and set(state_dict) == set(checkpoints.state_dict)
    assert not set(OPENAI_METADATA_KEYS) & set(state_dict)
    for key, value in state_dict.items():  # original dtype, same values
        assert value.dtype == torch.float16 and torch.equal(value, checkpoints.state_dict[key].half()), key
    assert f"wrote {len(checkpoints.state_dict)} tensors" in captured.out
    assert str(output) in captured.out and sha256_of(output) in captured.out
    assert "vision width 128, 4 blocks, patch 14" in captured.out and "trained at 56 px" in captured.out
    assert "registered config" not in captured.out
    assert _leftovers(output.parent) == []

    images, tokens = helpers.sample_images(helpers.TRAIN_SIZE), tokenize(helpers.PROMPTS)
    direct = create_model(checkpoints.config, helpers.TRAIN_SIZE, pretrained=checkpoints.archive)
    converted = create_model(checkpoints.config, helpers.TRAIN_SIZE, pretrained=output)
    with torch.no_grad():
        assert torch.equal(direct.encode_image(images), converted.encode_image(images))
        assert torch.equal(direct.encode_text(tokens), converted.encode_text(tokens))


def test_convert_golden_archive_equals_its_state_dict(golden_dir, tmp_path, capsys):
    output = tmp_path / "golden.pt"
    assert main([str(golden_dir / "clip_jit.pt"), str(output)]) == 0
    converted = torch.load(output, weights_only=True)
    expected = read_state_dict(golden_dir / "clip_state_dict.pt")
    assert set(converted) == set(expected)
    assert all(converted[key].dtype == expected[key].dtype and torch.equal(converted[key], expected[key]) for key in expected)
    assert "trained at 112 px" in capsys.readouterr().out


def test_convert_plain_forms_too(checkpoints, tmp_path, capsys):
    """Any accepted form converts (e.g. a `module.`-prefixed fp32 dict becomes a clean one)."""
    output = tmp_path / "clean.pt"
    assert main([str(checkpoints.prefixed), str(output)]) == 0
    converted = torch.load(output, weights_only=True)
    assert set(converted) == set(checkpoints.state_dict)
    assert all(torch.equal(converted[key], value) for key, value in checkpoints.state_dict.items())


def test_sha256_is_information_not_a_gate(checkpoints, tmp_path, capsys):
    """An archive under OpenAI's file name for ViT-B-32 that is not OpenAI's file: it is read as data
    (nothing in it is run, so the sha256 guards nothing), converted, and one line says it is not OpenAI's."""
    fake = tmp_path / "in" / "ViT-B-32.pt"
    fake.parent.mkdir()
    shutil.copy(checkpoints.archive, fake)
    output = tmp_path / "out" / "ViT-B-32.state_dict.pt"
    assert main([str(fake), str(output)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    notes = [line for line in captured.out.splitlines() if line.startswith("input sha256")]
    assert notes == [
        f"input sha256 {sha256_of(fake)}: not OpenAI's published ViT-B-32.pt (config ViT-B-32, sha256 "
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af); its weights were read as data, "
        "nothing in the file was run"
    ]
    assert set(torch.load(output, weights_only=True)) == set(checkpoints.state_dict)


def test_sha256_line_names_the_published_file_it_matches(checkpoints, tmp_path, capsys, monkeypatch):
    """Registered by architecture too (any file name): a config whose published sha256 is this archive's."""
    import dataclasses

    import CLIP.convert as convert

    real_load, real_list = convert.load_config, convert.list_models
    published = dataclasses.replace(infer_config(read_state_dict(checkpoints.archive)), name="tiny-published", openai_file="tiny.pt",
                                    openai_sha256=sha256_of(checkpoints.archive).upper())
    monkeypatch.setattr(convert, "list_models", lambda: [*real_list(), "tiny-published"])
    monkeypatch.setattr(convert, "load_config", lambda name: published if name == "tiny-published" else real_load(name))
    renamed = tmp_path / "renamed.pt"
    shutil.copy(checkpoints.archive, renamed)
    for source in (checkpoints.archive, renamed):
        assert main([str(source), str(tmp_path / "out.pt"), "--force"]) == 0
        out = capsys.readouterr().out
        assert f"input sha256 {sha256_of(source)}: OpenAI's published tiny.pt (config tiny-published)" in out.splitlines()
    assert main([str(checkpoints.plain), str(tmp_path / "out.pt"), "--force"]) == 0  # another form: not the published file
    assert "not OpenAI's published tiny.pt" in capsys.readouterr().out
    monkeypatch.undo()
    assert main([str(checkpoints.archive), str(tmp_path / "out.pt"), "--force"]) == 0  # nothing registered: no line
    assert "input sha256" not in capsys.readouterr().out


def test_missing_input(tmp_path, capsys):
    missing = tmp_path / "ViT-L-14-336px.pt"
    assert main([str(missing), str(tmp_path / "out.pt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: ") and str(missing) in captured.err
    assert not (tmp_path / "out.pt").exists()


def test_unreadable_input(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint\n")
    assert main([str(junk), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(junk) in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["junk.pt"]


def test_no_overwrite_without_force(checkpoints, tmp_path, capsys):
    output = tmp_path / "existing.pt"
    output.write_bytes(b"keep me")
    assert main([str(checkpoints.archive), str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and str(output) in err
    assert output.read_bytes() == b"keep me"
    assert main([str(checkpoints.archive), str(output), "--force"]) == 0
    assert set(torch.load(output, weights_only=True)) == set(checkpoints.state_dict)
    assert _leftovers(tmp_path) == []


def test_output_is_a_folder(checkpoints, tmp_path, capsys):
    assert main([str(checkpoints.archive), str(tmp_path), "--force"]) == 2
    assert "folder" in capsys.readouterr().err


def test_module_entry_point_prints_one_line(tmp_path):
    """`python -m CLIP.convert` with a missing input: exit 2, one line on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "CLIP.convert", str(tmp_path / "absent.pt"), str(tmp_path / "out.pt")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
