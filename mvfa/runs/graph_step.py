"""The training step of runs trained together (training.group_train_step) replayed from CUDA graphs.

Why: at batch 1 a step is thousands of small kernels (the adapted blocks' forward, both losses, the
backward, and Adam one tensor at a time), and the host's time to launch them, not the GPU's time to run
them, bounds the step. A CUDA graph launches the whole recorded step at once. The graph replays the
eager step's own kernels, in its order, so the results are the eager step's to float rounding (the
backward of some kernels adds with atomics, whose order varies from run to run, eager or not). A
CUDA graph rather than torch.compile(mode="reduce-overhead"): compiled kernels fuse and round
differently, and every key below would be a recompilation.

`CapturedStep` is a drop-in for `group_train_step` (the same call, the same results), on CUDA, with a
`GroupOptimizer(..., capturable=True)` (Adam's step counts on the device, so the update can be recorded).
One graph per key (`StepKey`): what the recorded work depends on beyond the values of the inputs, i.e. the
active runs, every active image's host has-masks flag (they decide which adapters step and whether the
seg loss is computed), the shapes and dtypes of the inputs (the image count, the prefix or the images),
the det loss form and the autocast state. A new key: the batch is copied into static input buffers
(`StaticInputs`), the step is rehearsed eagerly on a side stream and then undone (`rehearse`), recorded
into a `torch.cuda.CUDAGraph`, and replayed once for the real step. A known key: the batch is copied into
its buffers and the graph replayed. The losses are cloned out of the graph's static outputs. Keys are few in
practice (few-shot: one; zero-shot: the runs' masks patterns; the final steps, when runs finish), so at
most `max_graphs` graphs are recorded; a step of any other key runs eagerly (`group_train_step`).

The choices that keep the replayed step equal to the eager one:
- Static gradients without zeroing. Every gradient is None when the recording starts (the body starts
  with GroupOptimizer.zero_grad, set_to_none), so the backward records a write of each gradient, not an
  accumulation, into a tensor it allocates from the graph's memory pool; each replay rewrites them, and no
  zeroing kernel is needed. GroupOptimizer.step ends with set_to_none too, so after the recording no
  parameter holds a gradient in the pool (as after an eager step): the gradients are scratch of the graph.
- Parameters that must not step are not in the recorded update. With capturable Adam a zero gradient
  would still advance a parameter's step count and moments. GroupOptimizer.step sets to None the
  gradients of the runs that do not step and of the seg adapters of runs without masks, on the host,
  before Adam's update; Adam visits only the parameters with a gradient, so the recorded update holds
  exactly the parameters that step for this key (which the key's has-masks flags fix), and a replay never
  touches the others, their moments or their step counts.
- The rehearsal changes nothing. torch's recipe for recording a whole network runs a few eager iterations
  on a side stream first (lazy initialisations, cuBLAS workspaces, allocator state). They would step the
  adapters and Adam: `rehearse` copies the adapters and Adam's state before and copies them back in place
  after (in place: the graph records their addresses). It also creates the Adam state of parameters that
  had none (a recording must not create state: the initialisation would be recorded and rerun by every
  replay); their state goes back to zeros with step 0, which is exactly the state Adam would create.
- The has-masks flags are on the device. group_train_step copies the host flags to the device before
  group_losses, and a recording cannot hold a host-to-device copy (it synchronises, and its host buffer
  is temporary); the recorded step hands group_losses the flags in a device tensor made once per key
  (their values are part of the key).
- Autocast without its cache. Autocast caches the casts of the adapters within one autocast region; a
  cast cached by the rehearsal would be read by the recording instead of recorded, and every replay would
  use stale weights. The rehearsal and the recording run under the caller's autocast with the cache off.
- One memory pool for all graphs. A recording may reuse memory that another graph's recording freed
  (its scratch: autograd's saved tensors, the gradients). That is safe because the replays run one at a
  time on one stream, each graph writes its scratch before it reads it, and what must outlive a replay
  lies outside the pool: the adapters, Adam's state and the static inputs (allocated outside any
  recording) and the static outputs (held by their graph, and cloned right after its replay).

A graph holds the addresses of the adapters, of Adam's state and of its static buffers: update them in
place (load_state_dict, load_adapter_state and Adam's own steps do); replacing a tensor, or changing a
learning rate, needs a new CapturedStep. Not CUDA: construction raises MVFAError.
"""
from __future__ import annotations

