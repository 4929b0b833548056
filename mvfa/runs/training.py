"""Training: the step (multi-level losses on a batch, two Adam optimisers for the seg and det
adapters) and the loop around it (epochs of batches, model selection, the few- and zero-shot batches).

Per image, summed over stages (the release's loss):
- det: BCE of the stage's mean patch abnormality (det tokens) against the image label;
- seg (images of datasets with masks): focal + dice on the upsampled 2-class probabilities.
A batch of B images averages the per-image losses, so batch 1 is exactly the release's step.

Data-parallel (--ddp): every rank computes the loss of its own part of the batch, and the adapters'
gradients are then averaged over the ranks, weighted by their image counts, in one all-reduce
(mvfa.runtime.distributed.average_gradients), so a step of W ranks equals one step on the concatenated
batch. An explicit all-reduce rather than torch's DistributedDataParallel: DDP hooks the wrapped
module's forward only, while training also enters through forward_from_prefix (prefix cache), the
seg optimiser must step exactly when some rank's batch had masks, and the last batch of an epoch
may leave a rank with fewer images, or none, which plain DDP averaging would weight wrongly.

The loop reads its settings from any object with the fields of `LoopSettings` (mvfa.runs.config's
RunConfig has them).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import contextlib
from dataclasses import dataclass, field
import math
from pathlib import Path
import sys
import time
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from dataset.medical import ABNORMAL_DIR, IMAGE_DIR, NORMAL_DIR, ImageSet, MedicalDataset, Sample
from dataset.tensors import PIXEL_LEVELS, TensorSet

from mvfa.method import scoring
from mvfa.method.group import group_tokens
from mvfa.method.losses import BinaryDiceLoss, FocalLoss, det_loss
from mvfa.method.model import AdaptedViT, StageTokens
from mvfa.method.prefix import PrefixCache
from mvfa.runs.replay import RELEASE_SOURCE_ORDER, ReleaseRandom
from mvfa.runs.run_log import RunLogger
from mvfa.runtime.compute import autocast_for, progress
from mvfa.runtime.distributed import SINGLE, Dist, average_gradients, broadcast_parameters
from mvfa.runtime.errors import MVFAError

ADAM_BETAS = (0.5, 0.999)
MASK_THRESHOLD = 0.5
ZERO_SHOT_EVALS_PER_EPOCH = 5  # the release scores the target 5 times per zero-shot epoch
PROGRESS_LINE_S = 60.0  # output to a file: a progress line at most this often


class TrainingDiverged(MVFAError):
    """The loss or the adapters became NaN or infinite: training cannot go on.

    `where`: the epoch and step ({"epoch": e, "step": s}); `best`: per track, the last good selection
    (train_loop's dict with `adapters`, `epoch`, `step`, `score`), None when no evaluation had
    selected adapters."""

    def __init__(self, message: str, where: dict, best: list[dict | None]) -> None:
        super().__init__(message)
        self.where = where
        self.best = best
        self.run = 0  # runs trained together (train_group_loop): the index of the run that diverged


def adapters_finite(model: AdaptedViT) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.adapter_parameters())


@dataclass
class LossParts:
    total: torch.Tensor
    det: torch.Tensor
    seg: torch.Tensor | None


@dataclass
class Optimizers:
    seg: torch.optim.Optimizer
    det: torch.optim.Optimizer

    def zero_grad(self) -> None:
        self.seg.zero_grad(set_to_none=True)
        self.det.zero_grad(set_to_none=True)

    def step(self, seg: bool) -> None:
        """Both Adam steps; the seg optimiser only when the step's images had masks (`seg`)."""
        if seg:
            self.seg.step()
        self.det.step()


def make_optimizers(model: AdaptedViT, learning_rate: float) -> Optimizers:
    return Optimizers(
        seg=torch.optim.Adam(model.seg_adapters.parameters(), lr=learning_rate, betas=ADAM_BETAS),
        det=torch.optim.Adam(model.det_adapters.parameters(), lr=learning_rate, betas=ADAM_BETAS),
    )


def compute_loss(
    model: AdaptedViT,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    has_masks: torch.Tensor,
    det_loss_form: str = "release",
    prefix: torch.Tensor | None = None,
) -> LossParts:
    """Loss of a batch. text_features: [embed, 2] or per image [B, embed, 2]; has_masks: [B] bool.

    `prefix` (the frozen blocks' output for `images`, e.g. from a cache) skips recomputing them.
    """
    tokens = model(images) if prefix is None else model.forward_from_prefix(prefix)
    return loss_from_tokens(tokens, masks, labels, text_features, has_masks, det_loss_form, model.image_size)


def loss_from_tokens(
    tokens: StageTokens, masks: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor, has_masks: torch.Tensor,
    det_loss_form: str, image_size: int,
) -> LossParts:
    """compute_loss's work from a batch's stage tokens (class tokens included)."""
    tokens = tokens.patches()
    stage_scores = scoring.stage_image_scores(tokens.det, text_features)  # [stages, B]
    det = sum(det_loss(scores, labels, det_loss_form) for scores in stage_scores)
    if not bool(has_masks.any()):
        return LossParts(total=det, det=det, seg=None)
    focal, dice = FocalLoss(), BinaryDiceLoss()
    selected = has_masks.nonzero().flatten()
    target = (masks[selected] > MASK_THRESHOLD).float()
    seg_text = text_features[selected] if text_features.dim() == 3 else text_features
    seg = 0.0
    for stage_tokens in tokens.seg:
        probabilities = scoring.stage_probability_maps(stage_tokens[selected], seg_text, image_size)
        seg = seg + focal(probabilities, target) + dice(probabilities[:, scoring.ABNORMAL], target)
    # The seg loss averages over the images that have masks; weight it by their share of the batch.
    seg = seg * (selected.numel() / labels.shape[0])
    return LossParts(total=seg + det, det=det, seg=seg)


def train_step(
    model: AdaptedViT,
    optimizers: Optimizers,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    has_masks: torch.Tensor,
    det_loss_form: str = "release",
    prefix: torch.Tensor | None = None,
    dist: Dist | None = None,
) -> LossParts:
    """One optimisation step; the seg optimiser steps only when the batch holds images with masks.

    `dist` (data-parallel, several ranks): this rank's part of the batch, possibly empty; the
    gradients become those of the mean loss over every rank's images before the Adam steps, and
    the returned `total` is that mean (`det` and `seg` stay this rank's).
    """
    optimizers.zero_grad()
    if dist is None or not dist.active:
        parts = compute_loss(model, images, masks, labels, text_features, has_masks, det_loss_form, prefix)
        parts.total.backward()
        optimizers.step(seg=parts.seg is not None)
        return parts
    count = int(images.shape[0])
    parts = None
    if count:
        parts = compute_loss(model, images, masks, labels, text_features, has_masks, det_loss_form, prefix)
        parts.total.backward()
    local_loss = parts.total.item() if parts is not None else 0.0
    local_seg = parts is not None and parts.seg is not None
    _, mean_loss, any_seg = average_gradients(model.adapter_parameters(), count, local_loss, local_seg, dist)
    optimizers.step(seg=any_seg)
    zero = torch.zeros(())
    return LossParts(
        total=torch.tensor(mean_loss), det=parts.det if parts is not None else zero, seg=parts.seg if parts is not None else None
    )


class GroupOptimizer:
    """The Adam steps of runs trained together: one Adam over every run's adapters, each run with its
    learning rate. Adam keeps its moments and step count per parameter and skips a parameter without a
    gradient, so a run moves exactly as its own `Optimizers` would move it (the same per-tensor update,
    bit for bit given the same gradients): the gradients of a run that does not step (no batch), and
    of the seg adapters of a run whose images had no masks, are cleared before the update. (torch's
    fused Adam rounds differently, and Adam magnifies that where a gradient element is near zero:
    measured no faster here.)"""

    def __init__(self, models: list[AdaptedViT], learning_rates: list[float], capturable: bool = False) -> None:
        """capturable: Adam's step counts live on the parameters' device, so the update can be captured
        in a CUDA graph (torch's `capturable`; CUDA only)."""
        self.seg = [list(model.seg_adapters.parameters()) for model in models]
        self.det = [list(model.det_adapters.parameters()) for model in models]
        groups = [{"params": seg + det, "lr": rate} for seg, det, rate in zip(self.seg, self.det, learning_rates)]
        self.adam = torch.optim.Adam(groups, betas=ADAM_BETAS, foreach=False, capturable=capturable)

    def zero_grad(self) -> None:
        self.adam.zero_grad(set_to_none=True)

    def step(self, stepping: dict[int, bool]) -> None:
        """Step the runs in `stepping` (run -> whether its seg adapters step too); then clear every gradient."""
        for run in range(len(self.seg)):
            if run not in stepping:
                cleared = self.seg[run] + self.det[run]
            elif not stepping[run]:
                cleared = self.seg[run]
            else:
                continue
            for parameter in cleared:
                parameter.grad = None
        self.adam.step()
        self.zero_grad()

    def state(self, run: int, kind: str) -> list[dict]:
        """Run `run`'s Adam state of its `kind` ("seg" or "det") adapters, one dict per parameter (empty: never stepped)."""
        return [self.adam.state.get(parameter, {}) for parameter in getattr(self, kind)[run]]


def group_losses(
    tokens: StageTokens, runs: int, masks: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor,
    mask_flags: torch.Tensor | None, det_loss_form: str, image_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each run's loss computed for all runs at once: `tokens` hold every run's b images in group_tokens'
    order (run r at rows r * b ..), text_features [R * b, embed, 2], mask_flags [R * b] bool on the
    tokens' device (None: no image has a mask; decided on the host, so nothing here waits for the
    device and the step can be captured in a CUDA graph, mvfa.runs.graph_step).
    Returns [R] totals, det and seg parts (seg 0 for a run without masks). Per run, loss_from_tokens'
    terms: det the mean over its images; seg, per stage, the sum over its images with masks of (the
    image's mean focal loss + 1 - its dice) / b, which is the masked images' focal mean plus dice loss
    weighted by their share of the batch."""
    tokens = tokens.patches()
    per_run = labels.shape[0] // runs
    stage_scores = scoring.stage_image_scores(tokens.det, text_features)  # [stages, R * b]
    det = sum(det_loss(scores, labels, det_loss_form, reduction="none") for scores in stage_scores)
    det = det.reshape(runs, per_run).mean(dim=1)
    if mask_flags is None:
        return det, det, torch.zeros_like(det)
    focal, dice = FocalLoss(), BinaryDiceLoss()
    target = (masks > MASK_THRESHOLD).float()
    per_image = 0.0
    for stage_tokens in tokens.seg:
        probabilities = scoring.stage_probability_maps(stage_tokens, text_features, image_size)
        per_image = per_image + focal.per_image(probabilities, target) + dice.per_image(
            probabilities[:, scoring.ABNORMAL], target)
    weight = mask_flags.to(per_image.dtype)  # images without masks add nothing
    seg = (per_image * weight).reshape(runs, per_run).sum(dim=1) / per_run
    return det + seg, det, seg


def group_train_step(
    models: list[AdaptedViT], optimizer: GroupOptimizer, batches: list[tuple | None], det_loss_form: str = "release",
) -> list[LossParts | None]:
    """One step of runs trained together (mvfa.method.group): the runs given a batch (images, masks,
    labels, text features, has-masks flags on the host, prefix or None; the same image count for all)
    step from one batched forward and one batched loss (group_losses), each with its own loss and its
    own Adam state (GroupOptimizer); a run given None is not touched (no forward, no step: its Adam
    moments and step count stay as they are)."""
    active = [run for run, batch in enumerate(batches) if batch is not None]
    if not active:
        return [None] * len(batches)
    given = [batches[run] for run in active]
    count = int(given[0][2].shape[0])
    if any(int(batch[2].shape[0]) != count for batch in given):
        raise ValueError("runs stepped together need batches of the same image count")
    optimizer.zero_grad()
    lead = models[active[0]]
    if all(batch[5] is not None for batch in given):
        prefix = torch.cat([batch[5] for batch in given])
    else:
        prefix = lead.encode_prefix(torch.cat([batch[0] for batch in given]))
    tokens = group_tokens([models[run] for run in active], prefix)
    features = [batch[3] if batch[3].dim() == 3 else batch[3].expand(count, *batch[3].shape) for batch in given]
    has_masks = torch.cat([batch[4] for batch in given]).cpu()
    mask_flags = has_masks.to(prefix.device) if bool(has_masks.any()) else None
    totals, det, seg = group_losses(
        tokens, len(active), torch.cat([batch[1] for batch in given]), torch.cat([batch[2] for batch in given]),
        torch.cat(features), mask_flags, det_loss_form, lead.image_size,
    )
    totals.sum().backward()  # each run's gradients reach only its own adapters
    run_seg = has_masks.reshape(len(active), count).any(dim=1).tolist()
    optimizer.step(dict(zip(active, run_seg)))
    parts: list[LossParts | None] = [None] * len(batches)
    for index, run in enumerate(active):
        parts[run] = LossParts(total=totals[index].detach(), det=det[index].detach(),
                               seg=seg[index].detach() if run_seg[index] else None)
    return parts


# ------------------------------------------------------------------------------------------------
# The loop


class LoopSettings(Protocol):
    """The run settings the training loop and the batch builders read (mvfa.runs.config.RunConfig has them)."""

    epoch: int
    learning_rate: float
    batch_size: int
    precision: str
    det_loss: str
    ddp: bool
    seed: int
    img_size: int
    num_workers: int


class FewShotSupport(Protocol):
    """The augmented support a few-shot run trains on (mvfa.runs.support.FewShotData has it)."""

    support_images: torch.Tensor | None
    support_masks: torch.Tensor | None
    support_labels: torch.Tensor | None
    support_prefixes: torch.Tensor | None


@dataclass
class Track:
    """A model selection that follows a training trajectory: its selector, its --select (last: the
    adapters after the final step), and its run's log rows and logger. Several tracks can follow one
    trajectory (runs that differ only in how they select: mvfa.runs.run.run_together)."""

    selector: Selector
    select: str
    log_rows: list[dict] = field(default_factory=list)
    logger: RunLogger = field(default_factory=RunLogger)
    name: str = ""  # shown before the track's printed lines when several tracks share the trajectory


def train_loop(
    config: LoopSettings, model: AdaptedViT, batches: Callable[[int], Iterable[tuple]], tracks: list[Track],
    device: torch.device, dist: Dist = SINGLE, progress_every_s: float = PROGRESS_LINE_S,
) -> list[dict]:
    """The loop: epochs of `batches(epoch)` (sized, iterable); each track's selector scores the
    current adapters at its points of each epoch (the number of steps done: 0 is before the first step).

    Returns, per track, the selected adapters (`adapters`, with `epoch`, `step`, `score`) and
    `epoch_losses`, each epoch's mean loss (the release's printed `Loss:`). A track's `log_rows` get a
    row per evaluation, or per epoch when it scores nothing (--select last); its `logger` (e.g.
    TensorBoard) every step's loss and every row. Evaluations change neither the adapters nor any
    random draw, so each track selects exactly what it would following the trajectory alone. Where
    stderr is no terminal (a log file), a line reports progress every `progress_every_s` seconds. A
    NaN or infinite loss or adapter weight raises TrainingDiverged.

    Several ranks: without --ddp each trains the same batches; rank 0's adapters (a single
    process's, whatever the others' GPU rounding did) are broadcast before every evaluation and at
    the end, so all ranks evaluate, select and return the same adapters. With --ddp every rank
    trains its part of each batch (`batches` gives it) and the gradients are averaged.
    """
    trajectory = Trajectory(config, model, batches, tracks, dist, progress_every_s)
    optimizers = make_optimizers(model, config.learning_rate)
    parallel = dist if config.ddp and dist.active else None
    amp = autocast_for(device, config.precision)
    while (batch := trajectory.next_batch()) is not None:
        images, masks, labels, features, has_masks, prefix = batch
        with amp:
            parts = train_step(
                model, optimizers, images.to(device), masks.to(device), labels.to(device),
                features.to(device), has_masks.to(device), config.det_loss, prefix, parallel,
            )
        trajectory.record(parts.total.item())
    return trajectory.results()


GroupStep = Callable[[list[AdaptedViT], "GroupOptimizer", list, str], list]  # group_train_step's signature


def train_group_loop(
    configs: list[LoopSettings], models: list[AdaptedViT], batches: list[Callable[[int], Iterable[tuple]]],
    tracks: list[list[Track]], device: torch.device, progress_every_s: float = PROGRESS_LINE_S,
    after_step: Callable[[], None] | None = None,
    captured_step: Callable[[list[AdaptedViT], GroupOptimizer], GroupStep] | None = None,
) -> list[list[dict]]:
    """Runs trained together (mvfa.method.group): run r is `models[r]` (siblings on one backbone) with
    its own batches, tracks, optimiser and seeded orders; at each step every run that has a batch left
    steps, those of one image count as one batched computation (training.group_train_step); a run
    that has finished does not step. Each run's evaluations, selection and results are its own, as
    in train_loop (equal to it to float rounding). One process, no --ddp. `after_step` is called
    after every lockstep step (e.g. to drop evaluations made before it). `captured_step` (e.g.
    mvfa.runs.graph_step.CapturedStep) makes, from the models and their capturable optimiser, the
    step used instead of group_train_step. Returns train_loop's result per run."""
    trajectories = [Trajectory(c, m, b, t, SINGLE, progress_every_s, f"run {i + 1}: " if len(models) > 1 else "")
                    for i, (c, m, b, t) in enumerate(zip(configs, models, batches, tracks))]
    optimizer = GroupOptimizer(models, [config.learning_rate for config in configs], capturable=captured_step is not None)
    step_runs = captured_step(models, optimizer) if captured_step is not None else group_train_step
    amp = autocast_for(device, configs[0].precision)
    running = list(range(len(models)))
    while running:
        due = {}
        for run in running:
            with _naming(run):
                due[run] = trajectories[run].next_batch()
        running = [run for run in running if due[run] is not None]
        by_count: dict[int, list[int]] = {}
        for run in running:
            by_count.setdefault(int(due[run][2].shape[0]), []).append(run)
        for group in by_count.values():  # runs whose batches hold the same number of images step together
            step = [None] * len(models)
            for run in group:
                images, masks, labels, features, has_masks, prefix = due[run]
                step[run] = (images.to(device), masks.to(device), labels.to(device), features.to(device), has_masks,
                             prefix)
            with amp:
                parts = step_runs(models, optimizer, step, configs[group[0]].det_loss)
            for run in group:
                with _naming(run):
                    trajectories[run].record(parts[run].total.item())
        if after_step is not None:
            after_step()
    return [trajectory.results() for trajectory in trajectories]


