"""Tests of mvfa.metrics against scikit-learn, hand-worked cases and a brute-force AUPRO."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import (average_precision_score, precision_recall_curve, roc_auc_score,
                             roc_curve)

from mvfa import metrics as M


# ------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------

def sk_f1_max(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    denom = p + r
    f1 = np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1.0), 0.0)
    return float(f1.max())


def random_case(rng, n, pos_rate=0.3, decimals=None, dtype=np.float64):
    y = rng.random(n) < pos_rate
    if y.all() or not y.any():
        y[0] = not y[0]
    s = rng.random(n)
    if decimals is not None:
        s = np.round(s, decimals)  # heavy ties
    return s.astype(dtype), y


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Per-threshold reference: every distinct score as a threshold, regions labelled per image."""
    maps = np.asarray(maps, dtype=np.float64).reshape(-1, *maps.shape[-2:])
    masks = np.asarray(masks, dtype=bool).reshape(maps.shape)
    regions = []  # (image index, boolean region mask)
    for i, g in enumerate(masks):
        lab, k = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, k + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        ys.append(float(np.mean([pred[i][r].sum() / r.sum() for i, r in regions])))
        xs.append(pred[normal].sum() / normal.sum())
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:  # interpolate at fpr_limit
            y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_lim) / 2
            break
    return area / fpr_limit


# ------------------------------------------------------------------------------------------
# curve counts
# ------------------------------------------------------------------------------------------

def test_curve_counts_by_hand():
    s = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.9, 0.2])
    y = np.array([1, 1, 0, 0, 0, 0, 1])
    c = M.binary_curve_counts(s, y)
    np.testing.assert_array_equal(c.thresholds, [0.9, 0.5, 0.2, 0.1])
    np.testing.assert_array_equal(c.tps, [1, 2, 3, 3])
    np.testing.assert_array_equal(c.fps, [1, 3, 3, 4])
    assert c.tps.dtype == np.int64 and c.fps.dtype == np.int64
    assert (c.n_pos, c.n_neg) == (3, 4)


@pytest.mark.parametrize("decimals", [0, 1, 2, None])
def test_curve_counts_match_sklearn_roc_curve(decimals):
    rng = np.random.default_rng(1)
    s, y = random_case(rng, 3000, decimals=decimals)
    c = M.binary_curve_counts(s, y)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    # sklearn prepends a threshold of +inf (the point (0, 0))
    np.testing.assert_array_equal(c.thresholds, thr[1:])
    np.testing.assert_array_equal(c.tps, np.round(tpr[1:] * y.sum()).astype(np.int64))
    np.testing.assert_array_equal(c.fps, np.round(fpr[1:] * (~y).sum()).astype(np.int64))


def test_curve_counts_equal_infinities_are_one_threshold():
    s = np.array([np.inf, np.inf, 1.0, -np.inf, -np.inf])
    c = M.binary_curve_counts(s, [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(c.tps, [1, 2, 2])
    np.testing.assert_array_equal(c.fps, [1, 1, 3])


# ------------------------------------------------------------------------------------------
# image metrics and pixel metrics against scikit-learn
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 7, 100, 5000])
@pytest.mark.parametrize("decimals", [0, 1, 2, None])
@pytest.mark.parametrize("pos_rate", [0.05, 0.5, 0.9])
def test_against_sklearn_random_with_ties(n, decimals, pos_rate):
    rng = np.random.default_rng(hash((n, decimals, pos_rate)) % 2**32)
    s, y = random_case(rng, n, pos_rate, decimals)
    ref_auc = roc_auc_score(y, s)
    ref_ap = average_precision_score(y, s)
    ref_f1 = sk_f1_max(y, s)
    assert M.auroc(s, y) == pytest.approx(ref_auc, abs=1e-12)
    assert M.average_precision(s, y) == pytest.approx(ref_ap, abs=1e-12)
    assert M.f1_max(s, y) == pytest.approx(ref_f1, abs=1e-12)
    assert M.pixel_auroc(s, y) == pytest.approx(ref_auc, abs=1e-12)
    assert M.pixel_average_precision(s, y) == pytest.approx(ref_ap, abs=1e-12)
    assert M.pixel_f1_max(s, y) == pytest.approx(ref_f1, abs=1e-12)
    pm = M.pixel_metrics(s.astype(np.float32), y)
    s32 = s.astype(np.float32)
    assert pm["auroc"] == pytest.approx(roc_auc_score(y, s32), abs=1e-12)
    assert pm["ap"] == pytest.approx(average_precision_score(y, s32), abs=1e-12)
    assert pm["f1_max"] == pytest.approx(sk_f1_max(y, s32), abs=1e-12)