from collections.abc import Callable
import contextlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from mvfa.method.group import group_tokens
from mvfa.method.model import AdaptedViT
from mvfa.runs.training import GroupOptimizer, LossParts, group_losses, group_train_step
from mvfa.runtime.errors import MVFAError

# Keys recorded at most: 2**6, every masks pattern of six zero-shot targets at batch 1 (a recording costs
# about WARMUP_STEPS + 2 eager steps; the graphs share one memory pool).
MAX_GRAPHS = 64
WARMUP_STEPS = 3  # eager rehearsals before a recording (torch's documented recipe uses a few)

Signature = tuple[tuple[int, ...], torch.dtype]  # a tensor's shape and dtype


# ------------------------------------------------------------------------------------------------
# The key


class StepKey(NamedTuple):
    """What a recorded step depends on besides the values of its inputs (one graph per key)."""

    active: tuple[int, ...]  # the runs given a batch
    has_masks: tuple[bool, ...]  # every active image's host flag, run by run
    count: int  # images per run
    prefix: tuple[Signature, ...] | None  # each active run's prefix; None: the step encodes the images
    inputs: tuple[tuple[Signature, ...], ...]  # each active run's images, masks, labels, text features
    det_loss_form: str
    autocast: tuple[bool, torch.dtype | None]  # the caller's autocast on the parameters' device type

    def stepping(self) -> dict[int, bool]:
        """GroupOptimizer.step's argument: each active run -> whether its seg adapters step (some image has a mask)."""
        flags = iter(self.has_masks)
        return {run: any([next(flags) for _ in range(self.count)]) for run in self.active}


def signature(tensor: torch.Tensor) -> Signature:
    return tuple(tensor.shape), tensor.dtype


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, torch.get_autocast_dtype(device_type) if enabled else None


def step_key(batches: list[tuple | None], det_loss_form: str, device_type: str) -> StepKey:
    """The key of a step's batches (group_train_step's form; at least one given, all of one image count).
    The has-masks flags are read on the host, as group_train_step reads them."""
    active = tuple(run for run, batch in enumerate(batches) if batch is not None)
    given = [batches[run] for run in active]
    prefixes = all(batch[5] is not None for batch in given)  # else group_train_step encodes the images
    return StepKey(
        active=active,
        has_masks=tuple(bool(flag) for batch in given for flag in batch[4].cpu().tolist()),
        count=int(given[0][2].shape[0]),
        prefix=tuple(signature(batch[5]) for batch in given) if prefixes else None,
        inputs=tuple(tuple(signature(tensor) for tensor in batch[:4]) for batch in given),
        det_loss_form=det_loss_form,
        autocast=autocast_state(device_type),
    )


# ------------------------------------------------------------------------------------------------
# The static inputs


def _text_features(batch: tuple, count: int) -> torch.Tensor:
    """A run's text features per image, [count, embed, 2], as group_train_step expands them."""
    features = batch[3]
    return features if features.dim() == 3 else features.expand(count, *features.shape)


def _joined_parts(key: StepKey, given: list[tuple]) -> dict[str, list[torch.Tensor]]:
    """Each static buffer's parts, run by run: what group_train_step concatenates."""
    parts = {
        "masks": [batch[1] for batch in given],
        "labels": [batch[2] for batch in given],
        "features": [_text_features(batch, key.count) for batch in given],
    }
    parts["prefix" if key.prefix is not None else "images"] = [batch[5 if key.prefix is not None else 0] for batch in given]
    return parts


