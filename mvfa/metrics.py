"""Exact anomaly-detection metrics: image AUROC / AP / F1-max, pixel AUROC / AP / F1-max, AUPRO.

Every metric here is computed exactly from integer counts; none uses a fixed threshold grid.

Conventions
-----------
* ``scores``: higher means more anomalous. torch tensors (any device, any float dtype) or numpy
  arrays (or anything ``np.asarray`` accepts), any shape; they are flattened.
* ``labels``: bool, or numbers that are 0 (normal) or 1 (anomalous); anything else raises (turn a
  0/255 mask into labels with ``mask > 0`` first). Same number of elements as the scores (shapes
  may differ only by dimensions of size 1, e.g. maps [B, 1, H, W] against masks [B, H, W]).
* A sample counts as predicted anomalous at threshold ``t`` when ``score >= t``; ties share a
  threshold (one point of the curve), as in scikit-learn.
* NaN scores raise ``ValueError``; +/-inf are allowed (they sort like any other value).
* float16 / bfloat16 scores are upcast to float32 (exact); float32 and float64 are kept as they
  are, so ties in the input stay ties and distinct values stay distinct.

Two families of functions
-------------------------
* Image level (a few thousand scores): :func:`binary_curve_counts` gives the tie-collapsed
  cumulative true/false positive counts at every distinct threshold, and :func:`auroc`,
  :func:`average_precision` and :func:`f1_max` derive from those counts. They equal
  ``sklearn.metrics.roc_auc_score``, ``average_precision_score`` and the maximum F1 over
  ``precision_recall_curve``.
* Pixel level (hundreds of millions of scores): :func:`pixel_auroc`, :func:`pixel_metrics` (AUROC,
  AP and F1-max from one sort) and :func:`aupro`. They split the scores into a positive and a
  negative copy, sort each in place, and count with binary searches in chunks (Mann-Whitney U for
  AUROC). Extra memory is about one copy of the scores (plus small chunk buffers); no argsort of
  everything and no float64 copy of float32 data. On the CPU the larger class is sorted in
  blocks on up to 8 threads (numpy releases the GIL in sort and searchsorted); the results do not
  depend on the number of threads. They give the same values as the image-level functions (the
  same formulas, organised differently), and :func:`pixel_auroc` / :func:`pixel_metrics` run on
  CUDA tensors on the GPU (AUPRO and :func:`compute_metrics` move pixel data to the CPU, where
  scipy finds the connected components).
* Maps split over processes (torchrun): :func:`sharded_pixel_metrics` merges exact counts and
  gives the single-process values to the last digit.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import math
import os
from typing import Any, NamedTuple, Protocol

import numpy as np

try:  # torch is a dependency of the project, but these metrics also work on numpy alone.
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

__all__ = [
    "CurveCounts",
    "binary_curve_counts",
    "auroc",
    "average_precision",
    "f1_max",
    "pixel_auroc",
    "pixel_average_precision",
    "pixel_f1_max",
    "pixel_metrics",
    "Blocking",
    "aupro",
    "compute_metrics",
    "sharded_pixel_metrics",
]

# Queries per binary-search call on the CPU (see _narrowed_search).
_QUERY_CHUNK = 1 << 16
# torch (GPU): bigger chunks, one thread, sorted in blocks of at most Blocking.torch_sort_block.
_CHUNK_TORCH = 1 << 24


@dataclass(frozen=True)
class Blocking:
    """How the pixel-level metrics cut their work into chunks, blocks and threads. The values they
    give do not depend on it (exact integer counts); memory and speed do."""

    chunk: int = 1 << 20  # elements per chunk in the pixel-level loops: bounds the temporary buffers (~50 MB)
    max_threads: int = 8  # the larger class is sorted in up to this many blocks in parallel ...
    min_block: int = 1 << 21  # ... each of at least this many elements
    torch_sort_block: int = 1 << 24  # torch: elements sorted at once (bounds torch.sort's int64 buffers)
    torch_on_cpu: bool = False  # CPU tensors take the torch (GPU) code path too, not numpy's


DEFAULT_BLOCKING = Blocking()

ArrayLike = Any  # numpy array, torch tensor, or sequence


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------

def _is_tensor(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _check_shapes(scores_shape: tuple[int, ...], labels_shape: tuple[int, ...], what: str) -> None:
    if _squeezed_shape(tuple(scores_shape)) != _squeezed_shape(tuple(labels_shape)):
        raise ValueError(
            f"{what}: scores of shape {tuple(scores_shape)} and labels of shape "
            f"{tuple(labels_shape)} do not match")


def _score_dtype_np(a: np.ndarray) -> np.ndarray:
    """float16 -> float32 (exact); float32/float64 kept; ints/bools -> float64."""
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if a.dtype in (np.float32, np.float64):
        return a
    if a.dtype.kind in "biu":
        return a.astype(np.float64)
    if a.dtype.kind == "f":  # longdouble and the like
        return a.astype(np.float64)
    raise TypeError(f"scores must be real numbers, got dtype {a.dtype}")


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view of ``x`` where possible (torch CPU tensors share memory), flattened."""
    if _is_tensor(x):
        t = x.detach()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        if t.device.type != "cpu":
            t = t.cpu()
        return t.reshape(-1).numpy()
    return np.asarray(x).reshape(-1)


def _to_numpy_scores(x: ArrayLike) -> np.ndarray:
    return _score_dtype_np(_to_numpy(x))


