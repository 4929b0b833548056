"""The training batches of a few-shot and a zero-shot epoch (mvfa.runs.training): the release's orders,
batch sizes, what each batch carries, the listing rules, and --ddp's split of every step."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from PIL import Image
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset.medical import MedicalDataset, Sample
from dataset.tensors import TensorSet
from mvfa.method.prefix import PrefixCache
from mvfa.runs.replay import ReleaseRandom
from mvfa.runs.training import (
    few_shot_batches,
    listed_items,
    release_source_order,
    release_zero_shot_points,
    zero_shot_batches,
)
from mvfa.runtime.distributed import Dist
from mvfa.runtime.errors import MVFAError

SIZE = 16  # zero-shot image size (the sources' PNGs are 8 x 8 constant grey, resized)


def settings(**changes) -> SimpleNamespace:
    base = dict(epoch=1, learning_rate=1e-3, batch_size=1, precision="fp32", det_loss="release", select="test",
                ddp=False, seed=0, img_size=SIZE, num_workers=0)
    return SimpleNamespace(**{**base, **changes})


# ------------------------------------------------------------------------------------------------
# Few-shot


def support(count: int = 10, abnormal: int = 5, prefixes: bool = True) -> SimpleNamespace:
    """Support image i is filled with the value i (so is its prefix); the first `abnormal` have label 1."""
    ids = torch.arange(count, dtype=torch.float32)
    return SimpleNamespace(
        support_images=ids.view(-1, 1, 1, 1).expand(count, 3, 4, 4).clone(),
        support_masks=ids.view(-1, 1, 1, 1).expand(count, 1, 4, 4).clone(),
        support_labels=torch.cat([torch.ones(abnormal), torch.zeros(count - abnormal)]),
        support_prefixes=ids.view(-1, 1, 1).expand(count, 2, 3).clone() if prefixes else None,
    )


def ids_of(images: torch.Tensor) -> list[int]:
    return [int(v) for v in images[:, 0, 0, 0]]


def test_few_shot_epochs_follow_the_releases_loaders():
    """Each epoch visits the support in the order of a shuffling DataLoader after torch.manual_seed(seed), after the
    previous epoch's train, memory-bank (shuffled, the normal images) and test (plain) loader passes."""
    few = support()
    features = torch.randn(8, 2)
    batches = few_shot_batches(settings(batch_size=4, seed=111), few, features, True, ReleaseRandom(111))
    torch.manual_seed(111)
    for epoch in (1, 2, 3):
        expected = [int(i) for i in DataLoader(range(10), batch_size=1, shuffle=True)]
        list(DataLoader(range(5), batch_size=1, shuffle=True))  # the memory bank's support loader
        list(DataLoader(range(3)))  # the test loader
        got = batches(epoch)
        assert [len(b[0]) for b in got] == [4, 4, 2]
        assert sum((ids_of(b[0]) for b in got), []) == expected


def test_few_shot_epochs_replay_a_fresh_release_random():
    """The orders are ReleaseRandom(seed)'s: per epoch a train pass of n, a bank pass of the normal count, a loader pass."""
    few = support(count=7, abnormal=3)
    batches = few_shot_batches(settings(batch_size=3, seed=5), few, torch.zeros(8, 2), False, ReleaseRandom(5))
    fresh = ReleaseRandom(5)
    for epoch in (1, 2):
        order = fresh.shuffled_pass(7)
        fresh.shuffled_pass(4)
        fresh.loader_pass()
        got = batches(epoch)
        assert [len(b[0]) for b in got] == [3, 3, 1]
        assert sum((ids_of(b[0]) for b in got), []) == order