@dataclass
class StaticInputs:
    """A key's input buffers on the device, every active run's rows in group_train_step's order: the
    recorded step reads them, and each later step of the key is copied into them (the same storage)."""

    masks: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor  # [R * b, embed, 2]
    flags: torch.Tensor | None  # the has-masks flags as a device bool tensor; None: no image has a mask
    prefix: torch.Tensor | None = None  # given prefixes, or
    images: torch.Tensor | None = None  # the images, encoded by the step

    @classmethod
    def allocate(cls, key: StepKey, given: list[tuple], device: torch.device) -> "StaticInputs":
        """Buffers holding `given` (the active runs' batches), made outside any recording so that they
        stay out of the graphs' pool. The flags are fixed by the key: copied once, here."""
        joined = {name: torch.cat([part.to(device) for part in parts]) for name, parts in _joined_parts(key, given).items()}
        flags = torch.tensor(key.has_masks, dtype=torch.bool, device=device) if any(key.has_masks) else None
        return cls(flags=flags, **joined)

    def load(self, key: StepKey, given: list[tuple]) -> None:
        """Copy the active runs' batches of a step of `key` into the buffers, in place (one copy per buffer)."""
        for name, parts in _joined_parts(key, given).items():
            buffer = getattr(self, name)
            torch.cat([part.to(buffer.device) for part in parts], out=buffer)


# ------------------------------------------------------------------------------------------------
# The recorded work


StepOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [R] totals, det and seg parts, detached


def step_body(models: list[AdaptedViT], optimizer: GroupOptimizer, key: StepKey, inputs: StaticInputs) -> StepOutputs:
    """group_train_step's work on a key's static inputs: forward from the prefix (or the images), both
    losses, backward, and the Adam steps of the runs and adapters that step for the key. Every tensor
    operation is on the device and every host decision comes from the key, so it can be recorded; run
    eagerly, it is group_train_step on the same batch."""
    optimizer.zero_grad()  # every gradient None: the backward writes them (see the module's docstring)
    runs = [models[run] for run in key.active]
    lead = runs[0]
    prefix = inputs.prefix if inputs.prefix is not None else lead.encode_prefix(inputs.images)
    tokens = group_tokens(runs, prefix)
    totals, det, seg = group_losses(
        tokens, len(runs), inputs.masks, inputs.labels, inputs.features, inputs.flags, key.det_loss_form, lead.image_size)
    totals.sum().backward()  # each run's gradients reach only its own adapters
    optimizer.step(key.stepping())  # clears the gradients of what must not step, steps, clears the rest
    return totals.detach(), det.detach(), seg.detach()


def loss_parts(key: StepKey, runs: int, outputs: StepOutputs) -> list[LossParts | None]:
    """group_train_step's result from a step's outputs, cloned (a graph's outputs are rewritten by its
    next replay, and another graph's replay may reuse their memory)."""
    totals, det, seg = (output.clone() for output in outputs)
    stepping = key.stepping()
    parts: list[LossParts | None] = [None] * runs
    for index, run in enumerate(key.active):
        parts[run] = LossParts(total=totals[index], det=det[index], seg=seg[index] if stepping[run] else None)
    return parts


# ------------------------------------------------------------------------------------------------
# The rehearsal, undone


@dataclass
class TrainingState:
    """Copies of the adapters an optimiser steps and of their Adam state (None: the parameter had none)."""

    parameters: list[torch.Tensor]
    adam: list[dict[str, Any] | None]


def _parameters(optimizer: GroupOptimizer) -> list[torch.nn.Parameter]:
    return [parameter for group in optimizer.adam.param_groups for parameter in group["params"]]


def snapshot(optimizer: GroupOptimizer) -> TrainingState:
    parameters = _parameters(optimizer)
    adam = []
    for parameter in parameters:
        state = optimizer.adam.state.get(parameter)
        adam.append({name: value.clone() if torch.is_tensor(value) else value for name, value in state.items()}
                    if state else None)
    return TrainingState([parameter.detach().clone() for parameter in parameters], adam)


@torch.no_grad()
def restore(optimizer: GroupOptimizer, saved: TrainingState) -> None:
    """Put the adapters and Adam's state back as `saved` holds them, in place (the tensors keep their
    addresses). A parameter that had no state keeps the state made since, zeroed with step 0: the state
    Adam creates for it at its first step (so a first update from either is the same, bit for bit)."""
    for parameter, values, state in zip(_parameters(optimizer), saved.parameters, saved.adam):
        parameter.copy_(values)
        current = optimizer.adam.state.get(parameter)
        if not current:
            continue
        for name, value in current.items():
            if not torch.is_tensor(value):
                current[name] = state[name] if state is not None else type(value)(0)
            elif state is None:
                value.zero_()
            else:
                value.copy_(state[name])


