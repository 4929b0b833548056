"""mvfa.runs.training's step and loop on a tiny adapted CLIP and hand-made batches: what a step moves,
when the selector scores, which candidate wins, what the log and the logger receive."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from CLIP import create_model
from mvfa.method.model import AdaptedViT
from mvfa.runs import training
from mvfa.runs.run_log import RunLogger
from mvfa.runs.training import (
    Selector,
    Track,
    after_epoch,
    compute_loss,
    final_zero_shot_points,
    make_optimizers,
    release_zero_shot_points,
    train_loop,
    train_step,
)
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE

STAGES = [1, 2]  # two blocks only: the forward stops after the last stage
CPU = torch.device("cpu")
LAST_FC2 = f"%s_adapters.{len(STAGES) - 1}.fc2.0.weight"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run on one intra-op thread: OpenMP's hand-offs cost more than they save (much more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model() -> AdaptedViT:
    torch.manual_seed(0)
    return AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), STAGES)


def text_features() -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(64, 2, generator=torch.Generator().manual_seed(1)), dim=0)


def settings(**changes) -> SimpleNamespace:
    base = dict(epoch=2, learning_rate=1e-3, batch_size=1, precision="fp32", det_loss="release",
                ddp=False, seed=0, img_size=TINY_SIZE, num_workers=0)
    return SimpleNamespace(**{**base, **changes})


def one_image(seed: int, label: float, with_mask: bool) -> tuple:
    """A batch of one: (images, masks, labels, text features, has-masks flags, no prefix)."""
    image = torch.rand(1, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, 1, TINY_SIZE, TINY_SIZE)
    if with_mask and label:
        mask[..., 10:30, 20:40] = 1.0
    return image, mask, torch.tensor([label]), text_features(), torch.tensor([with_mask]), None


def det_batches(steps: int):
    """The same `steps` det-only batches every epoch (alternating labels)."""
    fixed = [one_image(seed, float(seed % 2), False) for seed in range(steps)]
    return lambda epoch: list(fixed)


def snapshot(model: AdaptedViT) -> dict[str, torch.Tensor]:
    state = model.adapter_state()
    return {f"{group}.{k}": v for group in state for k, v in state[group].items()}


def flat(state: dict) -> dict[str, torch.Tensor]:
    return {f"{group}.{k}": v for group in ("seg_adapters", "det_adapters") for k, v in state[group].items()}


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class ScriptedScorer:
    """Returns the listed scores in turn and keeps the adapters it saw at each call."""

    def __init__(self, model: AdaptedViT, scores: list) -> None:
        self.model, self.scores, self.seen = model, list(scores), []

    def __call__(self):
        self.seen.append(snapshot(self.model))
        value = self.scores[len(self.seen) - 1]
        return value, {"test_score": value} if value is not None else {}


class RecordingLogger(RunLogger):
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.rows: list[tuple[dict, int]] = []

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def row(self, row: dict, step: int) -> None:
        self.rows.append((dict(row), step))
        super().row(row, step)


def step_losses(logger: RecordingLogger) -> list[float]:
    return [value for tag, value, _ in logger.scalars if tag == "train/loss"]


# ------------------------------------------------------------------------------------------------
# The step


def test_det_only_step_moves_the_det_adapters_only():
    """A batch without masks: det adapters move, seg adapters (which do get gradients) and every CLIP weight stay bit-identical."""
    model = tiny_model()
    optimizers = make_optimizers(model, 1e-3)
    clip_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    before = snapshot(model)
    images, masks, labels, features, flags, _ = one_image(3, 1.0, False)
    parts = train_step(model, optimizers, images, masks, labels, features, flags)
    assert parts.seg is None and torch.equal(parts.total, parts.det)
    after = snapshot(model)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.seg_adapters.parameters())
    for key in before:
        moved = not torch.equal(before[key], after[key])
        assert moved == (key.startswith("det_adapters") and key != LAST_FC2 % "det"), key
    assert all(torch.equal(v, clip_before[k]) for k, v in model.visual.state_dict().items())


def test_step_with_masks_moves_both_adapter_groups_and_no_clip_weight():
    """A batch with masks: every adapter weight that feeds a loss moves (all but the last stage's fc2), no CLIP weight."""
    model = tiny_model()
    optimizers = make_optimizers(model, 1e-3)
    clip_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    before = snapshot(model)
    images, masks, labels, features, flags, _ = one_image(4, 1.0, True)
    parts = train_step(model, optimizers, images, masks, labels, features, flags)
    assert parts.seg is not None and torch.allclose(parts.total, parts.det + parts.seg)
    after = snapshot(model)
    unused = {LAST_FC2 % "seg", LAST_FC2 % "det"}  # their output joins the stream after the last stage: no gradient
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(before) - unused
    assert all(torch.equal(v, clip_before[k]) for k, v in model.visual.state_dict().items())


def test_batch_loss_is_the_mean_of_the_per_image_losses():
    """det of a batch of two is the mean of the two images' det; seg counts the masked image with weight 1/2."""
    model = tiny_model()
    a, b = one_image(5, 1.0, True), one_image(6, 0.0, False)
    batch = [torch.cat([x, y]) for x, y in zip(a[:3], b[:3])]
    with torch.no_grad():
        both = compute_loss(model, *batch, a[3], torch.tensor([True, False]))
        alone_a = compute_loss(model, *a[:5])
        alone_b = compute_loss(model, *b[:5])
    assert torch.allclose(both.det, (alone_a.det + alone_b.det) / 2, atol=1e-6)
    assert torch.allclose(both.seg, alone_a.seg / 2, atol=1e-6)
    assert alone_b.seg is None


# ------------------------------------------------------------------------------------------------
# The loop: points, ties, rows, the logger


@pytest.mark.parametrize("keep_ties, winner", [(True, 7), (False, 1)])
def test_release_points_and_tie_rule(keep_ties, winner):
    """release points of 10 steps: scored before steps 0, 2, 4, 6, 8 of each epoch; a tie is won by the latest (keep_ties) or the earliest call."""
    model = tiny_model()
    initial = snapshot(model)
    scorer = ScriptedScorer(model, [0.1, 0.5, 0.5, 0.2, 0.5, 0.3, 0.4, 0.5, 0.1, 0.0])
    rows: list[dict] = []
    logger = RecordingLogger()
    (out,) = train_loop(settings(epoch=2), model, det_batches(10),
                        [Track(Selector(release_zero_shot_points, scorer, keep_ties), "test", rows, logger)], CPU)
    points = [(e, s) for e in (1, 2) for s in (0, 2, 4, 6, 8)]
    assert [(r["epoch"], r["step"]) for r in rows] == points
    assert equal_states(scorer.seen[0], initial)  # the untrained adapters are scored first
    assert not equal_states(scorer.seen[-1], snapshot(model))  # the state after the last step is never scored
    assert (out["epoch"], out["step"], out["score"]) == (*points[winner], 0.5)
    assert equal_states(flat(out["adapters"]), scorer.seen[winner])
    losses = step_losses(logger)
    assert len(losses) == 20
    assert rows[0]["loss"] == "" and rows[5]["loss"] == ""  # nothing trained yet in this epoch
    assert rows[1]["loss"] == pytest.approx(np.mean(losses[0:2])) and rows[9]["loss"] == pytest.approx(np.mean(losses[10:18]))


def test_after_epoch_scores_the_end_of_every_epoch_and_the_earliest_tie_wins():
    """after_epoch: one row per epoch at step N with the epoch's mean loss; the earliest of equal scores wins."""
    model = tiny_model()
    scorer = ScriptedScorer(model, [0.3, 0.7, 0.7])
    rows: list[dict] = []
    (out,) = train_loop(settings(epoch=3), model, det_batches(3), [Track(Selector(after_epoch, scorer), "test", rows)], CPU)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 3), (2, 3), (3, 3)]
    assert [r["loss"] for r in rows] == pytest.approx(out["epoch_losses"])
    assert equal_states(scorer.seen[-1], snapshot(model))  # the end of the epoch is what is scored
    assert (out["epoch"], out["step"], out["score"]) == (2, 3, 0.7)
    assert equal_states(flat(out["adapters"]), scorer.seen[1])


