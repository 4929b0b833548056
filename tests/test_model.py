"""AdaptedViT's public view of the backbone: forward_intermediates, run_blocks, depth, width, embed_dim."""
from __future__ import annotations

import pytest
import torch

from CLIP import create_model
from mvfa.method.model import AdaptedViT
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

STAGES = [int(s) for s in TINY_STAGES]


@pytest.fixture(scope="module")
def model() -> AdaptedViT:
    torch.manual_seed(0)
    return AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), STAGES).eval()


def test_intermediates_are_the_frozen_stream_block_by_block(model):
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.visual.embed(images)
        expected = []
        for block in model.visual.transformer.resblocks[:5]:
            x = block(x)
            expected.append(x)
        found = model.forward_intermediates(images, [1, 3, 5])
    assert [tuple(t.shape) for t in found] == [(2, (TINY_SIZE // 14) ** 2 + 1, model.width)] * 3
    for number, tensor in zip([1, 3, 5], found):
        assert torch.equal(tensor, expected[number - 1])
    assert torch.equal(model.encode_prefix(images), expected[STAGES[0] - 1])  # the prefix is the first stage's stream


def test_intermediates_record_autograd_when_asked(model):
    images = torch.rand(1, 3, TINY_SIZE, TINY_SIZE, requires_grad=True)
    (stream,) = model.forward_intermediates(images, [2])
    stream.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("indices", [[], [0], [3, 2], [2, 2], [99]])
def test_bad_block_numbers_are_refused(model, indices):
    with pytest.raises(ValueError, match=f"between 1 and {model.depth}"):
        model.forward_intermediates(torch.zeros(1, 3, TINY_SIZE, TINY_SIZE), indices)


def test_sizes_come_from_the_model(model):
    assert model.depth == len(model.visual.transformer.resblocks)
    assert model.width == model.visual.conv1.out_channels and model.embed_dim == model.visual.proj.shape[1]
