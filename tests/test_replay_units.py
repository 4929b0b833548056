"""mvfa.runs.replay in small pieces: the release's DataLoader draws, Python-random epochs, and the stream
a random CLIP initialisation uses (../shared/METHOD.md section 8), checked against torch itself."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader

from CLIP.config import load_config
from mvfa.runs.replay import NORMAL, UNIFORM, BuildSizes, ReleaseRandom, clip_build_draws

# A made-up small build whose every normal draw of 16 or more elements is a multiple of 16 (the
# widths of every shipped config are), so the stream comparison below does not hit the rounding case.
SMALL = BuildSizes(
    vision_width=16, vision_layers=2, vision_mlp=32, patch=2, grid=3, embed=4,
    text_width=16, text_layers=3, text_mlp=32, context=5, vocab=11,
)


def hand_draws(s: BuildSizes) -> list[tuple[str, int]]:
    """METHOD.md section 8 written out: 8 + 7 Lv + 11 Lt draws, one per tensor, in order."""
    v, t = s.vision_width, s.text_width

    def block(width: int, mlp: int) -> list[tuple[str, int]]:
        return [
            (UNIFORM, width * width), (UNIFORM, width),  # attention out projection weight, bias
            (UNIFORM, 3 * width * width),  # packed in-projection (xavier)
            (UNIFORM, mlp * width), (UNIFORM, mlp),  # c_fc
            (UNIFORM, width * mlp), (UNIFORM, width),  # c_proj
        ]

    draws = [(UNIFORM, v * 3 * s.patch * s.patch), (NORMAL, v), (NORMAL, (s.grid**2 + 1) * v)]
    for _ in range(s.vision_layers):
        draws += block(v, s.vision_mlp)
    draws += [(NORMAL, v * s.embed), (NORMAL, s.vocab * t)]
    for _ in range(s.text_layers):
        draws += block(t, s.text_mlp)
    draws += [(NORMAL, s.vocab * t), (NORMAL, s.context * t)]
    for _ in range(s.text_layers):
        draws += [(NORMAL, 3 * t * t), (NORMAL, t * t), (NORMAL, s.text_mlp * t), (NORMAL, t * s.text_mlp)]
    draws.append((NORMAL, t * s.embed))
    return draws


def merged_uniform_runs(draws: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Consecutive uniform draws as one (a U(n) uses the stream like n single uniforms)."""
    out: list[tuple[str, int]] = []
    for kind, count in draws:
        if out and kind == UNIFORM and out[-1][0] == UNIFORM:
            out[-1] = (UNIFORM, out[-1][1] + count)
        else:
            out.append((kind, count))
    return out


def draw_for_real(generator: torch.Generator, draws: list[tuple[str, int]]) -> None:
    for kind, count in draws:
        tensor = torch.empty(count)
        tensor.uniform_(generator=generator) if kind == UNIFORM else tensor.normal_(generator=generator)


def same_state(a: torch.Generator, b: torch.Generator) -> bool:
    return torch.equal(a.get_state(), b.get_state())


# ------------------------------------------------------------------------------------------------
# DataLoader passes


def test_shuffled_pass_is_a_shuffling_dataloaders_order_under_the_global_seed():
    """shuffled_pass(n) is the order a shuffling DataLoader gives after torch.manual_seed(seed), pass after pass."""
    replay = ReleaseRandom(111)
    torch.manual_seed(111)
    loader = DataLoader(list(range(9)), batch_size=1, shuffle=True)
    for _ in range(3):
        expected = [int(batch) for batch in loader]
        assert replay.shuffled_pass(9) == expected
    assert [p["n"] for p in replay.passes] == [9, 9, 9]


def test_loader_pass_is_a_plain_dataloaders_base_seed_draw():
    """loader_pass() draws what iterating a non-shuffling DataLoader draws (one int64), so a later shuffled order agrees."""
    replay = ReleaseRandom(7)
    torch.manual_seed(7)
    list(DataLoader(list(range(4)), batch_size=2))  # not shuffled: the base seed only
    replay.loader_pass()
    shuffled = [int(b) for b in DataLoader(list(range(6)), batch_size=1, shuffle=True)]
    assert replay.shuffled_pass(6) == shuffled


def test_passes_are_reproducible_and_ignore_the_global_generator():
    """Two ReleaseRandom(seed) give the same passes whatever the global generator does in between, and never move it."""
    first = ReleaseRandom(3)
    torch.manual_seed(0)
    a = [first.shuffled_pass(12), first.loader_pass(), first.shuffled_pass(5)]
    second = ReleaseRandom(3)
    torch.manual_seed(99)
    torch.rand(1000)  # the global stream moves; the replay's must not care
    b = [second.shuffled_pass(12), second.loader_pass(), second.shuffled_pass(5)]
    assert a == b
    assert sorted(a[0]) == list(range(12)) and sorted(a[2]) == list(range(5))
    assert ReleaseRandom(4).shuffled_pass(12) != a[0]  # another seed, another order
    before = torch.get_rng_state()
    ReleaseRandom(3).shuffled_pass(12)
    assert torch.equal(torch.get_rng_state(), before)


def test_zero_shot_batches_are_pythons_shuffles_of_the_seeded_random():
    """Each source shuffled by random.Random(seed) and cut into batches, sources concatenated, the batch list shuffled."""
    sources = [[0, 1, 2, 3, 4], [5, 6, 7]]
    got = ReleaseRandom(21).zero_shot_batches(sources, 2)
    rng = random.Random(21)
    first, second = list(sources[0]), list(sources[1])
    rng.shuffle(first)
    rng.shuffle(second)
    expected = [first[0:2], first[2:4], first[4:5], second[0:2], second[2:3]]
    rng.shuffle(expected)
    assert got == expected
    assert sorted(len(b) for b in got) == [1, 1, 2, 2, 2]
    assert all(set(b) <= set(sources[0]) or set(b) <= set(sources[1]) for b in got)  # a batch never mixes sources