@contextlib.contextmanager
def _naming(run: int) -> Iterator[None]:
    """A TrainingDiverged raised inside says which of the runs trained together diverged (`err.run`)."""
    try:
        yield
    except TrainingDiverged as err:
        err.run = run
        raise


class Trajectory:
    """One run's training driven a step at a time: its epochs of batches, its tracks' evaluations at
    their points, its losses, loggers and printed lines. `next_batch` evaluates what is due and gives
    the next batch to step (None at the end), `record` takes the step's loss, `results` the selections."""

    def __init__(self, config: LoopSettings, model: AdaptedViT, batches: Callable[[int], Iterable[tuple]],
                 tracks: list[Track], dist: Dist, progress_every_s: float, name: str = "") -> None:
        self.config, self.model, self.batches, self.tracks, self.dist, self.name = config, model, batches, tracks, dist, name
        self.effective = _effective_batch(config, dist)
        self.bests: list[dict] = [{"score": None} for _ in tracks]
        self.epoch_losses: list[float] = []
        self.steps_done = 0  # over the run: the loggers' step axis
        self.lines = _ProgressLines(config.epoch, progress_every_s)
        self.epoch, self.total, self.done, self.losses = 0, 0, 0, []
        self.points: list[set[int]] = []
        self.pending: Iterator | None = None  # the current epoch's batches

    def next_batch(self) -> tuple | None:
        while True:
            if self.pending is None:
                if self.epoch == self.config.epoch:
                    return None
                self._start_epoch()
            if due := [i for i, at in enumerate(self.points) if self.done in at]:
                self._evaluate(due)
            batch = next(self.pending, None)
            if batch is not None:
                return batch
            self._end_epoch()

    def record(self, loss: float) -> None:
        self.losses.append(loss)
        self.done += 1
        if not math.isfinite(loss):
            raise self._diverged(self.epoch, self.done, f"the loss is {loss}")
        self.steps_done += 1
        for track in self.tracks:
            track.logger.scalar("train/loss", loss, self.steps_done)
        self.lines.step(self.epoch, self.done, self.total, self.losses)

    def results(self) -> list[dict]:
        return [self._selected(track, best) for track, best in zip(self.tracks, self.bests)]

    def _start_epoch(self) -> None:
        self.epoch += 1
        epoch_batches = self.batches(self.epoch)
        self.total, self.done, self.losses = len(epoch_batches), 0, []
        self.points = [track.selector.points(self.total) for track in self.tracks]
        self.pending = iter(progress(epoch_batches, f"{self.name}epoch {self.epoch}/{self.config.epoch}"))

    def _end_epoch(self) -> None:
        """After the epoch's last step: the evaluations due at its end were made (next_batch); the log rows
        of tracks that score nothing, the epoch's printed line."""
        self.pending = None
        self.epoch_losses.append(float(np.mean(self.losses)) if self.losses else float("nan"))
        for track in self.tracks:
            if not track.selector.active:  # nothing scored: the epoch's loss is the log's row
                row = {"epoch": self.epoch, "step": self.total, "loss": self.epoch_losses[-1], **self.effective}
                track.log_rows.append(row)
                track.logger.row(row, self.steps_done)
            print(self.name + _epoch_summary(self.epoch, self.config.epoch, self.epoch_losses[-1], track, self.effective),
                  flush=True)

    def _diverged(self, epoch: int, step: int, what: str) -> TrainingDiverged:
        return TrainingDiverged(f"training diverged at epoch {epoch} step {step}: {what}", {"epoch": epoch, "step": step},
                                [best if best["score"] is not None else None for best in self.bests])

    def _evaluate(self, due: list[int]) -> None:
        model = self.model
        broadcast_parameters(model.adapter_parameters(), self.dist)
        if not adapters_finite(model):  # a last step's update can make them so (the next loss would say it)
            raise self._diverged(self.epoch, self.done, "the adapters hold NaN or infinite values")
        for index in due:
            track = self.tracks[index]
            value, detail = track.selector.score()
            row = {"epoch": self.epoch, "step": self.done, "loss": float(np.mean(self.losses)) if self.losses else "",
                   **self.effective, **detail}
            track.log_rows.append(row)
            track.logger.row(row, self.steps_done)
            if value is not None and track.selector.better(value, self.bests[index]["score"]):
                self.bests[index] = {"score": value, "epoch": self.epoch, "step": self.done, "adapters": model.adapter_state()}

    def _selected(self, track: Track, best: dict) -> dict:
        """A track's result: its best evaluation, or the last adapters (--select last, or nothing scored)."""
        if track.select == "last" or best["score"] is None:
            broadcast_parameters(self.model.adapter_parameters(), self.dist)
            if not adapters_finite(self.model):
                raise self._diverged(self.config.epoch, self.total, "the adapters hold NaN or infinite values")
            return {"score": None, "epoch": self.config.epoch, "step": None, "adapters": self.model.adapter_state(),
                    "epoch_losses": self.epoch_losses}
        print(f"{self.name}{track.name}selected epoch {best['epoch']} step {best['step']} ({track.select} {best['score']:.4f})")
        return {**best, "epoch_losses": self.epoch_losses}


