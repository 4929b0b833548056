"""CLIP/ against open_clip (the independent reference) on a tiny OpenAI-style architecture with random
weights, loaded from every checkpoint form; attention against an explicit computation; the
activation switch; the full ViT-L/14-336 architecture at 240 px; the registered configs."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clip_helpers as helpers
from CLIP import create_model, list_models, load_config, tokenize
from CLIP.config import CONFIG_DIR
from CLIP.model import PackedAttention, QuickGELU

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py; `checkpoints` is there too


@pytest.fixture(scope="module")
def open_clip():
    """The reference; only the comparisons skip without it (attention, activation, configs still run)."""
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return tokenize(helpers.PROMPTS)


@pytest.fixture(scope="module")
def references(checkpoints, open_clip):
    """open_clip models: (quick_gelu, fp16-rounded weights) -> model at the training size."""
    fp16 = {key: value.half().float() for key, value in checkpoints.state_dict.items()}
    return {
        (quick_gelu, rounded): helpers.open_clip_with(fp16 if rounded else checkpoints.state_dict, quick_gelu)
        for quick_gelu in (True, False)
        for rounded in (False, True)
    }


def _embeddings(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_reference_is_openai_style(references):
    """The reference really is the OpenAI layout with the intended activations and head counts."""
    reference = references[(True, False)]
    visual = reference.visual
    assert visual.attn_pool is None and visual.pool_type == "tok" and not visual.final_ln_after_pool
    assert isinstance(visual.ln_pre, nn.LayerNorm) and visual.proj is not None
    assert reference.text_pool_type == "argmax"
    mask = reference.attn_mask
    assert torch.isinf(mask.triu(1)[0, 1:]).all() and (mask.tril() == 0).all()
    assert visual.transformer.resblocks[0].attn.num_heads == 2
    assert reference.transformer.resblocks[0].attn.num_heads == 2
    assert type(reference.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert type(references[(False, False)].transformer.resblocks[0].mlp.gelu) is nn.GELU


@pytest.mark.parametrize("form", ["plain", "nested", "prefixed", "archive"])
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_parity_every_checkpoint_form(checkpoints, references, tokens, form, quick_gelu):
    model = create_model(checkpoints.config, helpers.TRAIN_SIZE, pretrained=checkpoints.forms()[form], quick_gelu=quick_gelu)
    assert model.config.quick_gelu is quick_gelu
    reference = references[(quick_gelu, form == "archive")]  # the archive holds fp16-rounded weights
    images = helpers.sample_images(helpers.TRAIN_SIZE)
    ours_image, ours_text = _embeddings(model, images, tokens)
    ref_image, ref_text = _embeddings(reference, images, tokens)
    assert ours_image.shape == (2, helpers.EMBED_DIM) and ours_text.shape == (len(helpers.PROMPTS), helpers.EMBED_DIM)
    assert helpers.relative_error(ours_image, ref_image) < RTOL
    assert helpers.relative_error(ours_text, ref_text) < RTOL
    # the image-dependent part agrees too (not just a large input-independent component)
    assert helpers.relative_error(ours_image[0] - ours_image[1], ref_image[0] - ref_image[1]) < 10 * RTOL
    # not trivially passing: the other activation gives clearly different outputs
    other_image, other_text = _embeddings(references[(not quick_gelu, form == "archive")], images, tokens)
    assert helpers.relative_error(other_image, ref_image) > 100 * RTOL
    assert helpers.relative_error(other_text, ref_text) > 100 * RTOL


def test_fp16_archive_is_rounded_not_exact(checkpoints, references, tokens):
    """The archive's weights are fp16: loading it equals the fp16-rounded reference, not the fp32 one."""
    model = create_model(checkpoints.config, helpers.TRAIN_SIZE, pretrained=checkpoints.archive, quick_gelu=True)
    images = helpers.sample_images(helpers.TRAIN_SIZE)
    ours = _embeddings(model, images, tokens)[0]
    assert helpers.relative_error(ours, _embeddings(references[(True, True)], images, tokens)[0]) < RTOL
    assert helpers.relative_error(ours, _embeddings(references[(True, False)], images, tokens)[0]) > 10 * RTOL
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("form", ["plain", "archive"])
def test_positional_resampling_matches_open_clip(checkpoints, tokens, form, open_clip):
    """img_size 42 -> a 3 x 3 grid from the trained 4 x 4: open_clip's bicubic, antialiased resize."""
    source = checkpoints.state_dict
    if form == "archive":
        source = {key: value.half().float() for key, value in source.items()}
    model = create_model(checkpoints.config, helpers.OTHER_SIZE, pretrained=checkpoints.forms()[form], quick_gelu=True)
    reference = helpers.open_clip_with(source, quick_gelu=True, image_size=helpers.OTHER_SIZE)
    resized = {"visual.positional_embedding": source["visual.positional_embedding"].clone()}
    open_clip.model.resize_pos_embed(resized, reference)  # bicubic, antialias=True, align_corners=False
    expected = resized["visual.positional_embedding"]
    ours = model.visual.positional_embedding.detach()
    assert ours.shape == expected.shape == (1 + 3 * 3, helpers.VISION["width"])
    assert (ours - expected).abs().max() < 1e-6
    assert torch.equal(ours[0], source["visual.positional_embedding"][0])  # the class position is kept
    assert not torch.allclose(ours[1:], source["visual.positional_embedding"][1:10])  # it really was resampled
    images = helpers.sample_images(helpers.OTHER_SIZE)
    ours_image, ref_image = _embeddings(model, images, tokens)[0], _embeddings(reference, images, tokens)[0]
    assert helpers.relative_error(ours_image, ref_image) < RTOL