def test_more_negatives_than_positives_and_the_reverse_side_of_mann_whitney():
    # pixel_auroc queries the smaller side; both branches must agree with sklearn
    rng = np.random.default_rng(5)
    for rate in (0.01, 0.99):
        s, y = random_case(rng, 20000, rate, decimals=2, dtype=np.float32)
        assert M.pixel_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_tiny_edge_cases():
    # two samples
    assert M.auroc([0.2, 0.8], [0, 1]) == 1.0
    assert M.auroc([0.8, 0.2], [0, 1]) == 0.0
    assert M.pixel_auroc(np.array([0.8, 0.2]), np.array([0, 1])) == 0.0
    assert M.auroc([0.5, 0.5], [0, 1]) == 0.5
    # all scores tied: one threshold, the ROC is the diagonal; precision = prevalence
    y = np.array([1, 0, 0, 1, 0])
    s = np.full(5, 0.3)
    assert M.auroc(s, y) == 0.5
    assert M.pixel_auroc(s, y) == 0.5
    assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s)) == 0.4
    assert M.f1_max(s, y) == pytest.approx(2 * 2 / (2 + 5))  # P = 0.4, R = 1
    assert M.pixel_f1_max(s, y) == pytest.approx(4 / 7)
    # perfect separation
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    y = np.array([0, 0, 0, 1, 1])
    for f in (M.auroc, M.average_precision, M.f1_max, M.pixel_auroc, M.pixel_average_precision,
              M.pixel_f1_max):
        assert f(s, y) == 1.0
    # inverted separation
    assert M.auroc(-s, y) == 0.0
    assert M.pixel_auroc(-s, y) == 0.0
    assert M.average_precision(-s, y) == pytest.approx(average_precision_score(y, -s))
    assert M.f1_max(-s, y) == pytest.approx(sk_f1_max(y, -s))
    assert M.pixel_f1_max(-s, y) == pytest.approx(sk_f1_max(y, -s))
    # no normal sample: AP and F1-max are 1 (as in sklearn), AUROC undefined
    assert M.average_precision([0.1, 0.4], [1, 1]) == 1.0
    assert M.f1_max([0.1, 0.4], [1, 1]) == 1.0