class _ProgressLines:
    """Where stderr is no terminal (a log file): a line on the training's progress every `every_s` seconds."""

    def __init__(self, epochs: int, every_s: float) -> None:
        self.epochs, self.every_s, self.last = epochs, every_s, time.monotonic()
        self.active = not sys.stderr.isatty()

    def step(self, epoch: int, done: int, total: int, losses: list[float]) -> None:
        if self.active and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            print(f"epoch {epoch}/{self.epochs} step {done}/{total}: mean loss {np.mean(losses):.4f}", flush=True)


def _effective_batch(config: LoopSettings, dist: Dist) -> dict:
    """--ddp: the log rows' effective batch size (said once); else nothing."""
    if not config.ddp:
        return {}
    effective = {"effective_batch_size": dist.world_size * config.batch_size}
    print(
        f"data-parallel (--ddp): {dist.world_size} rank{'s' if dist.world_size > 1 else ''} x --batch_size "
        f"{config.batch_size} = effective batch {effective['effective_batch_size']} images per step"
    )
    return effective


def _epoch_summary(epoch: int, epochs: int, loss: float, track: Track, effective: dict) -> str:
    """The epoch's printed line: its mean loss, and the values of the track's last evaluation."""
    summary = f"{track.name}epoch {epoch}/{epochs}: loss {loss:.4f}"
    log_rows = track.log_rows
    if log_rows and log_rows[-1]["epoch"] == epoch:
        summary += "".join(
            f", {k} {v:.4f}" for k, v in log_rows[-1].items() if k not in ("epoch", "step", "loss", *effective)
        )
    return summary


