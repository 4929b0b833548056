"""Checkpoint forms and bad input: every failure is the right CLIP.errors class with one line that names
the path or key at fault."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
import shutil

import pytest
import torch

import clip_helpers as helpers
from CLIP import CheckpointError, ConfigError, create_model, list_models, load_config, tokenize
from CLIP.clip import openai_checkpoint_path
from CLIP.config import CKPT_DIR
from CLIP.loading import OPENAI_METADATA_KEYS, infer_config, is_torchscript_archive, read_state_dict

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),  # conftest.py; `checkpoints` is there too
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
]


# --- accepted forms --------------------------------------------------------------------------


def test_every_form_reads_to_the_same_state_dict(checkpoints):
    expected = checkpoints.state_dict
    for form, path in checkpoints.forms().items():
        state_dict = read_state_dict(path)
        assert set(state_dict) == set(expected), form
        for key, value in state_dict.items():
            if form == "archive":
                assert value.dtype == torch.float16
                assert torch.equal(value, expected[key].half()), key
            else:
                assert torch.equal(value, expected[key]), (form, key)


def test_archive_is_openai_format(checkpoints):
    assert is_torchscript_archive(checkpoints.archive)
    assert not any(is_torchscript_archive(path) for path in (checkpoints.plain, checkpoints.nested, checkpoints.config))
    raw = torch.jit.load(str(checkpoints.archive), map_location="cpu").state_dict()
    assert set(raw) == set(checkpoints.state_dict) | set(OPENAI_METADATA_KEYS)
    assert {key: int(raw[key]) for key in OPENAI_METADATA_KEYS} == helpers.OPENAI_METADATA
    assert {raw[key].dtype for key in checkpoints.state_dict} == {torch.float16}


def test_infer_config_from_shapes(checkpoints):
    config = infer_config(read_state_dict(checkpoints.archive))
    expected = load_config(checkpoints.config)
    assert config.embed_dim == expected.embed_dim
    assert config.vision == expected.vision
    text, want = config.text, expected.text
    assert (text.width, text.layers, text.context_length, text.vocab_size) == (want.width, want.layers, 77, 49408)


def test_golden_archive_and_state_dict_agree(golden_dir):
    """The release fixture's two forms of the same weights load to identical models."""
    config = golden_dir / "config.json"
    assert is_torchscript_archive(golden_dir / "clip_jit.pt")
    models = [create_model(config, 84, pretrained=golden_dir / name) for name in ("clip_jit.pt", "clip_state_dict.pt")]
    images = helpers.sample_images(84, count=1)
    with torch.no_grad():
        first, second = (model.encode_image(images) for model in models)
    assert torch.equal(first, second)


# --- missing and unreadable checkpoints ------------------------------------------------------


def test_missing_checkpoint(checkpoints, tmp_path):
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(CheckpointError) as err:
        create_model(checkpoints.config, pretrained=missing)
    message = helpers.one_line(err)
    assert str(missing) in message and "not found" in message


def test_missing_openai_weights_say_where_they_go():
    expected = openai_checkpoint_path(load_config("ViT-L-14-336"))
    assert expected == CKPT_DIR / "ViT-L-14-336px.pt"
    if expected.exists():
        pytest.skip(f"{expected} is present")
    with pytest.raises(CheckpointError) as err:
        create_model("ViT-L-14-336", 240, pretrained="openai")  # fails before building the 430M-parameter model
    message = helpers.one_line(err)
    assert "CLIP/ckpt/ViT-L-14-336px.pt" in message.replace("\\", "/")
    assert "ViT-L-14-336px.pt" in message


def test_openai_weights_of_a_custom_config(checkpoints):
    with pytest.raises(CheckpointError) as err:
        create_model(checkpoints.config, pretrained="openai")
    assert "no OpenAI weights" in helpers.one_line(err) and "tiny" in str(err.value)


@pytest.mark.parametrize("form", ["plain", "archive"])
def test_truncated_checkpoint(checkpoints, tmp_path, form):
    data = checkpoints.forms()[form].read_bytes()
    truncated = tmp_path / f"truncated_{form}.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        create_model(checkpoints.config, pretrained=truncated)
    message = helpers.one_line(err)
    assert str(truncated) in message and "not a readable CLIP checkpoint" in message