def _check_labels_np(y: np.ndarray, what: str) -> np.ndarray:
    """Validate 0/1 labels and return them as a bool array (a view when already bool)."""
    if y.dtype == np.bool_:
        return y
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{what}: labels must be bool or 0/1 numbers, got dtype {y.dtype}")
    ok = (y == 0) | (y == 1)
    if not ok.all():
        bad = np.unique(y[~ok])[:5]
        raise ValueError(
            f"{what}: labels must be 0 (normal) or 1 (anomalous); found {bad.tolist()} "
            "(binarise masks first, e.g. mask > 0)")
    return y != 0


def _describe_one_class(n: int, positive: bool) -> str:
    return f"{n} samples, all {'anomalous' if positive else 'normal'}"


def _check_no_nan_np(s: np.ndarray, what: str) -> None:
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError(f"{what}: the scores contain NaN")


# --------------------------------------------------------------------------------------------
# image level: tie-collapsed curve counts
# --------------------------------------------------------------------------------------------

class CurveCounts(NamedTuple):
    """Cumulative counts at each distinct threshold, thresholds in decreasing order.

    ``tps[i]`` / ``fps[i]``: number of positives / negatives with ``score >= thresholds[i]``
    (int64). ``n_pos`` / ``n_neg`` are the totals (``tps[-1]`` / ``fps[-1]``).
    """

    tps: np.ndarray
    fps: np.ndarray
    thresholds: np.ndarray
    n_pos: int
    n_neg: int


def binary_curve_counts(scores: ArrayLike, labels: ArrayLike) -> CurveCounts:
    """Sort by score (descending), collapse ties, and return cumulative TP/FP counts per threshold.

    This is the basis of ROC and precision-recall curves: the point for threshold ``t`` counts the
    samples with ``score >= t``; samples with equal scores enter together (one curve point).
    Returns numpy arrays (int64 counts; thresholds in the score dtype, float16 upcast to float32).
    """
    what = "binary_curve_counts"
    _check_shapes(_shape(scores), _shape(labels), what)
    s = _to_numpy_scores(scores)
    y = _to_numpy(labels)
    if s.size != y.size:
        raise ValueError(f"{what}: {s.size} scores but {y.size} labels")
    if s.size == 0:
        raise ValueError(f"{what}: no samples")
    _check_no_nan_np(s, what)
    y = _check_labels_np(y, what)
    order = np.argsort(s)[::-1]  # descending; the order within ties does not matter
    s_sorted = s[order]
    y_sorted = y[order]
    del order
    # last index of each run of equal scores (``!=`` so that equal infinities are one run)
    last = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    last = np.append(last, s_sorted.size - 1)
    tps = np.cumsum(y_sorted, dtype=np.int64)[last]
    fps = (last + 1).astype(np.int64) - tps
    return CurveCounts(tps, fps, s_sorted[last], int(tps[-1]), int(fps[-1]))


def _require_both_classes(n_pos: int, n_neg: int, metric: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{metric} is undefined: the labels hold only one class "
            f"({_describe_one_class(n_pos + n_neg, n_pos > 0)})")


def _require_positives(n_pos: int, n_neg: int, metric: str) -> None:
    if n_pos == 0:
        raise ValueError(
            f"{metric} is undefined: the labels hold no anomalous sample "
            f"({_describe_one_class(n_neg, False)})")


def _exact_ratio(num: int, den: int) -> float:
    """num / den as the correctly rounded float (Python ints divide exactly)."""
    return int(num) / int(den)


def _auroc_from_counts(c: CurveCounts) -> float:
    _require_both_classes(c.n_pos, c.n_neg, "AUROC")
    # Trapezoid over the ROC points (0, 0), (fps_i / N, tps_i / P):
    #   area = sum_i (fps_i - fps_{i-1}) (tps_i + tps_{i-1}) / (2 P N)
    # All terms are integers, so the sum is exact and the one division rounds once.
    tps = np.concatenate(([0], c.tps))
    fps = np.concatenate(([0], c.fps))
    dfps = np.diff(fps)
    tsum = tps[1:] + tps[:-1]
    if 2 * c.n_pos * c.n_neg < 2**62:
        num = int(np.dot(dfps, tsum))
    else:  # pragma: no cover - beyond ~3e9 samples; accumulate in Python ints
        num = sum(int(a) * int(b) for a, b in zip(dfps[dfps > 0], tsum[dfps > 0]))
    return _exact_ratio(num, 2 * c.n_pos * c.n_neg)


def _ap_from_counts(c: CurveCounts) -> float:
    _require_positives(c.n_pos, c.n_neg, "Average precision")
    # AP = sum_n (R_n - R_{n-1}) P_n with R_n = tps_n / P and P_n = tps_n / (tps_n + fps_n).
    dtps = np.diff(np.concatenate(([0], c.tps)))
    precision = c.tps / (c.tps + c.fps)
    return float(np.dot(dtps, precision) / c.n_pos)