def rehearse(optimizer: GroupOptimizer, body: Callable[[], object], times: int) -> None:
    """Run `body` (a training step) `times` times, then put the adapters and Adam's state back as they
    were: lazy initialisations happen, the training does not move."""
    saved = snapshot(optimizer)
    for _ in range(times):
        body()
    restore(optimizer, saved)


def autocast_without_cache(device_type: str) -> contextlib.AbstractContextManager:
    """The caller's autocast with its cast cache off (nothing when autocast is off): a cast cached before
    or during a recording would be read by the graph instead of recomputed from the current adapters."""
    enabled, dtype = autocast_state(device_type)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


# ------------------------------------------------------------------------------------------------
# The graphs (CUDA)


@dataclass
class _Recorded:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: StaticInputs
    outputs: StepOutputs


class CapturedStep:
    """group_train_step replayed from CUDA graphs, one per StepKey (see the module's docstring), for the
    runs `models` (siblings on one backbone) and their `optimizer` (GroupOptimizer(..., capturable=True)).

    `graphs`: the recorded keys; `eager_steps`: the steps run eagerly because the cap was reached."""

    def __init__(self, models: list[AdaptedViT], optimizer: GroupOptimizer, max_graphs: int = MAX_GRAPHS) -> None:
        device = models[0].adapter_parameters()[0].device
        if device.type != "cuda":
            raise MVFAError(
                f"CapturedStep: CUDA graphs need a CUDA device, and the adapters are on {device}; "
                "train with training.group_train_step there"
            )
        if not optimizer.adam.defaults.get("capturable", False):
            raise MVFAError("CapturedStep needs the optimiser built with GroupOptimizer(..., capturable=True)")
        self.models, self.optimizer, self.device, self.max_graphs = list(models), optimizer, device, max_graphs
        self.pool = torch.cuda.graph_pool_handle()  # shared by every graph (see the module's docstring)
        self.side = torch.cuda.Stream(device)  # the rehearsals' stream
        self.graphs: dict[StepKey, _Recorded] = {}
        self.eager_steps = 0

    def __call__(
        self, models: list[AdaptedViT], optimizer: GroupOptimizer, batches: list[tuple | None],
        det_loss_form: str = "release",
    ) -> list[LossParts | None]:
        """group_train_step(models, optimizer, batches, det_loss_form), from a graph."""
        if optimizer is not self.optimizer or len(models) != len(self.models) or any(
                a is not b for a, b in zip(models, self.models)):
            raise ValueError("CapturedStep steps the models and optimiser it was built for (its graphs hold their addresses)")
        given = [batch for batch in batches if batch is not None]
        if not given or any(int(batch[2].shape[0]) != int(given[0][2].shape[0]) for batch in given):
            return group_train_step(models, optimizer, batches, det_loss_form)  # nothing to step, or its error
        key = step_key(batches, det_loss_form, self.device.type)
        recorded = self.graphs.get(key)
        if recorded is None and len(self.graphs) >= self.max_graphs:
            self.eager_steps += 1
            return group_train_step(models, optimizer, batches, det_loss_form)
        if recorded is None:
            recorded = self.graphs[key] = self._record(key, given)
        else:
            recorded.inputs.load(key, given)
        recorded.graph.replay()
        return loss_parts(key, len(batches), recorded.outputs)

    def _record(self, key: StepKey, given: list[tuple]) -> _Recorded:
        """A new key's graph, its static inputs holding `given`; the training has not moved (the caller replays it)."""
        inputs = StaticInputs.allocate(key, given, self.device)

        def body() -> StepOutputs:
            with autocast_without_cache(self.device.type):
                return step_body(self.models, self.optimizer, key, inputs)

        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            rehearse(self.optimizer, body, WARMUP_STEPS)
        current.wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = body()
        except RuntimeError as err:
            self.optimizer.zero_grad()  # the gradients the failed recording left
            raise MVFAError(f"CapturedStep: recording the training step in a CUDA graph failed ({err}); "
                            "train with training.group_train_step") from err
        return _Recorded(graph, inputs, outputs)