# ------------------------------------------------------------------------------------------------
# The build's draw list


def test_build_sizes_of_the_tiny_config():
    """BuildSizes.of reads widths, layers, MLP widths (width x 4), patch, embed, context and vocab off the config."""
    sizes = BuildSizes.of(load_config("ViT-Tiny-14"), grid=4)
    assert sizes == BuildSizes(128, 8, 512, 14, 4, 64, 64, 2, 256, 77, 49408)


def test_clip_build_draws_match_the_hand_count():
    """clip_build_draws lists METHOD.md's 8 + 7 Lv + 11 Lt draws, a block's seven uniforms as one entry."""
    hand = hand_draws(SMALL)
    assert len(hand) == 8 + 7 * SMALL.vision_layers + 11 * SMALL.text_layers == 55
    listed = clip_build_draws(SMALL)
    assert len(listed) == 8 + SMALL.vision_layers + 5 * SMALL.text_layers
    assert merged_uniform_runs(listed) == merged_uniform_runs(hand)
    assert listed[:3] == [(UNIFORM, 16 * 3 * 2 * 2), (NORMAL, 16), (NORMAL, 10 * 16)]
    vision_block = 16 * 16 + 16 + 3 * 16 * 16 + 32 * 16 + 32 + 16 * 32 + 16
    assert listed[3] == listed[4] == (UNIFORM, vision_block) == (UNIFORM, 2112)
    assert listed[5:7] == [(NORMAL, 16 * 4), (NORMAL, 11 * 16)]  # visual projection, token embedding module
    assert listed[-1] == (NORMAL, 16 * 4)  # text projection


def test_skipping_a_build_advances_the_stream_like_drawing_each_tensor():
    """_skip over clip_build_draws leaves the generator where 55 real per-tensor draws leave it."""
    replay = ReleaseRandom(5)
    for kind, count in clip_build_draws(SMALL):
        replay._skip(kind, count)
    real = torch.Generator().manual_seed(5)
    draw_for_real(real, hand_draws(SMALL))
    assert same_state(replay.torch, real)


def test_skip_clip_builds_uses_both_builds_draws():
    """Tiny at 56 px: build A (grid 8) and build B (grid 4) use 2 x 8193216 + 65 x 128 + 17 x 128 uniforms in all."""
    # Every tiny draw is a multiple of 16 elements, so each is that many uniforms. Per build, without
    # the positional embedding: conv1 75264, class 128, vision blocks 8 x 197376, projection 8192,
    # token embedding 2 x 3162112, text blocks 2 x 49536, context 4928, init pass 2 x 49152, text projection 4096.
    replay = ReleaseRandom(2)
    replay.skip_clip_builds(load_config("ViT-Tiny-14"), 56)
    real = torch.Generator().manual_seed(2)
    torch.empty(2 * 8193216 + (8 * 8 + 1) * 128 + (4 * 4 + 1) * 128).uniform_(generator=real)
    assert same_state(replay.torch, real)


# ------------------------------------------------------------------------------------------------
# _skip against torch's own kernels


@pytest.mark.parametrize("count", [5, 15, 16, 32, 1024])
def test_normal_skip_matches_torch_normal(count):
    """A NORMAL skip of n elements (n < 16: the scalar path; n a multiple of 16) moves the generator like torch's normal_."""
    replay = ReleaseRandom(9)
    replay._skip(NORMAL, count)
    real = torch.Generator().manual_seed(9)
    torch.empty(count).normal_(generator=real)
    assert same_state(replay.torch, real)


@pytest.mark.parametrize("count", [17, 100, 1000])
def test_normal_skip_matches_torch_normal_off_the_block(count):
    """A NORMAL skip of n elements, n >= 16 not a multiple of 16, moves the generator like torch's normal_."""
    replay = ReleaseRandom(9)
    replay._skip(NORMAL, count)
    real = torch.Generator().manual_seed(9)
    torch.empty(count).normal_(generator=real)
    assert same_state(replay.torch, real)


def test_torch_normal_off_the_block_uses_n_plus_16_uniforms():
    """The fact behind the count above: normal_ of 17, 100, 1000 floats uses 33, 116, 1016 uniforms
    (torch redraws the last block of 16; ../shared/METHOD.md section 8 says 'rounded up to 16')."""
    for count, uniforms in ((17, 33), (100, 116), (1000, 1016)):
        normal, uniform = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        torch.empty(count).normal_(generator=normal)
        torch.empty(uniforms).uniform_(generator=uniform)
        assert same_state(normal, uniform), count


@pytest.mark.parametrize("count", [1, 7, 8, 29])
def test_uniform_skip_in_small_chunks_matches_one_uniform_draw(count):
    """A UNIFORM skip through a buffer of 4 floats (several chunks) moves the generator like one uniform_ of n."""
    replay = ReleaseRandom(13, buffer_floats=4)
    replay._skip(UNIFORM, count)
    assert replay._buffer.numel() == 4
    real = torch.Generator().manual_seed(13)
    torch.empty(count).uniform_(generator=real)
    assert same_state(replay.torch, real)


def test_normal_skip_in_small_chunks_matches_torch_normal():
    """A NORMAL skip of 64 floats through a buffer of 5 moves the generator like normal_ of 64."""
    replay = ReleaseRandom(13, buffer_floats=5)
    replay._skip(NORMAL, 64)
    real = torch.Generator().manual_seed(13)
    torch.empty(64).normal_(generator=real)
    assert same_state(replay.torch, real)