def _f1max_from_counts(c: CurveCounts) -> float:
    _require_positives(c.n_pos, c.n_neg, "F1-max")
    # F1 = 2PR / (P + R) = 2 tp / (n_pos + tp + fp); it is 0 where tp = 0 (P + R = 0 there).
    f1 = 2.0 * c.tps / (c.n_pos + c.tps + c.fps)
    return float(max(f1.max(), 0.0))


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (trapezoid over the tie-collapsed curve) = ``roc_auc_score``.

    Raises ``ValueError`` when the labels hold only one class, or on NaN scores.
    """
    return _auroc_from_counts(binary_curve_counts(scores, labels))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision, ``sum_n (R_n - R_{n-1}) P_n`` = ``average_precision_score``.

    Raises ``ValueError`` when there is no anomalous sample (recall undefined), or on NaN scores.
    With no normal sample it is 1.0, as in scikit-learn.
    """
    return _ap_from_counts(binary_curve_counts(scores, labels))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Maximum over thresholds of F1 = 2PR / (P + R) (0 where P + R = 0).

    The maximum over the points of ``precision_recall_curve`` (anomalib's F1Max, without its
    1e-10 in the denominator). Raises ``ValueError`` when there is no anomalous sample.
    """
    return _f1max_from_counts(binary_curve_counts(scores, labels))


# --------------------------------------------------------------------------------------------
# pixel level: split into positives and negatives, sort each, count with binary searches
# --------------------------------------------------------------------------------------------

class _Split(NamedTuple):
    """Positive and negative scores as lists of blocks, each block sorted ascending.

    Blocks are numpy arrays (views of one buffer per class) or torch tensors. The larger class is
    cut into one block per thread so that the blocks sort in parallel; counts over a class are
    sums over its blocks, so no merge is needed.
    """

    pos: list
    neg: list
    blocking: Blocking = DEFAULT_BLOCKING

    @property
    def n_pos(self) -> int:
        return sum(int(b.shape[0]) for b in self.pos)

    @property
    def n_neg(self) -> int:
        return sum(int(b.shape[0]) for b in self.neg)


def _n_threads(max_threads: int) -> int:
    """Threads for sorting and counting (numpy releases the GIL in sort and searchsorted)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, max_threads))


def _map(fn, items: list, max_threads: int) -> list:
    """``[fn(x) for x in items]``, on a thread pool when there is more than one item and thread
    (numpy work only: torch work runs in order on the calling thread)."""
    k = min(_n_threads(max_threads), len(items))
    if items and _is_tensor(items[0]):
        k = 1
    if k <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=k) as ex:
        return list(ex.map(fn, items))  # results in order: sums stay deterministic


def _split_numpy(s: np.ndarray, y: np.ndarray, what: str,
                 blocking: Blocking = DEFAULT_BLOCKING) -> tuple[np.ndarray, np.ndarray]:
    """Copy the scores into a positive and a negative array (unsorted), chunk by chunk.

    Extra memory: one copy of the scores, plus chunk-sized temporaries.
    """
    if s.dtype == np.float16:
        work = np.float32
    elif s.dtype in (np.float32, np.float64):
        work = s.dtype
    elif s.dtype.kind in "biuf":
        work = np.float64
    else:
        raise TypeError(f"{what}: scores must be real numbers, got dtype {s.dtype}")
    check = y.dtype != np.bool_
    if check and y.dtype.kind not in "biuf":
        raise TypeError(f"{what}: labels must be bool or 0/1 numbers, got dtype {y.dtype}")
    n = s.size
    chunk = blocking.chunk
    starts = list(range(0, n, chunk))

    def count(i: int) -> int:
        yc = y[i:i + chunk]
        if check:
            if yc.dtype.kind == "u":
                bad = yc > 1
            elif yc.dtype.kind == "i":
                bad = (yc < 0) | (yc > 1)
            else:
                bad = ~((yc == 0) | (yc == 1))
            if bad.any():
                raise ValueError(
                    f"{what}: labels must be 0 (normal) or 1 (anomalous); found "
                    f"{np.unique(yc[bad])[:5].tolist()} (binarise masks first, e.g. mask > 0)")
        return int(np.count_nonzero(yc))

    counts = _map(count, starts, blocking.max_threads)
    n_pos = sum(counts)
    pos = np.empty(n_pos, dtype=work)
    neg = np.empty(n - n_pos, dtype=work)
    pos_at = np.concatenate(([0], np.cumsum(counts))).tolist()

    def fill(j: int) -> None:
        i = starts[j]
        m = y[i:i + chunk]
        if check:
            m = m != 0
        sc = s[i:i + chunk]
        ip, ineg = pos_at[j], i - pos_at[j]
        pos[ip:pos_at[j + 1]] = sc[m]
        neg[ineg:ineg + sc.size - counts[j]] = sc[~m]

    _map(fill, list(range(len(starts))), blocking.max_threads)
    return pos, neg


def _split_torch(s: "torch.Tensor", y: "torch.Tensor", what: str):
    """The same as :func:`_split_numpy`, on the tensors' device."""
    if s.dtype in (torch.float16, torch.bfloat16):
        work = torch.float32
    elif s.dtype in (torch.float32, torch.float64):
        work = s.dtype
    elif not s.dtype.is_complex:
        work = torch.float64
    else:
        raise TypeError(f"{what}: scores must be real numbers, got dtype {s.dtype}")
    y = y.to(s.device)
    check = y.dtype != torch.bool
    n = s.numel()
    n_pos = 0
    step = _CHUNK_TORCH
    for i in range(0, n, step):
        yc = y[i:i + step]
        if check:
            ok = (yc == 0) | (yc == 1)
            if not bool(ok.all()):
                bad = torch.unique(yc[~ok])[:5].cpu().tolist()
                raise ValueError(
                    f"{what}: labels must be 0 (normal) or 1 (anomalous); found {bad} "
                    "(binarise masks first, e.g. mask > 0)")
        n_pos += int(torch.count_nonzero(yc))
    pos = torch.empty(n_pos, dtype=work, device=s.device)
    neg = torch.empty(n - n_pos, dtype=work, device=s.device)
    ip = ineg = 0
    for i in range(0, n, step):
        m = y[i:i + step] != 0
        sc = s[i:i + step]
        p = sc[m]
        pos[ip:ip + p.numel()] = p
        ip += p.numel()
        q = sc[~m]
        neg[ineg:ineg + q.numel()] = q
        ineg += q.numel()
        del p, q, m
    return pos, neg