def test_few_shot_batch_contents():
    """A batch holds the chosen images with their masks, labels and prefixes, the shared text features, and has-masks flags."""
    few = support()
    features = torch.randn(8, 2)
    for has_masks in (True, False):
        for images, masks, labels, text, flags, prefix in few_shot_batches(
            settings(batch_size=4), few, features, has_masks, ReleaseRandom(0)
        )(1):
            ids = ids_of(images)
            assert [int(v) for v in masks[:, 0, 0, 0]] == ids
            assert labels.tolist() == [1.0 if i < 5 else 0.0 for i in ids]
            assert [int(v) for v in prefix[:, 0, 0]] == ids and prefix.shape[1:] == (2, 3)
            assert text is features
            assert flags.dtype == torch.bool and flags.tolist() == [has_masks] * len(ids)


def test_few_shot_without_prefixes_gives_none():
    """Without cached prefixes every batch's prefix is None."""
    batches = few_shot_batches(settings(batch_size=4), support(prefixes=False), torch.zeros(8, 2), True, ReleaseRandom(0))
    assert [b[5] for b in batches(1)] == [None, None, None]


# ------------------------------------------------------------------------------------------------
# Zero-shot: source order and listings


def named(*names: str) -> list[MedicalDataset]:
    return [MedicalDataset(name=n, root=Path(f"/nowhere/{n}_AD"), has_masks=False) for n in names]


def test_release_source_order():
    """Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, Histopathology, then any other dataset by name."""
    shuffled = named("Knee", "Histopathology", "Chest", "Abdomen", "Brain", "Retina_OCT2017", "Liver", "Retina_RESC")
    assert [d.name for d in release_source_order(shuffled)] == [
        "Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology", "Abdomen", "Knee",
    ]
    assert [d.name for d in release_source_order(named("Chest", "Liver"))] == ["Liver", "Chest"]


def listed_source() -> tuple[MedicalDataset, list[Sample]]:
    """A source without files: good a, b; Ungood c, d (in the sorted order of MedicalDataset.samples)."""
    source = named("Brain")[0]
    folder = source.root / "test"
    samples = [Sample(folder / "good/img" / n, 0) for n in ("a.png", "b.png")]
    samples += [Sample(folder / "Ungood/img" / n, 1) for n in ("c.png", "d.png")]
    return source, samples


def listing_from(table: dict[str, list[str]]):
    return lambda folder: list(table[Path(folder).parent.name])


def test_listed_items_follow_the_listing_good_then_ungood():
    """Indices (from `first`) in the listing's order, good before Ungood; listed files that are no sample are ignored."""
    source, samples = listed_source()
    listing = listing_from({"good": ["b.png", "Thumbs.db", "a.png"], "Ungood": ["d.png", "c.png", "notes.txt"]})
    assert listed_items(source, samples, 10, listing) == [11, 10, 13, 12]


@pytest.mark.parametrize("good, what", [(["b.png"], "missing a.png"), (["a.png", "b.png", "a.png"], "repeated names")])
def test_listing_that_misses_or_repeats_an_image_is_one_line(good, what):
    """A listing must name each image of the folder once: otherwise a one-line MVFAError naming the folder."""
    source, samples = listed_source()
    listing = listing_from({"good": good, "Ungood": ["c.png", "d.png"]})
    with pytest.raises(MVFAError) as err:
        listed_items(source, samples, 0, listing)
    message = str(err.value)
    assert "\n" not in message
    assert f"({what})" in message and "good/img" in message and "does not name each of its 2 images once" in message


# ------------------------------------------------------------------------------------------------
# Zero-shot epochs on real files


def write_source(root: Path, name: str, good: list[str], ungood: list[str], first_id: int, masks: bool) -> MedicalDataset:
    """<name>_AD/test with constant grey 8 x 8 PNGs; image number k (from first_id) has grey level 10 (k + 1)."""
    base = root / f"{name}_AD" / "test"
    level = first_id
    for kind, names in (("good", good), ("Ungood", ungood)):
        (base / kind / "img").mkdir(parents=True)
        for file in names:
            level += 1
            Image.fromarray(np.full((8, 8), 10 * level, np.uint8)).save(base / kind / "img" / file)
            if masks and kind == "Ungood":
                (base / kind / "anomaly_mask").mkdir(exist_ok=True)
                mask = np.zeros((8, 8), np.uint8)
                mask[2:6, 2:6] = 255
                Image.fromarray(mask).save(base / kind / "anomaly_mask" / file)
    return MedicalDataset.from_root(root / f"{name}_AD")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[MedicalDataset]:
    """Liver (no masks: ids 0-3) and Brain (masks: ids 4-8), given out of the release's order."""
    root = tmp_path_factory.mktemp("zero")
    liver = write_source(root, "Liver", ["l1.png", "l2.png"], ["l3.png", "l4.png"], 0, masks=False)
    brain = write_source(root, "Brain", ["b1.png", "b2.png", "b3.png"], ["b4.png", "b5.png"], 4, masks=True)
    return [liver, brain]