@pytest.mark.parametrize(
    "content",
    [b"hello world\nthis is not a checkpoint\n", b"a", b"", b'{"json": true}\n', b"PK\x03\x04 not a zip"],
    ids=["text", "one-byte", "empty", "json", "fake-zip"],
)
def test_not_a_checkpoint(checkpoints, tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        create_model(checkpoints.config, pretrained=path)
    assert str(path) in helpers.one_line(err)


@pytest.mark.parametrize(
    "payload",
    [[torch.zeros(2)], torch.zeros(3), 7, {}, {"state_dict": []}],
    ids=["list", "tensor", "int", "empty-dict", "state_dict-list"],
)
def test_pickle_without_a_state_dict(tmp_path, payload):
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert str(path) in helpers.one_line(err)


def test_plain_pickle_is_refused(tmp_path):
    """A pickle of arbitrary objects is not unpickled (it could run code)."""
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"visual.conv1.weight": [1, 2, 3]}))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    message = helpers.one_line(err)
    assert str(path) in message and "weights_only=False" not in message


def test_non_tensor_entry_and_foreign_dict(checkpoints, tmp_path):
    bad_entry = tmp_path / "bad_entry.pt"
    torch.save({**checkpoints.state_dict, "visual.proj": 3}, bad_entry)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(bad_entry)
    assert "'visual.proj'" in helpers.one_line(err)
    foreign = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(foreign)
    assert "'visual.conv1.weight'" in helpers.one_line(err) and str(foreign) in str(err.value)


def test_checkpoint_path_is_a_folder(checkpoints, tmp_path):
    with pytest.raises(CheckpointError) as err:
        create_model(checkpoints.config, pretrained=tmp_path)
    assert str(tmp_path) in helpers.one_line(err)


# --- config / checkpoint mismatch ------------------------------------------------------------


def test_vision_width_mismatch(checkpoints, tmp_path):
    config = helpers.write_config(tmp_path / "narrow.json", width=96, head_width=32)
    with pytest.raises(CheckpointError) as err:
        create_model(config, pretrained=checkpoints.plain)
    message = helpers.one_line(err)
    assert "'visual.positional_embedding'" in message
    assert "(17, 128)" in message and "(17, 96)" in message and str(checkpoints.plain) in message
    with pytest.raises(CheckpointError) as err:  # without the grid check, the first key that differs
        create_model(config, pretrained=checkpoints.plain, check_config=False)
    message = helpers.one_line(err)
    assert "'visual.class_embedding'" in message and "(128,)" in message and "(96,)" in message


def test_text_width_mismatch(checkpoints, tmp_path):
    raw = helpers.config_dict()
    raw["text_cfg"]["width"] = 32
    config = tmp_path / "narrow_text.json"
    config.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        create_model(config, pretrained=checkpoints.archive)
    message = helpers.one_line(err)
    assert "'positional_embedding'" in message and "(77, 64)" in message and "(77, 32)" in message


def test_trained_grid_mismatch(checkpoints, tmp_path):
    config = helpers.write_config(tmp_path / "grid5.json", image_size=70)
    with pytest.raises(CheckpointError) as err:
        create_model(config, pretrained=checkpoints.plain)
    message = helpers.one_line(err)
    assert "'visual.positional_embedding'" in message and "(17, 128)" in message and "(26, 128)" in message


def test_missing_and_unexpected_keys(checkpoints, tmp_path):
    fewer = dict(checkpoints.state_dict)
    del fewer["transformer.resblocks.1.mlp.c_fc.bias"]
    torch.save(fewer, tmp_path / "fewer.pt")
    with pytest.raises(CheckpointError) as err:
        create_model(checkpoints.config, pretrained=tmp_path / "fewer.pt")
    assert "'transformer.resblocks.1.mlp.c_fc.bias'" in helpers.one_line(err)
    more = {**checkpoints.state_dict, "visual.transformer.resblocks.4.ln_1.weight": torch.ones(128)}
    torch.save(more, tmp_path / "more.pt")
    with pytest.raises(CheckpointError) as err:
        create_model(checkpoints.config, pretrained=tmp_path / "more.pt")
    assert "'visual.transformer.resblocks.4.ln_1.weight'" in helpers.one_line(err)


# --- configs ---------------------------------------------------------------------------------


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        create_model("ViT-H-99")
    message = helpers.one_line(err)
    assert "'ViT-H-99'" in message
    for name in ("ViT-L-14-336", "ViT-L-14", "ViT-B-16", "ViT-B-32"):
        assert name in list_models() and name in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "absent.json")
    assert str(tmp_path / "absent.json") in helpers.one_line(err)