def _sorted_blocks(a, n_blocks: int, blocking: Blocking) -> list:
    """Sort ``a`` ascending in place, in ``n_blocks`` contiguous pieces (numpy, in parallel), or
    in pieces of at most ``blocking.torch_sort_block`` (torch: bounds the memory ``torch.sort``
    takes for its int64 indices and buffers)."""
    if not isinstance(a, np.ndarray):
        size, step = int(a.shape[0]), blocking.torch_sort_block
        blocks = [a[i:i + step] for i in range(0, size, step)] or [a]
        for blk in blocks:
            blk.copy_(torch.sort(blk).values)
        return blocks
    size = a.shape[0]
    n_blocks = max(1, min(n_blocks, size // blocking.min_block))
    edges = [size * i // n_blocks for i in range(n_blocks + 1)]
    blocks = [a[lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
    _map(lambda blk: blk.sort(), blocks, blocking.max_threads)
    return blocks


def _has_nan_sorted(a) -> bool:
    """NaN sorts last in numpy and in torch; a sorted array holds NaN iff its last element is."""
    if a.shape[0] == 0:
        return False
    last = a[-1]
    return bool(np.isnan(last)) if isinstance(a, np.ndarray) else bool(torch.isnan(last))


def _sorted_split(scores: ArrayLike, labels: ArrayLike, what: str, blocking: Blocking) -> _Split:
    """Split into positive/negative copies and sort them (the larger in parallel blocks)."""
    _check_shapes(_shape(scores), _shape(labels), what)
    if _is_tensor(scores) and (scores.device.type != "cpu" or blocking.torch_on_cpu):
        s = scores.detach().reshape(-1)
        y = labels.reshape(-1) if _is_tensor(labels) else torch.as_tensor(
            np.asarray(labels).reshape(-1))
        if s.numel() == 0:
            raise ValueError(f"{what}: no samples")
        pos, neg = _split_torch(s, y, what)
    else:
        s = _to_numpy(scores)
        y = _to_numpy(labels)
        if s.size == 0:
            raise ValueError(f"{what}: no samples")
        pos, neg = _split_numpy(s, y, what, blocking)
    k = _n_threads(blocking.max_threads)
    big_pos = pos.shape[0] > neg.shape[0]
    sp = _Split(_sorted_blocks(pos, k if big_pos else 1, blocking), _sorted_blocks(neg, 1 if big_pos else k, blocking),
                blocking)
    if any(_has_nan_sorted(blk) for blk in sp.pos + sp.neg):
        raise ValueError(f"{what}: the scores contain NaN")
    return sp


def _narrowed_search(blk: np.ndarray, q: np.ndarray, side: str) -> tuple[int, np.ndarray]:
    """``(lo, r)`` with ``searchsorted(blk, q, side) == lo + r`` for sorted queries ``q``.

    All of ``blk`` below ``lo = #{x < q[0]}`` lies below every query and all from
    ``hi = #{x <= q[-1]}`` on lies above, so the search runs in ``blk[lo:hi]`` alone: a short,
    cache-resident range for a short run of sorted queries (about 3x faster than searching all of
    ``blk`` for each query).
    """
    lo = int(np.searchsorted(blk, q[0], side="left"))
    hi = int(np.searchsorted(blk, q[-1], side="right"))
    return lo, np.searchsorted(blk[lo:hi], q, side=side)


def _count_below(blocks: list, q, side: str) -> int:
    """Sum over the sorted queries ``q`` of #{x < q} (side 'left') or #{x <= q} ('right') in
    ``blocks``."""
    total = 0
    for blk in blocks:
        if isinstance(blk, np.ndarray):
            if q.shape[0] == 0:
                continue
            lo, r = _narrowed_search(blk, q, side)
            total += lo * int(q.shape[0]) + int(r.sum(dtype=np.int64))
        else:
            total += int(torch.searchsorted(blk, q, side=side).sum().item())
    return total


def _rank_below(blocks: list, q, side: str):
    """Per sorted query: #{x < q} (side 'left') or #{x <= q} ('right') in ``blocks`` (int64)."""
    out = None
    for blk in blocks:
        if isinstance(blk, np.ndarray):
            lo, r = _narrowed_search(blk, q, side)
            r += lo
        else:
            r = torch.searchsorted(blk, q, side=side)
        out = r if out is None else out + r
    return out


def _query_chunks(blocks: list, chunk: int) -> list:
    """Runs of sorted queries: chunks of the (sorted) blocks, short on the CPU so that each
    chunk's range in the searched blocks stays in cache (and the threads share the chunks)."""
    size = _CHUNK_TORCH if blocks and _is_tensor(blocks[0]) else min(chunk, _QUERY_CHUNK)
    return [blk[i:i + size] for blk in blocks for i in range(0, int(blk.shape[0]), size)]


def _f64(a):
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    return a.to(torch.float64)


def _mann_whitney_auroc(sp: _Split, what: str = "AUROC") -> float:
    """AUROC = (#{neg < pos} + 0.5 #{neg == pos}) / (P N), counted exactly in integers."""
    n_pos, n_neg = sp.n_pos, sp.n_neg
    _require_both_classes(n_pos, n_neg, what)
    # Query the smaller class in the larger. For a positive p, the negatives < p plus the
    # negatives <= p make 2 (#less + 0.5 #equal). For a negative q among the positives:
    # (P - #{<= q}) + (P - #{< q}) = 2 (#greater + 0.5 #equal).
    chunk, threads = sp.blocking.chunk, sp.blocking.max_threads
    if n_pos <= n_neg:
        parts = _map(lambda q: _count_below(sp.neg, q, "left") + _count_below(sp.neg, q, "right"),
                     _query_chunks(sp.pos, chunk), threads)
        twice_u = sum(parts)
    else:
        parts = _map(lambda q: 2 * n_pos * int(q.shape[0]) - _count_below(sp.pos, q, "left")
                     - _count_below(sp.pos, q, "right"), _query_chunks(sp.neg, chunk), threads)
        twice_u = sum(parts)
    return _exact_ratio(twice_u, 2 * n_pos * n_neg)


def _ap_f1_sorted(sp: _Split, neg_below: np.ndarray | None = None,
                  n_neg: int | None = None) -> tuple[float, float]:
    """AP and F1-max from the sorted positives and negatives.

    Both only need the curve points at distinct positive scores v: recall changes only there, and
    for a fixed number of true positives F1 is largest at the highest such threshold. With
    tp(v) = #{pos >= v} and fp(v) = #{neg >= v}, each positive of score v adds
    (1 / P) * tp / (tp + fp) to AP (a run of c tied positives adds c / P = R_n - R_{n-1} times
    P_n), and F1 at v is 2 tp / (P + tp + fp).

    ``neg_below`` (numpy, with ``n_neg``): #{negatives < v} for each sorted positive, counted
    elsewhere (:func:`sharded_pixel_metrics`); ``sp.neg`` is then not read.
    """
    n_pos = sp.n_pos
    n_neg = sp.n_neg if n_neg is None else int(n_neg)
    _require_positives(n_pos, n_neg, "Average precision / F1-max")

    def part(q, below) -> tuple[float, float]:
        tp = n_pos - _rank_below(sp.pos, q, "left")
        fp = n_neg - below
        tp_f = _f64(tp)
        denom = _f64(tp + fp)
        return float((tp_f / denom).sum()), float((2.0 * tp_f / (denom + n_pos)).max())

    chunks = _query_chunks(sp.pos, sp.blocking.chunk)
    threads = sp.blocking.max_threads
    if neg_below is None:
        parts = _map(lambda q: part(q, _rank_below(sp.neg, q, "left")), chunks, threads)
    else:
        edges = np.cumsum([0] + [int(q.shape[0]) for q in chunks]).tolist()
        parts = _map(lambda i: part(chunks[i], neg_below[edges[i]:edges[i + 1]]), list(range(len(chunks))), threads)
    prec_sum = math.fsum(p for p, _ in parts)
    f1 = max(0.0, max(f for _, f in parts))
    return prec_sum / n_pos, f1


def pixel_auroc(scores: ArrayLike, labels: ArrayLike, blocking: Blocking = DEFAULT_BLOCKING) -> float:
    """Exact AUROC for very large inputs (Mann-Whitney U), equal to ``roc_auc_score``.

    Copies the positive and the negative scores apart (float32 stays float32), sorts each in
    place (the larger class in blocks, on several threads), and counts for each element of the
    smaller class, in chunks, how many of the other class lie strictly below it and level with it
    (binary search), accumulating exact integers; AUROC = (2 #less + #equal) / (2 P N) is then
    rounded once. Peak extra memory is about one copy of the scores plus a few tens of MB of
    chunk buffers. torch tensors on a GPU are processed on the GPU, sorted in blocks of 16M
    elements (``torch.sort`` allocates int64 indices and buffers for each block, ~1 GB at most).
    ``blocking`` chooses those chunk, block and thread sizes (the result does not depend on them).
    """
    return _mann_whitney_auroc(_sorted_split(scores, labels, "pixel AUROC", blocking))


def pixel_average_precision(scores: ArrayLike, labels: ArrayLike, blocking: Blocking = DEFAULT_BLOCKING) -> float:
    """Average precision for very large inputs (equal to ``average_precision_score``)."""
    return _ap_f1_sorted(_sorted_split(scores, labels, "pixel AP", blocking))[0]


def pixel_f1_max(scores: ArrayLike, labels: ArrayLike, blocking: Blocking = DEFAULT_BLOCKING) -> float:
    """F1-max for very large inputs (equal to :func:`f1_max`)."""
    return _ap_f1_sorted(_sorted_split(scores, labels, "pixel F1-max", blocking))[1]


def pixel_metrics(scores: ArrayLike, labels: ArrayLike, blocking: Blocking = DEFAULT_BLOCKING) -> dict[str, float]:
    """``{"auroc", "ap", "f1_max"}`` for very large inputs, from one split and sort."""
    sp = _sorted_split(scores, labels, "pixel metrics", blocking)
    auc = _mann_whitney_auroc(sp, "pixel AUROC")
    ap, f1 = _ap_f1_sorted(sp)
    return {"auroc": auc, "ap": ap, "f1_max": f1}


# --------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------

# 8-connectivity within an image, no connection across images of a stack [B, H, W].
_STRUCTURE_2D = np.ones((3, 3), dtype=bool)


def _as_image_stack(x: ArrayLike, what: str, name: str) -> np.ndarray:
    if _is_tensor(x):
        t = x.detach()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        a = t.cpu().numpy()
    else:
        a = np.asarray(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(
            f"{what}: {name} must be [H, W], [B, H, W] or [B, 1, H, W]; got shape {a.shape}")
    return a


def _region_sizes(g: np.ndarray) -> tuple[np.ndarray, int]:
    """Size of the region of each anomalous pixel, in C order of the stack, and the number of regions.

    Regions: connected components of each image's mask with 8-connectivity (3 x 3 structure of
    ones), labelled image by image so that no region spans two images.
    """
    from scipy import ndimage

    ids_per_image = []
    n_regions = 0
    for gi in g:
        if not gi.any():
            continue
        lab, k = ndimage.label(gi, structure=_STRUCTURE_2D)
        ids_per_image.append(lab[gi].astype(np.int64) + (n_regions - 1))
        n_regions += int(k)
    if n_regions == 0:
        return np.zeros(0, dtype=np.int64), 0
    ids = np.concatenate(ids_per_image)
    sizes = np.bincount(ids, minlength=n_regions)
    return sizes[ids], n_regions


def _pro_weights(pixel_region_sizes: np.ndarray, n_regions: int) -> np.ndarray:
    """A pixel of a region of size s adds 1 / (s * number of regions) to PRO."""
    return 1.0 / (pixel_region_sizes.astype(np.float64) * n_regions)


def _region_weights(g: np.ndarray) -> tuple[np.ndarray, int]:
    """PRO weight of each anomalous pixel, in C order of the stack, and the number of regions."""
    sizes, n_regions = _region_sizes(g)
    if n_regions == 0:
        return np.zeros(0, dtype=np.float64), 0
    return _pro_weights(sizes, n_regions), n_regions


def _aupro_core(pos_sorted: np.ndarray, w_sorted: np.ndarray, neg_sorted: np.ndarray,
                fpr_limit: float, n_neg: int | None = None) -> float:
    """Exact AUPRO from anomalous scores (ascending) with their PRO weights, and normal scores.

    The PRO/FPR curve passes through (0, 0) and one point per distinct threshold t:
    FPR(t) = #{normal >= t} / N and PRO(t) = sum of the weights of anomalous pixels >= t.
    Going down through the thresholds, the curve moves right only at normal scores: at a normal
    score v shared by c normal pixels it goes from (x, PRO(> v)) to (x + c / N, PRO(>= v)) in a
    straight line; at thresholds held by anomalous pixels alone it moves straight up (no area).
    So the trapezoid area is a sum over the distinct normal scores v (descending) of
    c / N * (PRO(> v) + PRO(>= v)) / 2, with the segment that crosses ``fpr_limit`` cut there
    (linear interpolation).

    With ``n_neg`` (the number of normal pixels), ``neg_sorted`` may be the top of the sorted
    normal scores only, as long as it holds every score >= the ``ceil(fpr_limit * n_neg) + 1``-th
    largest (the same area: nothing below is read).
    """
    held = int(neg_sorted.shape[0])
    n_neg = held if n_neg is None else int(n_neg)
    # suffix sums: cw[i] = sum of w_sorted[i:], cw[-1] = 0, so PRO(>= v) = cw[searchsorted(v, left)]
    cw = np.zeros(pos_sorted.shape[0] + 1, dtype=np.float64)
    cw[:-1] = np.cumsum(w_sorted[::-1])[::-1]
    # Only the normal scores up to FPR = fpr_limit matter: the top ceil(limit * N) of them (one
    # more against rounding) and the rest of the last run of ties.
    need = min(n_neg, int(math.ceil(fpr_limit * n_neg)) + 1)
    start = int(np.searchsorted(neg_sorted, neg_sorted[held - need], side="left"))
    top = neg_sorted[start:][::-1]  # descending (a view)
    # runs of equal scores in `top`: [a_k, b_k), in decreasing order of score
    bounds = np.flatnonzero(top[1:] != top[:-1]) + 1
    a = np.concatenate(([0], bounds))
    b = np.concatenate((bounds, [top.size]))
    v = top[a]
    y0 = cw[np.searchsorted(pos_sorted, v, side="right")]  # PRO(> v): curve point before the run
    y1 = cw[np.searchsorted(pos_sorted, v, side="left")]  # PRO(>= v): curve point after the run
    x0 = a / n_neg
    x1 = b / n_neg
    full = x1 <= fpr_limit
    area = float(np.sum((x1[full] - x0[full]) * (y0[full] + y1[full])) * 0.5)
    cut = np.flatnonzero(~full & (x0 < fpr_limit))
    if cut.size:  # the segment that crosses fpr_limit: interpolate PRO there
        k = int(cut[0])
        y_lim = y0[k] + (y1[k] - y0[k]) * ((fpr_limit - x0[k]) / (x1[k] - x0[k]))
        area += (fpr_limit - x0[k]) * (y0[k] + y_lim) * 0.5
    return area / fpr_limit


class _PixelData(NamedTuple):
    pos: np.ndarray  # anomalous-pixel scores, ascending
    w: np.ndarray  # their PRO weights, in the same order
    neg: np.ndarray  # normal-pixel scores, ascending
    n_regions: int


def _pixel_data(maps: ArrayLike, masks: ArrayLike, what: str) -> _PixelData:
    m = _as_image_stack(maps, what, "maps")
    g = _as_image_stack(masks, what, "masks")
    if m.shape != g.shape:
        raise ValueError(
            f"{what}: maps of shape {m.shape} and masks of shape {g.shape} do not match")
    if m.size == 0:
        raise ValueError(f"{what}: no pixels")
    g = _check_labels_np(g.reshape(-1), what).reshape(g.shape)
    w, n_regions = _region_weights(g)
    pos, neg = _split_numpy(m.reshape(-1), g.reshape(-1), what)
    del m, g
    neg.sort()
    # the positives are sorted through an argsort so that their weights follow them
    order = np.argsort(pos)
    pos = pos[order]
    w = w[order]
    del order
    if _has_nan_sorted(pos) or _has_nan_sorted(neg):
        raise ValueError(f"{what}: the maps contain NaN")
    return _PixelData(pos, w, neg, n_regions)


def _aupro_from_data(d: _PixelData, fpr_limit: float) -> float:
    if d.n_regions == 0:
        raise ValueError(
            f"AUPRO is undefined: the masks hold no anomalous region ({d.neg.shape[0]} pixels, "
            "all normal)")
    if d.neg.shape[0] == 0:
        raise ValueError(
            f"AUPRO is undefined: the masks hold no normal pixel ({d.pos.shape[0]} pixels, "
            "all anomalous)")
    return _aupro_core(d.pos, d.w, d.neg, fpr_limit)


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit``.

    The MVTec-AD definition. Regions are the connected components of each image's ground-truth
    mask, with 8-connectivity (``scipy.ndimage.label`` with a 3 x 3 structure of ones; regions
    never span two images). At threshold t a pixel is predicted anomalous when its score is
    >= t; PRO(t) is the mean over all regions of the fraction of the region predicted anomalous,
    and FPR(t) the fraction of normal pixels predicted anomalous. The curve through (0, 0) and
    every distinct threshold is integrated with the trapezoid rule from FPR 0 to ``fpr_limit``,
    interpolating linearly at ``fpr_limit``, and divided by ``fpr_limit`` (a perfect map gives
    1, a constant map ``fpr_limit / 2``).

    Exact: every distinct score is a threshold (no threshold grid, hence no ``num_thresholds``
    argument). ``maps``/``masks``: [H, W], [B, H, W] or [B, 1, H, W], numpy or torch (moved to
    the CPU). Raises ``ValueError`` when there is no anomalous region, no normal pixel, or NaN.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    return _aupro_from_data(_pixel_data(maps, masks, "AUPRO"), fpr_limit)


# --------------------------------------------------------------------------------------------
# all at once
# --------------------------------------------------------------------------------------------

def compute_metrics(image_scores: ArrayLike, image_labels: ArrayLike,
                    pixel_maps: ArrayLike | None = None, pixel_masks: ArrayLike | None = None,
                    fpr_limit: float = 0.3) -> dict[str, float | int]:
    """Image metrics, and pixel metrics when maps and masks are given.

    Keys: ``image_auroc``, ``image_ap``, ``image_f1_max``, ``n_images``, ``n_normal``,
    ``n_abnormal``; with pixel data also ``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max`` and
    ``pixel_aupro`` (up to ``fpr_limit``). Pixel data ([B, H, W] or [B, 1, H, W]) is moved to the
    CPU and split and sorted once for all four pixel metrics (the normal pixels in one piece, on
    one thread, since AUPRO walks them in order: slower than :func:`pixel_auroc` on several
    cores). Extra memory: one copy of the maps plus about 28 bytes per anomalous pixel. One-class
    labels raise ``ValueError``.
    """
    if (pixel_maps is None) != (pixel_masks is None):
        raise ValueError("compute_metrics: give both pixel_maps and pixel_masks, or neither")
    fpr_limit = _check_fpr_limit(fpr_limit)
    c = binary_curve_counts(image_scores, image_labels)
    out: dict[str, float | int] = {
        "n_images": c.n_pos + c.n_neg,
        "n_normal": c.n_neg,
        "n_abnormal": c.n_pos,
        "image_auroc": _auroc_from_counts(c),
        "image_ap": _ap_from_counts(c),
        "image_f1_max": _f1max_from_counts(c),
    }
    if pixel_maps is None:
        return out
    d = _pixel_data(pixel_maps, pixel_masks, "pixel metrics")
    sp = _Split([d.pos], [d.neg])
    out["pixel_auroc"] = _mann_whitney_auroc(sp, "pixel AUROC")
    out["pixel_ap"], out["pixel_f1_max"] = _ap_f1_sorted(sp)
    out["pixel_aupro"] = _aupro_from_data(d, fpr_limit)
    return out


# --------------------------------------------------------------------------------------------
# pixel metrics of maps held by several processes
# --------------------------------------------------------------------------------------------

class Collective(Protocol):
    """What :func:`sharded_pixel_metrics` needs from the processes (mvfa.runtime.distributed.NumpyCollective)."""

    is_main: bool

    def all_gather_cat(self, array: np.ndarray) -> np.ndarray: ...  # every rank's array, rank order, everywhere
    def gather_cat(self, array: np.ndarray) -> np.ndarray | None: ...  # the same on the main rank only
    def all_sum(self, array: np.ndarray) -> np.ndarray: ...  # elementwise int64 sum over the ranks
    def all_min(self, value: int) -> int: ...
    def all_max(self, value: int) -> int: ...
    def broadcast(self, value: Any) -> Any: ...  # the main rank's value everywhere


# float dtype -> (signed and unsigned integer views, index of the sign bit)
_FLOAT_BITS = {np.dtype(np.float32): (np.int32, np.uint32, 31), np.dtype(np.float64): (np.int64, np.uint64, 63)}
_KEY_SENTINEL = (1 << 63) - 1  # beyond every key (an empty rank's min; its negation, an empty rank's max)


def _order_key(value, dtype: np.dtype) -> int:
    """An integer that orders like the float ``value`` (-0.0 and 0.0 share 0; NaN excluded)."""
    signed, _, sign_bit = _FLOAT_BITS[dtype]
    bits = int(np.array([value], dtype=dtype).view(signed)[0])
    return bits if bits >= 0 else -(bits & ((1 << sign_bit) - 1))


def _key_value(key: int, dtype: np.dtype):
    """The float of ``dtype`` whose order key is ``key``."""
    _, unsigned, sign_bit = _FLOAT_BITS[dtype]
    raw = key if key >= 0 else (-key) | (1 << sign_bit)
    return np.array([raw], dtype=unsigned).view(dtype)[0]


def _kth_largest(neg_sorted: np.ndarray, k: int, comm: Collective):
    """The ``k``-th largest of the scores that all processes hold (each its own, ascending).

    Bisection over the integers that order like the floats: at most 32 (float32) or 64 (float64)
    summed counts, and the answer is a score some process holds (exact, no rounding).
    """
    dtype = neg_sorted.dtype
    n = int(neg_sorted.shape[0])
    lo = comm.all_min(_order_key(neg_sorted[0], dtype) if n else _KEY_SENTINEL)
    hi = comm.all_max(_order_key(neg_sorted[-1], dtype) if n else -_KEY_SENTINEL)
    while lo < hi:  # invariant: #{x >= value(lo)} >= k > #{x >= value(hi + 1)}
        mid = (lo + hi + 1) // 2
        here = n - int(np.searchsorted(neg_sorted, _key_value(mid, dtype), side="left"))
        if int(comm.all_sum(np.array([here]))[0]) >= k:
            lo = mid
        else:
            hi = mid - 1
    return _key_value(lo, dtype)


def sharded_pixel_metrics(maps: ArrayLike, masks: ArrayLike, comm: Collective, full: bool = True,
                          fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel metrics of maps split over processes, equal to a single process's to the last digit.

    Each process holds the maps and masks of a run of consecutive images, the main rank the first
    run (mvfa.runtime.distributed's batch shards). Returns ``pixel_auroc`` and, when ``full``, also
    ``pixel_ap``, ``pixel_f1_max`` and ``pixel_aupro`` (up to ``fpr_limit``): the values
    :func:`compute_metrics` (and :func:`pixel_auroc`) give on the concatenated maps, because
    every quantity is either an exact integer count or the same floating-point computation on the
    same arrays:

    * the anomalous-pixel scores are gathered on every process in image order (the same array a
      single process builds) and sorted by the same argsort;
    * for each of them, each process counts its normal pixels below and level with it (binary
      search in its own sorted normal scores); the integer counts are summed over the processes.
      AUROC = (2 #less + #equal) / (2 P N) as in :func:`pixel_auroc`; AP and F1-max run the
      chunked float sums of the single-process code on the same chunks and counts;
    * AUPRO reads only the normal pixels down to FPR ``fpr_limit``: the cut (the
      ``ceil(fpr_limit N) + 1``-th largest normal score) is found by bisection with summed counts,
      the normal scores at or above it and the anomalous pixels' PRO weights (regions are labelled
      image by image; the number of regions is summed) are gathered on the main rank, which
      computes the area and sends it to the others.

    Memory per process: its maps, every anomalous score with an int64 count, and on the main rank
    about ``fpr_limit`` of the normal scores (a single process holds all the maps).
    """
    what = "pixel metrics"
    fpr_limit = _check_fpr_limit(fpr_limit)
    m = _as_image_stack(maps, what, "maps")
    g = _as_image_stack(masks, what, "masks")
    if m.shape != g.shape:
        raise ValueError(f"{what}: maps of shape {m.shape} and masks of shape {g.shape} do not match")
    g = _check_labels_np(g.reshape(-1), what).reshape(g.shape)
    sizes, local_regions = _region_sizes(g) if full else (np.zeros(0, dtype=np.int64), 0)
    pos, neg = _split_numpy(m.reshape(-1), g.reshape(-1), what)
    del m
    neg.sort()
    local_nan = bool(np.isnan(pos).any()) or _has_nan_sorted(neg)
    totals = comm.all_sum(np.array([pos.shape[0], neg.shape[0], local_regions, int(local_nan)]))
    n_pos, n_neg, n_regions, any_nan = (int(v) for v in totals)
    if n_pos + n_neg == 0:
        raise ValueError(f"{what}: no pixels")
    if any_nan:
        raise ValueError(f"{what}: the maps contain NaN")
    _require_both_classes(n_pos, n_neg, "pixel AUROC")

    all_pos = comm.all_gather_cat(pos)
    order = np.argsort(all_pos)
    pos_sorted = all_pos[order]
    del all_pos
    below = np.searchsorted(neg, pos_sorted, side="left").astype(np.int64)
    level = int((np.searchsorted(neg, pos_sorted, side="right") - below).sum())
    counts = comm.all_sum(np.concatenate([below, [level]]))
    neg_below, ties = counts[:-1], int(counts[-1])
    out = {"pixel_auroc": _exact_ratio(2 * int(neg_below.sum()) + ties, 2 * n_pos * n_neg)}
    if not full:
        return out
    out["pixel_ap"], out["pixel_f1_max"] = _ap_f1_sorted(_Split([pos_sorted], []), neg_below, n_neg)
    if n_regions == 0:
        raise ValueError(f"AUPRO is undefined: the masks hold no anomalous region ({n_neg} pixels, all normal)")
    need = min(n_neg, int(math.ceil(fpr_limit * n_neg)) + 1)
    cut = _kth_largest(neg, need, comm)
    top = comm.gather_cat(neg[int(np.searchsorted(neg, cut, side="left")):])
    weights = comm.gather_cat(_pro_weights(sizes, n_regions))
    area = None
    if comm.is_main:
        top.sort()
        area = _aupro_core(pos_sorted, weights[order], top, fpr_limit, n_neg)
    out["pixel_aupro"] = comm.broadcast(area)
    return out