def reversed_listing(folder: Path) -> list[str]:
    """An unsorted file system: names in reverse order."""
    return sorted(p.name for p in Path(folder).iterdir())[::-1]


# Sample indices of the run (Brain first): Brain good b1 b2 b3 = 0 1 2, Ungood b4 b5 = 3 4; Liver 5 6 | 7 8.
# Their grey ids: Brain 5..9, Liver 1..4. Reversed listings give these item orders:
BRAIN_ITEMS, LIVER_ITEMS = [2, 1, 0, 4, 3], [6, 5, 8, 7]
ID_OF = {0: 5, 1: 6, 2: 7, 3: 8, 4: 9, 5: 1, 6: 2, 7: 3, 8: 4}
FEATURES = {"Brain": torch.full((8, 2), 1.0), "Liver": torch.full((8, 2), 2.0)}


def make_batches(sources, replay: ReleaseRandom, decode: bool = False, dist: Dist = Dist(), **changes):
    asked = []

    def may_decode(nbytes: int) -> bool:
        asked.append(nbytes)
        return decode

    config = settings(**changes)
    batches = zero_shot_batches(config, sources, lambda s: FEATURES[s.name], may_decode, replay, reversed_listing, dist)
    return batches, asked


def grey_ids(images: torch.Tensor) -> list[int]:
    return [round(float(v) * 255) // 10 for v in images[:, 0, 0, 0]]


def expected_epoch(fresh: ReleaseRandom, batch_size: int) -> list[list[int]]:
    release = fresh.zero_shot_batches([BRAIN_ITEMS, LIVER_ITEMS], batch_size)
    order = fresh.shuffled_pass(len(release))
    for _ in release_zero_shot_points(len(release)):
        fresh.loader_pass()
    return [release[i] for i in order]


@pytest.mark.parametrize("decode", [False, True])
def test_zero_shot_epochs_replay_the_release(sources, decode):
    """Two epochs: Brain then Liver, each in its listing's order, through ReleaseRandom's shuffles and loader draws."""
    replay = ReleaseRandom(111)
    batches, asked = make_batches(sources, replay, decode, batch_size=2, seed=111)
    assert asked == [9 * 3 * SIZE * SIZE]  # the decoding budget is asked once, for all nine images
    fresh = ReleaseRandom(111)
    for epoch in (1, 2):
        expected = expected_epoch(fresh, 2)
        epoch_batches = batches(epoch)
        assert len(epoch_batches) == len(expected) == 5  # Brain 2 + 2 + 1, Liver 2 + 2
        assert [grey_ids(b[0]) for b in epoch_batches] == [[ID_OF[i] for i in part] for part in expected]
        assert torch.equal(replay.torch.get_state(), fresh.torch.get_state())
        assert replay.python.getstate() == fresh.python.getstate()


def test_zero_shot_batch_contents(sources):
    """Each image comes with its label, its own dataset's text features and has-masks flag, and its mask (Brain's abnormal ones)."""
    batches, _ = make_batches(sources, ReleaseRandom(3), batch_size=2, seed=3)
    seen = []
    for images, masks, labels, features, flags, prefix in batches(1):
        assert prefix is None and images.shape[1:] == (3, SIZE, SIZE) and masks.shape[1:] == (1, SIZE, SIZE)
        for k, grey in enumerate(grey_ids(images)):
            brain = grey >= 5
            abnormal = grey in (8, 9, 3, 4)
            assert labels[k].item() == float(abnormal)
            assert torch.equal(features[k], FEATURES["Brain" if brain else "Liver"])
            assert flags[k].item() == brain
            assert masks[k].sum().item() == (SIZE // 2) ** 2 * (brain and abnormal)  # the middle quarter of the mask
            seen.append(grey)
    assert sorted(seen) == list(range(1, 10))


def test_decoded_and_read_batches_are_the_same(sources):
    """Decoding the sources once (may_decode allows it) gives the same batches as reading the files every epoch."""
    read, _ = make_batches(sources, ReleaseRandom(8), False, batch_size=3, seed=8)
    decoded, _ = make_batches(sources, ReleaseRandom(8), True, batch_size=3, seed=8)
    for a, b in zip(read(1), decoded(1), strict=True):
        for x, y in zip(a[:5], b[:5]):
            assert torch.equal(x, y)


def cached_test_split(source: MedicalDataset, whole: bool = True) -> TensorSet:
    """A source's test split decoded, with a prefix cache (batches of 2) whose row of image i is filled with
    its grey id; not `whole`: the second batch is not held (another rank's)."""
    data = TensorSet.load(source.samples("test"), SIZE)
    rows = grey_ids(data.images.float() / 255)
    batches = [torch.tensor(rows[i : i + 2], dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3).clone()
               for i in range(0, len(rows), 2)]
    data.prefix_cache = PrefixCache(2, batches if whole else batches[:1] + [None] * (len(batches) - 1))
    return data


def test_decoded_sources_with_whole_prefix_caches_give_each_image_its_prefix(sources):
    """Sources given decoded, each with its whole prefix cache (zero-shot targets trained together): each
    batch carries its images' cached prefix rows; a source without one (or with a part) gives no prefixes."""
    def batches_with(decoded):
        return zero_shot_batches(settings(batch_size=2, seed=4), sources, lambda s: FEATURES[s.name], lambda n: True,
                                 ReleaseRandom(4), reversed_listing, Dist(), decoded)(1)

    cached = {source.name: cached_test_split(source) for source in sources}
    for images, masks, labels, features, flags, prefix in batches_with(cached):
        assert prefix.shape == (len(images), 2, 3)
        assert [int(row[0, 0]) for row in prefix] == grey_ids(images)
    plain = {**cached, "Liver": TensorSet.load(sources[0].samples("test"), SIZE)}
    partial = {**cached, "Liver": cached_test_split(sources[0], whole=False)}
    for decoded in (plain, partial, {"Brain": cached["Brain"]}):
        assert all(batch[5] is None for batch in batches_with(decoded))


def test_ddp_ranks_split_each_step_of_the_single_process_batch(sources):
    """--ddp on 2 ranks with --batch_size 1: rank 0's and rank 1's parts of each step are the single process's batch of 2
    (a one-image batch leaves rank 1 an empty part)."""
    single, _ = make_batches(sources, ReleaseRandom(111), batch_size=2, seed=111)
    ranks = [make_batches(sources, ReleaseRandom(111), dist=Dist(rank=r, world_size=2), batch_size=1, ddp=True, seed=111)[0]
             for r in (0, 1)]
    whole = list(single(1))
    parts = [list(rank(1)) for rank in ranks]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 5
    empty = 0
    for batch, first, second in zip(whole, *parts):
        assert len(first[0]) == 1 and len(second[0]) in (0, 1)
        empty += len(second[0]) == 0
        for k in range(5):
            assert torch.equal(torch.cat([first[k], second[k]]), batch[k])
    assert empty == 1  # Brain's five images make one batch of one
    lone = next(second for first, second in zip(*parts) if len(second[0]) == 0)
    assert lone[0].shape == (0, 3, SIZE, SIZE) and lone[1].shape == (0, 1, SIZE, SIZE) and lone[2].shape == (0,)
