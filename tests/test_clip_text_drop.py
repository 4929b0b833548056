"""CLIP.drop_text_tower: the image side is untouched, text encoding then fails with one line."""
from __future__ import annotations

import pytest
import torch

import clip_helpers as helpers
from CLIP import CLIPError, create_model, tokenize


def test_drop_text_tower_keeps_the_image_side():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-14", 56)
    images = helpers.sample_images(56)
    with torch.no_grad():
        before = model.encode_image(images)
        model.encode_text(tokenize(["a photo of a brain."]))
    visual = {name: tensor.clone() for name, tensor in model.state_dict().items() if name.startswith("visual.")}
    assert model.has_text_tower
    model.drop_text_tower()
    model.drop_text_tower()  # twice is harmless
    assert not model.has_text_tower
    assert set(model.state_dict()) == set(visual) | {"logit_scale"}
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in visual.items())
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), before)
        with pytest.raises(CLIPError) as err:
            model.encode_text(tokenize(["a photo of a brain."]))
    assert "\n" not in str(err.value) and "drop_text_tower" in str(err.value)