def test_final_points_score_the_final_adapters():
    """final points of 10 steps: after steps 2, 4, 6, 8, 10; the last row scores the epoch's final adapters."""
    model = tiny_model()
    scorer = ScriptedScorer(model, [0.1, 0.2, 0.3, 0.4, 0.9])
    rows: list[dict] = []
    (out,) = train_loop(settings(epoch=1), model, det_batches(10), [Track(Selector(final_zero_shot_points, scorer), "test", rows)],
                        CPU)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    assert (out["epoch"], out["step"]) == (1, 10)
    assert equal_states(flat(out["adapters"]), snapshot(model))


def test_inactive_selector_returns_the_final_adapters_and_logs_each_epoch():
    """--select last: nothing is scored; one row per epoch (step N, the epoch's mean loss); the final adapters come back."""
    model = tiny_model()
    scorer = ScriptedScorer(model, [])
    rows: list[dict] = []
    logger = RecordingLogger()
    (out,) = train_loop(settings(epoch=2), model, det_batches(3),
                        [Track(Selector(after_epoch, scorer, active=False), "last", rows, logger)], CPU)
    assert scorer.seen == []
    losses = step_losses(logger)
    means = [np.mean(losses[0:3]), np.mean(losses[3:6])]
    assert rows == [{"epoch": 1, "step": 3, "loss": pytest.approx(means[0])},
                    {"epoch": 2, "step": 3, "loss": pytest.approx(means[1])}]
    assert out["epoch_losses"] == pytest.approx(means)
    assert (out["score"], out["epoch"], out["step"]) == (None, 2, None)
    assert equal_states(flat(out["adapters"]), snapshot(model))