@pytest.mark.parametrize("text", ['{"embed_dim": 64, "vision_cfg": {', "", "[1, 2]", "\xff\xfe"], ids=["cut", "empty", "list", "binary"])
def test_malformed_json_config(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        create_model(path)
    assert str(path) in helpers.one_line(err)


@pytest.mark.parametrize(
    "section, key",
    [(None, "embed_dim"), (None, "vision_cfg"), ("vision_cfg", "patch_size"), ("text_cfg", "layers")],
)
def test_config_missing_an_entry(tmp_path, section, key):
    raw = helpers.config_dict()
    del (raw if section is None else raw[section])[key]
    path = tmp_path / "incomplete.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        create_model(path)
    message = helpers.one_line(err)
    assert f"'{key}'" in message and "'incomplete'" in message


def test_config_bad_values(tmp_path):
    path = helpers.write_config(tmp_path / "odd_width.json", width=100)  # not a multiple of 64-wide heads
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "100" in helpers.one_line(err)
    raw = helpers.config_dict()
    raw["vision_cfg"]["layers"] = "many"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "many" in helpers.one_line(err)


def test_config_copied_beside_checkpoint_loads(checkpoints, tmp_path):
    """A config passed by path need not live in model_configs/ (the release passes its JSON by path)."""
    shutil.copy(checkpoints.config, tmp_path / "elsewhere.json")
    model = create_model(tmp_path / "elsewhere.json", pretrained=checkpoints.prefixed)
    assert model.config.name == "elsewhere" and not model.training


# --- the meta-device build: the same model as random initialisation + copy, without the copies ------


def _plain_path_model(config_path, size: int, checkpoint) -> torch.nn.Module:
    """The loading create_model replaced: a randomly initialised fp32 model, the whole checkpoint
    converted to fp32, then load_state_dict (which copies)."""
    from CLIP.model import CLIP, resample_positional_embedding

    model = CLIP(load_config(config_path), image_size=size)
    state_dict = read_state_dict(checkpoint)
    state_dict["visual.positional_embedding"] = resample_positional_embedding(
        state_dict["visual.positional_embedding"].float(), model.visual.grid_size
    )
    model.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return model.eval()


def _assert_same_model(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Tensor for tensor: names, classes, dtypes, shapes, values, contiguity, requires_grad, devices."""
    ours_tensors = dict([*ours.named_parameters(), *ours.named_buffers()])
    reference_tensors = dict([*reference.named_parameters(), *reference.named_buffers()])
    assert list(ours_tensors) == list(reference_tensors)
    assert [name for name, _ in ours.named_buffers()] == [name for name, _ in reference.named_buffers()]
    for name, tensor in ours_tensors.items():
        expected = reference_tensors[name]
        assert type(tensor) is type(expected), name
        assert tensor.device == expected.device and not tensor.is_meta, name
        assert tensor.dtype == expected.dtype == torch.float32, name
        assert tensor.shape == expected.shape and tensor.is_contiguous(), name
        assert tensor.requires_grad == expected.requires_grad, name
        assert torch.equal(tensor, expected), name
    assert ours.training == reference.training


@pytest.mark.parametrize("form", ["plain", "archive"])
@pytest.mark.parametrize("size", [helpers.TRAIN_SIZE, helpers.OTHER_SIZE])
def test_meta_build_equals_random_init_and_copy(checkpoints, form, size):
    path = checkpoints.forms()[form]
    ours = create_model(checkpoints.config, size, pretrained=path)
    reference = _plain_path_model(checkpoints.config, size, path)
    _assert_same_model(ours, reference)
    storages = {tensor.untyped_storage().data_ptr() for tensor in ours.parameters()}
    assert len(storages) == len(list(ours.parameters()))  # no two parameters share memory
    images = helpers.sample_images(size, count=1)
    with torch.no_grad():
        assert torch.equal(ours.encode_image(images), reference.encode_image(images))
        tokens = tokenize(helpers.PROMPTS)
        assert torch.equal(ours.encode_text(tokens), reference.encode_text(tokens))


def test_load_into_consume_empties_the_dict_and_keeps_nothing_of_it(checkpoints):
    from CLIP.clip import build_on_meta
    from CLIP.loading import load_into

    config = load_config(checkpoints.config)
    owned = {key: value.clone() for key, value in checkpoints.state_dict.items()}  # fp32: kept as is
    pointers = {value.data_ptr() for value in owned.values()}
    model = build_on_meta(config)
    load_into(model, owned, source="owned", consume=True)
    assert owned == {}
    assert any(p.data_ptr() in pointers for p in model.parameters())  # fp32 entries are taken over, not copied
    _assert_same_model(model.eval(), _plain_path_model(checkpoints.config, helpers.TRAIN_SIZE, checkpoints.plain))


def test_load_into_without_consume_leaves_the_callers_tensors_alone(checkpoints):
    from CLIP.clip import build_on_meta
    from CLIP.loading import load_into
    from CLIP.model import CLIP

    config = load_config(checkpoints.config)
    kept = dict(checkpoints.state_dict)
    pointers = {value.data_ptr() for value in kept.values()}
    for model in (build_on_meta(config), CLIP(config)):
        before = {name: p for name, p in model.named_parameters()}
        load_into(model, kept, source="kept")
        assert set(kept) == set(checkpoints.state_dict)
        assert not any(p.data_ptr() in pointers for p in model.parameters())  # fresh fp32 copies
        if not next(iter(before.values())).is_meta:  # a materialised model keeps its parameter objects
            assert all(before[name] is p for name, p in model.named_parameters())
        _assert_same_model(model.eval(), _plain_path_model(checkpoints.config, helpers.TRAIN_SIZE, checkpoints.plain))


def test_meta_load_errors_before_touching_the_dict(checkpoints):
    from CLIP.clip import build_on_meta
    from CLIP.loading import load_into

    fewer = {key: value for key, value in checkpoints.state_dict.items() if key != "ln_final.bias"}
    count = len(fewer)
    with pytest.raises(CheckpointError) as err:
        load_into(build_on_meta(load_config(checkpoints.config)), fewer, source="fewer", consume=True)
    assert "'ln_final.bias'" in helpers.one_line(err) and len(fewer) == count


def test_a_buffer_outside_the_state_dict_is_an_error_after_a_meta_build(checkpoints):
    from CLIP.clip import build_on_meta
    from CLIP.loading import load_into

    model = build_on_meta(load_config(checkpoints.config))
    with torch.device("meta"):
        model.visual.register_buffer("mask", torch.ones(3), persistent=False)
    with pytest.raises(CheckpointError) as err:
        load_into(model, dict(checkpoints.state_dict), source="weights")
    assert "'visual.mask'" in helpers.one_line(err)


def test_loading_weights_skips_random_initialisation_and_torch_dynamo(tmp_path):
    """A checkpoint-backed build runs no initialiser on real storage and never imports torch._dynamo
    (which `normal_` or out-of-place arithmetic on meta tensors would: 1.4 s, 0.16 GB)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(create_model("ViT-Tiny-14").state_dict(), path)
    code = (
        "import sys, torch\n"
        "from CLIP import create_model\n"
        f"model = create_model('ViT-Tiny-14', pretrained={str(path)!r})\n"
        f"reference = torch.load({str(path)!r}, weights_only=True)\n"
        "assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "False", out.stderr


SEED0_TINY_SHA256 = "72cc1bd3db898cdc5848ffff0fa6f01c2664ae6e8131c3f4514245059e82428f"


def test_seeded_random_initialisation_is_unchanged():
    """Known answer: the seed-0 ViT-Tiny-14 the tests and the demo draw (its weights set what
    tests/test_learning.py measured). Recorded with torch 2.14 before the random parameters were
    scaled in place (`randn(...).mul_(scale)` instead of `scale * randn(...)`); the draw is bitwise the same."""
    import hashlib

    torch.manual_seed(0)
    state = create_model("ViT-Tiny-14").state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    assert digest.hexdigest() == SEED0_TINY_SHA256


def test_visual_weights_kept_in_the_checkpoint_dtype_convert_to_the_same_fp32_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny-fp16.pt"
    torch.save({k: v.half() for k, v in create_model("ViT-Tiny-14").state_dict().items()}, path)
    plain = create_model("ViT-Tiny-14", 56, pretrained=path)
    deferred = create_model("ViT-Tiny-14", 56, pretrained=path, keep_dtype_of=("visual.",))
    for name, tensor in deferred.state_dict().items():
        kept = name.startswith("visual.") and name != "visual.positional_embedding"  # resampled in fp32 at load
        assert tensor.dtype == (torch.float16 if kept else torch.float32), name
    deferred.visual.float()
    reference = plain.state_dict()
    assert all(t.dtype == torch.float32 and t.is_contiguous() and torch.equal(t, reference[k])
               for k, t in deferred.state_dict().items())