@pytest.mark.parametrize("tdtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_inputs(tdtype):
    rng = np.random.default_rng(7)
    s, y = random_case(rng, 4000, 0.2, decimals=2)
    st = torch.from_numpy(s).to(tdtype)
    s_ref = st.float().numpy() if tdtype != torch.float64 else s  # upcasting is exact
    for yt in (torch.from_numpy(y), torch.from_numpy(y).to(torch.uint8),
               torch.from_numpy(y).long(), torch.from_numpy(y).float()):
        assert M.auroc(st, yt) == pytest.approx(roc_auc_score(y, s_ref), abs=1e-12)
        assert M.pixel_auroc(st, yt) == pytest.approx(roc_auc_score(y, s_ref), abs=1e-12)
    assert M.average_precision(st, y) == pytest.approx(average_precision_score(y, s_ref), abs=1e-12)
    assert M.f1_max(st, y) == pytest.approx(sk_f1_max(y, s_ref), abs=1e-12)
    pm = M.pixel_metrics(st.reshape(40, 100), torch.from_numpy(y).reshape(40, 1, 100))
    assert pm["ap"] == pytest.approx(average_precision_score(y, s_ref), abs=1e-12)
    assert pm["f1_max"] == pytest.approx(sk_f1_max(y, s_ref), abs=1e-12)


def test_numpy_float16_and_integer_scores():
    rng = np.random.default_rng(8)
    s, y = random_case(rng, 3000, 0.3, decimals=2, dtype=np.float16)
    ref = roc_auc_score(y, s.astype(np.float64))
    assert M.auroc(s, y) == pytest.approx(ref, abs=1e-12)
    assert M.pixel_auroc(s, y) == pytest.approx(ref, abs=1e-12)
    si = (rng.random(3000) * 10).astype(np.int64)
    assert M.pixel_auroc(si, y) == pytest.approx(roc_auc_score(y, si), abs=1e-12)


def test_pixel_auroc_two_million_heavy_ties():
    rng = np.random.default_rng(11)
    n = 2_000_000
    y = rng.random(n) < 0.05
    s = np.round(rng.random(n, dtype=np.float32) + 0.3 * y, 2).astype(np.float32)  # ~130 values
    ref = roc_auc_score(y, s)
    assert M.pixel_auroc(s, y) == pytest.approx(ref, abs=1e-9)
    assert M.pixel_auroc(torch.from_numpy(s), torch.from_numpy(y.astype(np.uint8))) == \
        pytest.approx(ref, abs=1e-9)
    assert M.auroc(s, y) == pytest.approx(ref, abs=1e-9)


def test_pixel_auroc_memory_is_about_one_copy():
    # numpy reports its allocations to tracemalloc; with small chunks the extra memory is the
    # positive and negative copies (together the size of the scores) plus chunk buffers.
    # Chunk buffers are per thread; 2 threads sort in 2 blocks on a 2-core machine.
    blocking = M.Blocking(chunk=1 << 14, max_threads=2, min_block=1 << 18)
    rng = np.random.default_rng(12)
    n = 2_000_000
    s = rng.random(n, dtype=np.float32)
    y = rng.random(n) < 0.05
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        M.pixel_auroc(s, y, blocking=blocking)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 1.15 * s.nbytes, peak


def test_results_do_not_depend_on_threads_or_blocks():
    rng = np.random.default_rng(13)
    s, y = random_case(rng, 600_000, 0.3, decimals=3, dtype=np.float32)
    ref = (roc_auc_score(y, s), average_precision_score(y, s), sk_f1_max(y, s))
    for threads, min_block, chunk in ((1, 1 << 21, 1 << 20), (2, 1 << 15, 1 << 12),
                                      (8, 1 << 14, 1 << 13)):
        blocking = M.Blocking(chunk=chunk, max_threads=threads, min_block=min_block)
        pm = M.pixel_metrics(s, y, blocking=blocking)
        assert pm["auroc"] == pytest.approx(ref[0], abs=1e-12)
        assert pm["ap"] == pytest.approx(ref[1], abs=1e-12)
        assert pm["f1_max"] == pytest.approx(ref[2], abs=1e-12)
        assert M.pixel_auroc(s, ~y, blocking=blocking) == pytest.approx(1 - ref[0], abs=1e-12)  # the other branch


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_one_class_raises_with_clear_message():
    with pytest.raises(ValueError, match=r"AUROC is undefined: the labels hold only one class "
                                         r"\(4 samples, all normal\)"):
        M.auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"only one class \(3 samples, all anomalous\)"):
        M.pixel_auroc(np.array([0.1, 0.2, 0.3], np.float32), np.ones(3, bool))
    with pytest.raises(ValueError, match="no anomalous sample"):
        M.average_precision([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="no anomalous sample"):
        M.f1_max([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="no anomalous sample"):
        M.pixel_average_precision(np.array([0.1, 0.2]), np.zeros(2))
    with pytest.raises(ValueError, match="AUROC is undefined"):
        M.compute_metrics([0.1, 0.2], [1, 1])


@pytest.mark.parametrize("fn", [M.auroc, M.average_precision, M.f1_max, M.pixel_auroc,
                                M.pixel_average_precision, M.pixel_f1_max, M.binary_curve_counts])
def test_nan_raises(fn):
    s = np.array([0.1, np.nan, 0.3, 0.4], np.float32)
    with pytest.raises(ValueError, match="NaN"):
        fn(s, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.from_numpy(s).half(), torch.tensor([0, 1, 0, 1]))


def test_bad_labels_and_shapes_raise():
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        M.auroc([0.1, 0.2, 0.3], [0, 255, 0])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        M.pixel_auroc(np.array([0.1, 0.2, 0.3]), np.array([0, 255, 0], np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        M.auroc(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="do not match"):
        M.pixel_auroc(np.zeros(5), np.zeros(4))
    with pytest.raises(ValueError, match="no samples"):
        M.pixel_auroc(np.zeros(0), np.zeros(0))


# ------------------------------------------------------------------------------------------
# AUPRO
# ------------------------------------------------------------------------------------------

def _two_regions_4x4():
    # A: 2 pixels at the top left; B: a 2 x 2 block at the bottom right; 10 normal pixels.
    g = np.zeros((4, 4), bool)
    g[0, 0:2] = True
    g[2:4, 2:4] = True
    return g


def test_aupro_perfect_map_is_one():
    g = _two_regions_4x4()
    # curve (0, 0) -> (0, 1) -> (1, 1): area to 0.3 is 0.3, normalised 1
    assert M.aupro(g.astype(np.float32), g) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(torch.from_numpy(g).float()[None, None], torch.from_numpy(g)[None]) == \
        pytest.approx(1.0, abs=1e-12)


def test_aupro_constant_map():
    g = _two_regions_4x4()
    m = np.full(g.shape, 0.7)
    # one threshold: the curve is the diagonal (0, 0) -> (1, 1); area to L is L^2 / 2, over L: L / 2
    assert M.aupro(m, g) == pytest.approx(0.15, abs=1e-12)
    assert M.aupro(m, g, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    assert M.aupro(m, g, fpr_limit=0.05) == pytest.approx(0.025, abs=1e-12)


def test_aupro_two_regions_one_found_first():
    g = _two_regions_4x4()
    m = np.zeros(g.shape)
    m[0, 0:2] = 3.0  # region A (2 pixels) first
    m[2:4, 2:4] = 1.0  # region B (4 pixels) later
    m[1, 0:2] = 2.0  # two normal pixels between them (out of 10 normal pixels)
    # t=3: PRO = (1 + 0) / 2 = 0.5, FPR 0;  t=2: PRO 0.5, FPR 0.2;  t=1: PRO 1, FPR 0.2;
    # t=0: (1, 1). Area to 0.3: 0.2 * 0.5 + 0.1 * 1 = 0.2; / 0.3 = 2/3.
    assert M.aupro(m, g) == pytest.approx(2 / 3, abs=1e-12)
    assert brute_force_aupro(m, g, 0.3) == pytest.approx(2 / 3, abs=1e-12)
    # Now two more normal pixels tie with region B at 1.0 (the others stay at 0):
    m[1, 2:4] = 1.0
    # t=3: (0, 0.5); t=2: (0.2, 0.5); t=1: (0.4, 1.0); t=0: (1, 1).
    # To 0.3: 0.2 * 0.5 = 0.1, then the segment (0.2, 0.5) -> (0.4, 1.0) cut at 0.3 where
    # PRO = 0.75: 0.1 * (0.5 + 0.75) / 2 = 0.0625. Total 0.1625 / 0.3 = 13/24.
    assert M.aupro(m, g) == pytest.approx(13 / 24, abs=1e-12)
    assert brute_force_aupro(m, g, 0.3) == pytest.approx(13 / 24, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # A lone pixel (0, 0) touching the 2 x 2 block at (1..2, 1..2) only diagonally: one region of
    # 5 pixels with 8-connectivity (two regions, of 1 and 4, with 4-connectivity).
    g = np.zeros((5, 4), bool)
    g[0, 0] = True
    g[1:3, 1:3] = True
    m = np.zeros(g.shape)
    m[0, 0] = 2.0
    m[1:3, 1:3] = 1.0
    m[4, 0:3] = 1.5  # 3 of the 15 normal pixels
    # t=2: (0, 1/5); t=1.5: (0.2, 1/5); t=1: (0.2, 1); t=0: (1, 1).
    # Area to 0.3: 0.2 * 0.2 + 0.1 * 1 = 0.14; / 0.3 = 7/15.  (4-connectivity would give 2/3.)
    assert M.aupro(m, g) == pytest.approx(7 / 15, abs=1e-12)


def test_aupro_regions_do_not_span_images():
    # The bottom row of image 0 and the top row of image 1 are two regions, not one.
    g = np.zeros((2, 3, 3), bool)
    g[0, 2, :] = True
    g[1, 0, :2] = True
    m = np.zeros(g.shape)
    m[0, 2, :] = 1.0  # only the region of image 0 is found, with no false positive
    # t=1: PRO = (1 + 0) / 2 = 0.5 at FPR 0; t=0: (1, 1). Area to 0.3: 0.3 * (0.5 + 0.65) / 2.
    expected = 0.3 * (0.5 + 0.65) / 2 / 0.3
    assert M.aupro(m, g) == pytest.approx(expected, abs=1e-12)
    assert brute_force_aupro(m, g, 0.3) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    b, h, w = 3, 12, 10
    g = ndimage.binary_dilation(rng.random((b, h, w)) < 0.04, structure=np.ones((1, 3, 3)))
    g[0, 0, 0] = True
    g[-1, -1, -1] = False
    decimals = [1, 2, None][seed % 3]
    m = rng.random((b, h, w)) + 0.4 * g
    if decimals is not None:
        m = np.round(m, decimals)
    m = m.astype(np.float32)
    ref = brute_force_aupro(m, g, fpr_limit)
    assert M.aupro(m, g, fpr_limit=fpr_limit) == pytest.approx(ref, abs=1e-12)
    assert M.aupro(torch.from_numpy(m)[:, None], torch.from_numpy(g)[:, None],
                   fpr_limit=fpr_limit) == pytest.approx(ref, abs=1e-12)


def test_aupro_errors():
    g = _two_regions_4x4()
    with pytest.raises(ValueError, match="no anomalous region"):
        M.aupro(np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="no normal pixel"):
        M.aupro(np.zeros((4, 4)), np.ones((4, 4), bool))
    m = np.zeros((4, 4))
    m[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.aupro(m, g)
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(np.zeros((4, 4)), g, fpr_limit=0.0)
    with pytest.raises(ValueError, match="do not match"):
        M.aupro(np.zeros((4, 4)), np.zeros((4, 5), bool))


# ------------------------------------------------------------------------------------------
# compute_metrics
# ------------------------------------------------------------------------------------------

def test_compute_metrics():
    rng = np.random.default_rng(3)
    b, h, w = 6, 16, 16
    g = ndimage.binary_dilation(rng.random((b, h, w)) < 0.02, structure=np.ones((1, 3, 3)))
    g[:2] = False  # two normal images
    g[2, 5, 5] = True
    m = np.round(rng.random((b, h, w)) + 0.5 * g, 2).astype(np.float32)
    labels = g.reshape(b, -1).any(1)
    scores = m.reshape(b, -1).max(1)
    out = M.compute_metrics(torch.from_numpy(scores), torch.from_numpy(labels),
                            torch.from_numpy(m)[:, None], torch.from_numpy(g))
    assert set(out) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
                        "pixel_f1_max", "pixel_aupro", "n_images", "n_normal", "n_abnormal"}
    assert (out["n_images"], out["n_normal"], out["n_abnormal"]) == (6, 2, 4)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out["image_f1_max"] == pytest.approx(sk_f1_max(labels, scores), abs=1e-12)
    yf, sf = g.reshape(-1), m.reshape(-1)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(yf, sf), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(yf, sf), abs=1e-12)
    assert out["pixel_f1_max"] == pytest.approx(sk_f1_max(yf, sf), abs=1e-12)
    assert out["pixel_aupro"] == pytest.approx(brute_force_aupro(m, g, 0.3), abs=1e-12)
    assert all(isinstance(out[k], float) for k in out if not k.startswith("n_"))
    only_image = M.compute_metrics(scores, labels)
    assert set(only_image) == {"image_auroc", "image_ap", "image_f1_max", "n_images", "n_normal",
                               "n_abnormal"}
    with pytest.raises(ValueError, match="both"):
        M.compute_metrics(scores, labels, pixel_maps=m)


# ------------------------------------------------------------------------------------------
# CUDA (runs only where a GPU is present)
# ------------------------------------------------------------------------------------------

def test_torch_code_path_on_cpu():
    # The GPU code path (torch.sort / torch.searchsorted), exercised on CPU tensors, in several sorted blocks.
    on_cpu = M.Blocking(torch_on_cpu=True, torch_sort_block=3000)
    rng = np.random.default_rng(22)
    for rate in (0.05, 0.95):
        s, y = random_case(rng, 20_000, rate, decimals=2, dtype=np.float32)
        st, yt = torch.from_numpy(s), torch.from_numpy(y)
        assert M.pixel_auroc(st, yt, blocking=on_cpu) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        s16 = st.half()
        assert M.pixel_auroc(s16, yt.to(torch.uint8), blocking=on_cpu) == \
            pytest.approx(roc_auc_score(y, s16.float().numpy()), abs=1e-12)
        pm = M.pixel_metrics(st, yt.float(), blocking=on_cpu)
        assert pm["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert pm["f1_max"] == pytest.approx(sk_f1_max(y, s), abs=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), blocking=on_cpu)
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        M.pixel_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 3]), blocking=on_cpu)
    with pytest.raises(ValueError, match="only one class"):
        M.pixel_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), blocking=on_cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pixel_metrics_match_cpu():
    rng = np.random.default_rng(21)
    for rate in (0.05, 0.95):
        s, y = random_case(rng, 300_000, rate, decimals=2, dtype=np.float32)
        st, yt = torch.from_numpy(s).cuda(), torch.from_numpy(y).cuda()
        assert M.pixel_auroc(st, yt) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.pixel_auroc(st.half(), yt.to(torch.uint8)) == \
            pytest.approx(roc_auc_score(y, st.half().float().cpu().numpy()), abs=1e-12)
        pm = M.pixel_metrics(st, yt)
        assert pm["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert pm["f1_max"] == pytest.approx(sk_f1_max(y, s), abs=1e-12)
        assert M.auroc(st, yt) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_auroc(torch.tensor([0.1, float("nan")], device="cuda"),
                      torch.tensor([0, 1], device="cuda"))