def test_no_score_means_the_final_adapters():
    """A scorer that gives no value (None) selects nothing: the final adapters come back, score None."""
    model = tiny_model()
    rows: list[dict] = []
    (out,) = train_loop(settings(epoch=1), model, det_batches(2), [Track(Selector(after_epoch, ScriptedScorer(model, [None])),
                        "test", rows)], CPU)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2)]
    assert out["score"] is None and out["step"] is None
    assert equal_states(flat(out["adapters"]), snapshot(model))


def test_logger_receives_every_step_loss_and_every_row():
    """The logger gets train/loss at steps 1..N over the run, and each row (with its curves) at the steps done so far."""
    model = tiny_model()
    scorer = ScriptedScorer(model, [0.4, 0.6])
    rows: list[dict] = []
    logger = RecordingLogger()
    (out,) = train_loop(settings(epoch=2), model, det_batches(2), [Track(Selector(after_epoch, scorer), "test", rows, logger)], CPU)
    assert [step for tag, _, step in logger.scalars if tag == "train/loss"] == [1, 2, 3, 4]
    assert [(row, step) for row, step in logger.rows] == [(rows[0], 2), (rows[1], 4)]
    assert ("test/score", 0.6, 4) in logger.scalars and ("epoch/loss", rows[1]["loss"], 4) in logger.scalars
    losses = step_losses(logger)
    assert out["epoch_losses"] == pytest.approx([np.mean(losses[:2]), np.mean(losses[2:])])
    assert list(rows[0]) == ["epoch", "step", "loss", "test_score"]


def test_progress_lines_when_output_goes_to_a_file(monkeypatch, capsys):
    """stderr not a terminal (a log file, CI): a progress line at most every progress_every_s seconds; on a terminal none."""
    model = tiny_model()
    monkeypatch.setattr(training.sys.stderr, "isatty", lambda: False, raising=False)
    train_loop(settings(epoch=1), model, det_batches(3), [Track(Selector(after_epoch, ScriptedScorer(model, []),
               active=False), "last")], CPU, progress_every_s=0.0)  # every step is due
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/1 step 1/3", "epoch 1/1 step 2/3", "epoch 1/1 step 3/3"]
    monkeypatch.setattr(training.sys.stderr, "isatty", lambda: True, raising=False)
    train_loop(settings(epoch=1), model, det_batches(3), [Track(Selector(after_epoch, ScriptedScorer(model, []),
               active=False), "last")], CPU, progress_every_s=0.0)
    assert not [line for line in capsys.readouterr().out.splitlines() if " step " in line]


def test_several_tracks_follow_one_trajectory_each_as_alone():
    """Two selections along one trajectory (release points with ties, final points; and --select last):
    the same losses and, per track, the rows, the selection and the adapters of the track alone."""
    def tracks(model):
        return [Track(Selector(release_zero_shot_points, ScriptedScorer(model, [0.1, 0.6, 0.6, 0.2, 0.5] * 2), True), "test"),
                Track(Selector(final_zero_shot_points, ScriptedScorer(model, [0.4, 0.9, 0.3, 0.2, 0.1] * 2)), "valid"),
                Track(Selector(after_epoch, ScriptedScorer(model, []), active=False), "last")]

    together_model = tiny_model()
    together = tracks(together_model)
    shared = train_loop(settings(epoch=2), together_model, det_batches(5), together, CPU)
    for index in range(3):
        alone_model = tiny_model()
        alone_track = tracks(alone_model)[index]
        (alone,) = train_loop(settings(epoch=2), alone_model, det_batches(5), [alone_track], CPU)
        assert together[index].log_rows == alone_track.log_rows
        assert (shared[index]["epoch"], shared[index]["step"], shared[index]["score"]) == \
            (alone["epoch"], alone["step"], alone["score"])
        assert shared[index]["epoch_losses"] == alone["epoch_losses"]
        assert equal_states(flat(shared[index]["adapters"]), flat(alone["adapters"]))
    assert (shared[0]["epoch"], shared[0]["step"]) == (2, 2) and (shared[1]["epoch"], shared[1]["step"]) == (1, 2)
    assert shared[2]["step"] is None and equal_states(flat(shared[2]["adapters"]), snapshot(together_model))


def test_a_diverged_trajectory_reports_each_tracks_last_good_selection():
    """NaN loss: TrainingDiverged names where, with each track's last good selection (None before any)."""
    model = tiny_model()
    images, masks, labels, text, flags, prefix = one_image(0, 1.0, False)
    poisoned = [one_image(1, 0.0, False), (images * float("nan"), masks, labels, text, flags, prefix)]
    tracks = [Track(Selector(release_zero_shot_points, ScriptedScorer(model, [0.5, 0.7])), "test"),
              Track(Selector(after_epoch, ScriptedScorer(model, [])), "valid")]
    with pytest.raises(training.TrainingDiverged) as err:
        train_loop(settings(epoch=1), model, lambda epoch: list(poisoned), tracks, CPU)
    assert err.value.where == {"epoch": 1, "step": 2}
    assert err.value.best[0]["score"] == 0.7 and err.value.best[0]["step"] == 1
    assert err.value.best[1] is None
