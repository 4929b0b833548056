"""Reading a checkpoint's calibration back (mvfa.runs.calibrate): its normalisation statistics, and its
threshold only where it applies to the scoring mode at hand."""
from __future__ import annotations

import pytest
import torch

from mvfa.calibration.normalization import Normalization
from mvfa.method.memory_bank import MemoryBank
from mvfa.method.scorer import FewShotScorer, ScoringMode, ZeroShotScorer
from mvfa.runs.calibrate import stored_normalization, stored_threshold
from mvfa.runtime.errors import MVFAError

ZERO_WITH_MAPS = Normalization(0.1, 0.9, zero_map_low=0.2, zero_map_high=0.8, count=12, source="12 normal images")
FEW_WITHOUT_MASKS = Normalization(0.1, 0.9, few_score_low=0.3, few_score_high=0.6, count=4, source="4 normal images")


def scorer(mode: str, has_masks: bool) -> ScoringMode:
    return ScoringMode(mode, has_masks)


def test_a_scorer_states_its_scoring_mode():
    """A built scorer and the mode named before it exists need the same branches."""
    few = FewShotScorer(torch.zeros(8, 2), True, MemoryBank(None, None))
    assert few.scoring_mode == ScoringMode("few-shot", True)
    assert few.normalization_branches == ScoringMode("few-shot", True).normalization_branches == ("zero_map", "few_map")
    zero = ZeroShotScorer(torch.zeros(8, 2), False)
    assert zero.scoring_mode.normalization_branches == zero.normalization_branches == ("zero_score",)


def meta(norm: Normalization | None, mode: str = "zero-shot", threshold=0.42) -> dict:
    out = {"mode": mode, "normalization": None if norm is None else norm.to_dict()}
    if threshold is not None:
        out["threshold"] = threshold
    return out


def test_stored_normalization_reads_the_statistics_back():
    """The dict a checkpoint holds becomes the same Normalization."""
    assert stored_normalization(meta(ZERO_WITH_MAPS), "ck.pth") == ZERO_WITH_MAPS


@pytest.mark.parametrize("entry", [{}, {"normalization": None}, None, "not a dict"])
def test_stored_normalization_absent(entry):
    """No statistics (no entry, None, or meta that is no dict): None."""
    assert stored_normalization(entry, "ck.pth") is None


def test_stored_normalization_malformed_is_one_line():
    """Statistics with a non-number: a one-line MVFAError naming the checkpoint and the key."""
    bad = {"normalization": {**ZERO_WITH_MAPS.to_dict(), "zero_score_high": "high"}}
    with pytest.raises(MVFAError) as err:
        stored_normalization(bad, "ck.pth")
    assert str(err.value) == "the normalisation stored in ck.pth: zero_score_high is 'high', not a finite number"


@pytest.mark.parametrize("mode, has_masks, norm", [("zero-shot", True, ZERO_WITH_MAPS), ("zero-shot", False, ZERO_WITH_MAPS),
                                                  ("few-shot", False, FEW_WITHOUT_MASKS)])
def test_stored_threshold_of_the_same_mode(mode, has_masks, norm):
    """A threshold of the run's mode whose statistics cover the branches it scores: (threshold, statistics)."""
    assert stored_threshold(meta(norm, mode), "ck.pth", scorer(mode, has_masks)) == (0.42, norm)


def test_stored_threshold_of_another_mode_is_none():
    """A zero-shot checkpoint's threshold does not apply to few-shot scoring (nor the reverse)."""
    assert stored_threshold(meta(ZERO_WITH_MAPS, "zero-shot"), "ck.pth", scorer("few-shot", False)) is None
    assert stored_threshold(meta(FEW_WITHOUT_MASKS, "few-shot"), "ck.pth", scorer("zero-shot", False)) is None


@pytest.mark.parametrize("mode, has_masks, norm", [("few-shot", True, FEW_WITHOUT_MASKS), ("zero-shot", True, FEW_WITHOUT_MASKS)])
def test_stored_threshold_without_the_needed_branches_is_none(mode, has_masks, norm):
    """Statistics that lack a branch the scoring uses (few-shot maps; zero-shot maps): None."""
    assert stored_threshold(meta(norm, mode), "ck.pth", scorer(mode, has_masks)) is None


def test_stored_threshold_absent_is_none():
    """No threshold, or no statistics: None."""
    assert stored_threshold(meta(ZERO_WITH_MAPS, threshold=None), "ck.pth", scorer("zero-shot", False)) is None
    assert stored_threshold(meta(None), "ck.pth", scorer("zero-shot", False)) is None
    assert stored_threshold({}, "ck.pth", scorer("zero-shot", False)) is None


def test_stored_threshold_with_malformed_statistics_is_a_note(capsys):
    """Malformed statistics: no threshold, and one note saying why (the run goes on)."""
    bad = {"mode": "zero-shot", "threshold": 0.5, "normalization": {"zero_score_low": 0.0, "unknown": 1.0}}
    assert stored_threshold(bad, "ck.pth", scorer("zero-shot", False)) is None
    out = capsys.readouterr().out
    assert out.startswith("note: threshold not reported: the normalisation stored in ck.pth is malformed")
    assert out.count("\n") == 1