# When the adapters are scored for model selection, as a function of the epoch's number of steps N;
# each returns the numbers of steps done at the evaluations (0: before the first step).
def after_epoch(steps: int) -> list[int]:
    """The few-shot release: once, after the epoch's last step."""
    return [steps]


def release_zero_shot_points(steps: int) -> list[int]:
    """The zero-shot release: before every step whose 0-based index is a multiple of N // 5 (so the
    untrained adapters are scored first, an epoch whose N is not a multiple of 5 has 6 evaluations,
    and the state after the last step is never scored). N < 5 (where the release divides by zero):
    before every step."""
    every = max(1, steps // ZERO_SHOT_EVALS_PER_EPOCH)
    return list(range(0, steps, every))


def final_zero_shot_points(steps: int) -> list[int]:
    """--eval_schedule final: after steps N/5, 2N/5, ..., N; the last evaluation scores the epoch's final adapters."""
    if steps == 0:
        return []
    return sorted({max(1, steps * (i + 1) // ZERO_SHOT_EVALS_PER_EPOCH) for i in range(ZERO_SHOT_EVALS_PER_EPOCH)})




class Selector:
    """When (the points of an epoch) and how the current adapters are scored for model selection,
    and which score wins: a higher one, or with `keep_ties` also an equal one (the latest tie wins)."""

    def __init__(
        self, points: Callable[[int], list[int]], scorer: Callable[[], tuple[float | None, dict]],
        keep_ties: bool = False, active: bool = True,
    ) -> None:
        self._points = points
        self.scorer = scorer
        self.keep_ties = keep_ties
        self.active = active  # --select last: nothing is scored

    def points(self, steps: int) -> set[int]:
        """The numbers of steps done (0 to `steps`) at which an epoch of `steps` batches is scored."""
        return set(self._points(steps)) if self.active else set()

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value >= best if self.keep_ties else value > best

    def score(self) -> tuple[float | None, dict]:
        """(the selection value, None for none; the log row's entries) of the current adapters."""
        return self.scorer()


def few_shot_batches(
    config: LoopSettings, few_shot: FewShotSupport, text_features: torch.Tensor, has_masks: bool, replay: ReleaseRandom,
) -> Callable[[int], list[tuple]]:
    """Each epoch: the augmented support (abnormal label 1, normal label 0) in the release's shuffled
    order, in batches. `replay` also makes the release's other draws of the epoch (the memory bank's
    shuffled support pass and the test pass of its evaluation), whatever this run evaluates."""
    count = len(few_shot.support_labels)
    bank_count = int((few_shot.support_labels == 0).sum())
    mask_flags = torch.full((count,), has_masks, dtype=torch.bool)

    def batches(epoch: int) -> list:
        order = torch.tensor(replay.shuffled_pass(count), dtype=torch.long)
        replay.shuffled_pass(bank_count)  # the evaluation's memory-bank loader
        replay.loader_pass()  # ... and its test loader
        out = []
        for start in range(0, count, config.batch_size):
            index = order[start : start + config.batch_size]
            prefix = few_shot.support_prefixes[index] if few_shot.support_prefixes is not None else None
            out.append(
                (few_shot.support_images[index], few_shot.support_masks[index], few_shot.support_labels[index],
                 text_features, mask_flags[index], prefix)
            )
        return out

    return batches


def release_source_order(sources: list[MedicalDataset]) -> list[MedicalDataset]:
    """The release's order of zero-shot sources (RELEASE_SOURCE_ORDER), other datasets after it by name."""
    rank = {name: i for i, name in enumerate(RELEASE_SOURCE_ORDER)}
    return sorted(sources, key=lambda d: (rank.get(d.name, len(rank)), d.name))


def listed_items(source: MedicalDataset, samples: list[Sample], first: int, listing: Callable[[Path], list[str]]) -> list[int]:
    """Indices (from `first`) of a source's test samples in the release's item order: the listing of
    test/good/img, then of test/Ungood/img. A listing must name exactly the folder's images."""
    by_name = {}
    for offset, sample in enumerate(samples):
        by_name[(sample.label, sample.path.name)] = first + offset
    items = []
    for label, kind in ((0, NORMAL_DIR), (1, ABNORMAL_DIR)):
        folder = source.root / "test" / kind / IMAGE_DIR
        names = [n for n in listing(folder) if (label, n) in by_name]
        expected = {n for (lab, n) in by_name if lab == label}
        if len(names) != len(expected) or set(names) != expected:
            missing = sorted(expected - set(names))[:3]
            raise MVFAError(
                f"the listing of {folder} does not name each of its {len(expected)} images once"
                f"{' (missing ' + ', '.join(missing) + ')' if missing else ' (repeated names)'}: "
                "check --listings, or run with --order sorted"
            )
        items += [by_name[(label, n)] for n in names]
    return items


def zero_shot_batches(
    config: LoopSettings, sources: list[MedicalDataset], text_features_of: Callable[[MedicalDataset], torch.Tensor],
    may_decode: Callable[[int], bool], replay: ReleaseRandom, listing: Callable[[Path], list[str]], dist: Dist = SINGLE,
    decoded: dict[str, TensorSet] | None = None,
) -> Callable[[int], Iterable[tuple]]:
    """Each epoch: the source datasets' test splits in the release's order; each image with its own
    dataset's text features.

    The release's epoch (ReleaseRandom.zero_shot_batches): each source's `listing` order (the file
    system's, as the release read it, unless --order sorted or --listings say otherwise) shuffled
    with Python's random and cut into --batch_size batches, the batch list shuffled, then visited in
    a shuffling DataLoader's order; `replay` also makes the draws of the epoch's evaluations.
    `text_features_of(source)` gives a source's text features. The sources are decoded once into
    uint8 tensors when `may_decode(nbytes)` allows their size (the run's prefix-cache budget; the
    release decodes every PNG every epoch; --prefix_cache off keeps that); the batches are the same.
    `decoded`: test splits already decoded (by name, e.g. the targets of zero-shot runs trained
    together, each one's test set another's source), used as they are; when every source is one of
    them and each holds its whole prefix cache (a target's test set cached for its evaluations), the
    batches carry their images' cached prefixes, so the steps skip the frozen blocks before the first
    stage (computed at the evaluation's batch size: equal to a step's own to float rounding).
    """
    images = SourceImages(config, sources, text_features_of, may_decode, listing, decoded or {})
    data_parallel = config.ddp and dist.active
    per_step = config.batch_size * (dist.world_size if data_parallel else 1)
    rank_offset = dist.rank * config.batch_size if data_parallel else 0

    def epoch_batches(epoch: int) -> _ZeroShotEpoch:
        """The release's batches of `per_step` images in its order (--ddp: the effective batch of every
        rank together, of which this rank takes its run)."""
        release = replay.zero_shot_batches(images.source_items, per_step)
        order = replay.shuffled_pass(len(release))
        for _ in release_zero_shot_points(len(release)):
            replay.loader_pass()  # the test loader of each of the release's evaluations
        return _ZeroShotEpoch(images, [release[i][rank_offset : rank_offset + config.batch_size] for i in order],
                              config.num_workers)

    return epoch_batches


class SourceImages:
    """The zero-shot sources' test images in the release's source order, with each image's source,
    text features and has-masks flag; each source's test split decoded once (or given decoded) when
    the budget allows, else every image decoded when its batch is loaded."""

    def __init__(
        self, config: LoopSettings, sources: list[MedicalDataset], text_features_of: Callable[[MedicalDataset], torch.Tensor],
        may_decode: Callable[[int], bool], listing: Callable[[Path], list[str]], decoded: dict[str, TensorSet],
    ) -> None:
        features, flags, samples, source_of, splits = [], [], [], [], []
        self.source_items: list[list[int]] = []  # each source's items in its listing order
        self.first: list[int] = []  # each source's first index
        for index, source in enumerate(release_source_order(sources)):
            features.append(text_features_of(source))
            flags.append(source.has_masks)
            split = source.samples("test")
            self.first.append(len(samples))
            self.source_items.append(listed_items(source, split, len(samples), listing))
            samples.extend(split)
            source_of.extend([index] * len(split))
            splits.append((source, split))
        self.features, self.flags = torch.stack(features), torch.tensor(flags)
        self.source_of = torch.tensor(source_of, dtype=torch.long)
        self.img_size = config.img_size
        self.dataset = ImageSet(samples, config.img_size)
        missing = [(source, split) for source, split in splits if source.name not in decoded]
        self.parts: list[TensorSet] | None = None
        if may_decode(sum(len(split) for _, split in missing) * 3 * config.img_size**2):
            own = {source.name: TensorSet.load(split, config.img_size, config.num_workers, desc=f"{source.name} (source)")
                   for source, split in missing}
            self.parts = [decoded[source.name] if source.name in decoded else own[source.name] for source, _ in splits]
        self.prefixes = self._whole_prefix_caches()

    def _whole_prefix_caches(self) -> list[PrefixCache] | None:
        """Each source's prefix cache when every source has one holding all its images, else None."""
        caches = [part.prefix_cache for part in self.parts] if self.parts is not None else [None]
        if any(cache is None or any(batch is None for batch in cache.batches) for cache in caches):
            return None
        return caches

    @property
    def decoded(self) -> bool:
        return self.parts is not None

    def as_batch(self, index: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> tuple:
        """(images, masks, labels, each image's own text features, has-masks flags, the images' cached
        prefixes or None)."""
        source = self.source_of[index]
        prefix = None
        if self.prefixes is not None and len(index):
            rows = []
            for item, part in zip(index.tolist(), source.tolist()):
                cache, row = self.prefixes[part], item - self.first[part]
                rows.append(cache.batch(row // cache.batch_size)[row % cache.batch_size])
            prefix = torch.stack(rows)
        return images, masks, labels.float(), self.features[source].cpu(), self.flags[source], prefix

    def load(self, indices: list[int]) -> tuple:
        """The batch of `indices`: from the decoded tensors, else decoded here (none: an empty batch)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if not indices:
            size = self.img_size
            return self.as_batch(index, torch.empty(0, 3, size, size), torch.empty(0, 1, size, size), torch.empty(0))
        if self.parts is not None:
            rows = [(self.parts[source], i - self.first[source]) for i, source in zip(indices, self.source_of[index].tolist())]
            images = torch.stack([part.images[row] for part, row in rows])
            masks = torch.stack([part.masks[row] for part, row in rows])
            labels = torch.stack([part.labels[row] for part, row in rows])
            return self.as_batch(index, images.float() / PIXEL_LEVELS, masks[:, None].float(), labels)
        batch = default_collate([self.dataset[i] for i in indices])
        return self.as_batch(index, batch["image"], batch["mask"], batch["label"])


class _ZeroShotEpoch:
    """One epoch's batches (lists of image indices), loaded as they are visited."""

    def __init__(self, images: SourceImages, parts: list[list[int]], num_workers: int) -> None:
        self.images, self.parts, self.num_workers = images, parts, num_workers

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self):
        if self.images.decoded or self.num_workers == 0:
            return (self.images.load(part) for part in self.parts)
        return self._from_workers()

    def _from_workers(self):
        """Decoding in worker processes, in this epoch's order (empty parts stay empty batches)."""
        filled = [part for part in self.parts if part]
        loader = iter(DataLoader(  # its own generator: the global random state stays untouched
            self.images.dataset, batch_sampler=filled, num_workers=self.num_workers, generator=torch.Generator()
        )) if filled else iter(())
        for part in self.parts:
            if not part:
                yield self.images.load(part)
                continue
            batch = next(loader)
            yield self.images.as_batch(torch.as_tensor(part, dtype=torch.long), batch["image"], batch["mask"], batch["label"])