def test_resampling_on_the_fly_equals_resampling_at_load(checkpoints):
    """A model built for 56 px fed 42 px images resamples its grid the same way loading at 42 does."""
    at_56 = create_model(checkpoints.config, helpers.TRAIN_SIZE, pretrained=checkpoints.plain)
    at_42 = create_model(checkpoints.config, helpers.OTHER_SIZE, pretrained=checkpoints.plain)
    images = helpers.sample_images(helpers.OTHER_SIZE)
    with torch.no_grad():
        assert helpers.relative_error(at_56.encode_image(images), at_42.encode_image(images)) < 1e-6
    # 55 px: the last 13 pixel rows/columns fall outside the 3 x 3 patch grid, as 240 px does for 14 px patches
    with torch.no_grad():
        assert at_42.visual.embed(helpers.sample_images(55)).shape == (2, 1 + 3 * 3, helpers.VISION["width"])


# --- attention -------------------------------------------------------------------------------


def _explicit_attention(attention: PackedAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    batch, tokens, width = x.shape
    heads = attention.heads
    head_width = width // heads
    qkv = x @ attention.in_proj_weight.T + attention.in_proj_bias
    q, k, v = qkv.split(width, dim=-1)
    outputs = []
    for head in range(heads):
        part = slice(head * head_width, (head + 1) * head_width)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(head_width)
        if causal:
            scores = scores + torch.full((tokens, tokens), float("-inf")).triu(1)
        outputs.append(torch.softmax(scores, dim=-1) @ v[..., part])
    return torch.cat(outputs, dim=-1) @ attention.out_proj.weight.T + attention.out_proj.bias


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_attention_equals_explicit_softmax(causal):
    torch.manual_seed(0)
    attention = PackedAttention(width=32, heads=4)
    with torch.no_grad():
        attention.in_proj_bias.normal_(0, 0.1)
        attention.out_proj.bias.normal_(0, 0.1)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        ours = attention(x, causal=causal)
        expected = _explicit_attention(attention, x, causal)
    assert ours.shape == (3, 7, 32)
    assert (ours - expected).abs().max() < 1e-6
    if causal:  # the first token sees only itself: changing later tokens leaves it alone
        changed = x.clone()
        changed[:, 1:] += 1.0
        with torch.no_grad():
            assert torch.allclose(attention(changed, causal=True)[:, 0], ours[:, 0], atol=1e-6)


# --- activation ------------------------------------------------------------------------------


def _activations(model) -> list[type]:
    return [type(module) for module in model.modules() if isinstance(module, (nn.GELU, QuickGELU))]


def test_quick_gelu_switch(tmp_path):
    blocks = helpers.VISION["layers"] + helpers.TEXT["layers"]
    default = create_model(helpers.write_config(tmp_path / "default.json"))
    assert _activations(default) == [nn.GELU] * blocks
    assert all(m.approximate == "none" for m in default.modules() if isinstance(m, nn.GELU))
    quick_path = helpers.write_config(tmp_path / "quick.json", quick_gelu=True)
    assert load_config(quick_path).quick_gelu is True
    assert _activations(create_model(quick_path)) == [QuickGELU] * blocks
    assert _activations(create_model(quick_path, quick_gelu=False)) == [nn.GELU] * blocks
    assert _activations(create_model(helpers.write_config(tmp_path / "off.json", quick_gelu=False), quick_gelu=True)) == [
        QuickGELU
    ] * blocks
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


# --- full-size architectures -----------------------------------------------------------------


def test_vit_l_14_336_at_240():
    """MVFA's backbone with random weights: 240 px -> 17 x 17 patches + class token, 24 blocks of 1024."""
    model = create_model("ViT-L-14-336", 240)
    visual = model.visual
    assert len(visual.transformer.resblocks) == 24
    assert visual.transformer.resblocks[0].attn.heads == 16
    assert tuple(visual.proj.shape) == (1024, 768)
    assert tuple(visual.conv1.weight.shape) == (1024, 3, 14, 14)
    assert tuple(visual.positional_embedding.shape) == (1 + 17 * 17, 1024)
    assert len(model.transformer.resblocks) == 12 and model.transformer.resblocks[0].attn.heads == 12
    assert tuple(model.text_projection.shape) == (768, 768)
    assert model.config.quick_gelu is False
    with torch.no_grad():
        tokens = visual.embed(torch.zeros(1, 3, 240, 240))
        assert tokens.shape == (1, 290, 1024)
        assert visual.transformer.resblocks[0](tokens).shape == (1, 290, 1024)  # one block, not all 24
        assert visual.pool(tokens).shape == (1, 768)


EXPECTED_SIZES = {
    # name: (embed, vision image/layers/width/patch/heads, text width/heads/layers, OpenAI file)
    "ViT-L-14-336": (768, (336, 24, 1024, 14, 16), (768, 12, 12), "ViT-L-14-336px.pt"),
    "ViT-L-14": (768, (224, 24, 1024, 14, 16), (768, 12, 12), "ViT-L-14.pt"),
    "ViT-B-16": (512, (224, 12, 768, 16, 12), (512, 8, 12), "ViT-B-16.pt"),
    "ViT-B-32": (512, (224, 12, 768, 32, 12), (512, 8, 12), "ViT-B-32.pt"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_registered_configs(name):
    assert name in list_models()
    embed, vision, text, openai_file = EXPECTED_SIZES[name]
    config = load_config(name)
    v, t = config.vision, config.text
    assert config.name == name and config.embed_dim == embed
    assert (v.image_size, v.layers, v.width, v.patch_size, v.heads) == vision
    assert (t.width, t.heads, t.layers, t.context_length, t.vocab_size) == (*text, 77, 49408)
    assert config.openai_file == openai_file
    assert config.openai_sha256 and len(config.openai_sha256) == 64
    assert config.quick_gelu is False  # the release's configs leave QuickGELU off


def test_registered_config_files_are_release_format():
    for name in list_models():
        raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        assert {"embed_dim", "vision_cfg", "text_cfg"} <= set(raw)


def test_vit_b_32_builds_and_runs():
    model = create_model("ViT-B-32")
    assert tuple(model.visual.positional_embedding.shape) == (1 + 7 * 7, 768)
    with torch.no_grad():
        image = model.encode_image(torch.zeros(1, 3, 224, 224), normalize=True)
        text = model.encode_text(tokenize(["a photo of a brain."]), normalize=True)
    assert image.shape == text.shape == (1, 512)
    assert torch.allclose(image.norm(dim=-1), torch.ones(1)) and torch.isfinite(text).all()
    assert F.cosine_similarity(image, text).abs().item() <= 1.0 + 1e-6
