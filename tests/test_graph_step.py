"""The training step replayed from CUDA graphs (mvfa.runs.graph_step.CapturedStep).

On the CPU, the pieces the graphs are made of: the key, the static inputs, the recorded work run eagerly
(equal to group_train_step bit for bit, parameters that must not step untouched), the rehearsal undone bit
for bit, and the refusal to build without CUDA. On a GPU (skipped elsewhere): steps through CapturedStep
equal the eager group_train_step to float rounding, across keys, an idle run, a second masks pattern, a
solo run, autocast and the cap on the number of graphs."""
from __future__ import annotations

import pytest
import torch

from CLIP import create_model
from mvfa.method.model import AdaptedViT
from mvfa.runs.graph_step import (
    WARMUP_STEPS,
    CapturedStep,
    StaticInputs,
    loss_parts,
    rehearse,
    step_body,
    step_key,
)
from mvfa.runs.training import GroupOptimizer, group_train_step
from mvfa.runtime.errors import MVFAError
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

RUNS = 3
RATE = 1e-3
CUDA = torch.cuda.is_available()
GPU_TOL = dict(rtol=1e-4, atol=1e-5)  # the bound: float rounding (atomic adds in some backward kernels)
AUTOCAST_TOL = dict(rtol=1e-3, atol=1e-4)  # fp16: a stale cast of the adapters would move them by ~1e-3
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def models(device: torch.device = torch.device("cpu"), runs: int = RUNS) -> list[AdaptedViT]:
    """A backbone and `runs` runs on it, each with its own (different) adapters."""
    torch.manual_seed(0)
    lead = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES]).to(device)
    group = [lead.sibling() for _ in range(runs)]
    generator = torch.Generator().manual_seed(1)
    for model in group:
        for parameter in model.adapter_parameters():
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return group


def batch(seed: int, masks: tuple[bool, ...] = (True,), device: torch.device = torch.device("cpu"),
          prefix_of: AdaptedViT | None = None, per_image_text: bool = False) -> tuple:
    """A run's batch of len(masks) images (group_train_step's form); the prefix when `prefix_of` is given."""
    count = len(masks)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, TINY_SIZE, TINY_SIZE, generator=generator)
    mask = (torch.rand(count, 1, TINY_SIZE, TINY_SIZE, generator=generator) > 0.8).float()
    labels = torch.tensor([float((seed + i) % 2) for i in range(count)])
    text = torch.nn.functional.normalize(torch.randn(count, 64, 2, generator=generator), dim=1)
    text = text if per_image_text else text[0]
    images, mask, labels, text = (t.to(device) for t in (images, mask, labels, text))
    prefix = prefix_of.encode_prefix(images) if prefix_of is not None else None
    return images, mask, labels, text, torch.tensor(masks), prefix


def adam_state(optimizer: GroupOptimizer) -> list[dict]:
    return [optimizer.adam.state.get(p, {}) for group in optimizer.adam.param_groups for p in group["params"]]


def assert_same_training(a_models, a_opt, b_models, b_opt, **tol) -> None:
    """The adapters and Adam's state (moments, step counts, which parameters have one) of two groups agree:
    bit for bit without `tol`."""
    def same(x, y):
        if tol:
            torch.testing.assert_close(x, y, **tol)
        else:
            assert torch.equal(x, y)

    for a, b in zip(a_models, b_models):
        for x, y in zip(a.adapter_parameters(), b.adapter_parameters()):
            same(x, y)
    for x, y in zip(adam_state(a_opt), adam_state(b_opt)):
        assert x.keys() == y.keys()
        if x:
            assert int(x["step"]) == int(y["step"])
            same(x["exp_avg"], y["exp_avg"])
            same(x["exp_avg_sq"], y["exp_avg_sq"])


def assert_same_parts(got, expected, **tol) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert (a.seg is None) == (b.seg is None)
        for x, y in ((a.total, b.total), (a.det, b.det), (a.seg, b.seg)):
            if x is None:
                continue
            assert not x.requires_grad
            if tol:
                torch.testing.assert_close(x, y, **tol)
            else:
                assert torch.equal(x, y)


def body_step(group, optimizer, batches, det_loss_form="release"):
    """One step through the recorded work, run eagerly on the CPU (what a graph replays)."""
    key = step_key(batches, det_loss_form, "cpu")
    given = [b for b in batches if b is not None]
    inputs = StaticInputs.allocate(key, given, torch.device("cpu"))
    return loss_parts(key, len(batches), step_body(group, optimizer, key, inputs))


# ------------------------------------------------------------------------------------------------
# CPU


def test_the_key_distinguishes_what_it_must():
    lead = models(runs=1)[0]
    base = [batch(1, (True,)), batch(2, (False,)), None]
    key = step_key(base, "release", "cpu")
    assert key == step_key([batch(7, (True,)), batch(8, (False,)), None], "release", "cpu")  # other values, same key
    assert key.active == (0, 1) and key.has_masks == (True, False) and key.count == 1 and key.prefix is None
    assert key.stepping() == {0: True, 1: False}
    others = {
        "active runs": step_key([None, batch(1, (True,)), batch(2, (False,))], "release", "cpu"),
        "masks pattern": step_key([batch(1, (False,)), batch(2, (True,)), None], "release", "cpu"),
        "image count": step_key([batch(1, (True, False)), batch(2, (False, False)), None], "release", "cpu"),
        "prefixes given": step_key([batch(1, (True,), prefix_of=lead), batch(2, (False,), prefix_of=lead), None],
                                   "release", "cpu"),
        "text per image": step_key([batch(1, (True,), per_image_text=True), batch(2, (False,)), None], "release", "cpu"),
        "det loss form": step_key(base, "bce", "cpu"),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        others["autocast"] = step_key(base, "release", "cpu")
    for what, other in others.items():
        assert other != key, what
    assert others["image count"].stepping() == {0: True, 1: False}
    with_prefix = others["prefixes given"]
    half = [(b[0], b[1], b[2], b[3], b[4], b[5].half()) for b in
            [batch(1, (True,), prefix_of=lead), batch(2, (False,), prefix_of=lead), None] if b is not None] + [None]
    assert step_key(half, "release", "cpu") != with_prefix  # the prefix's dtype
    assert with_prefix.prefix[0][0] == tuple(lead.encode_prefix(base[0][0]).shape)


def test_static_inputs_hold_the_batch_as_the_eager_step_joins_it_and_keep_their_storage():
    lead = models(runs=1)[0]
    for prefix_of in (None, lead):
        first = [batch(1, (True, False), prefix_of=prefix_of), None, batch(2, (False, False), prefix_of=prefix_of,
                                                                         per_image_text=True)]
        second = [batch(3, (True, False), prefix_of=prefix_of), None, batch(4, (False, False), prefix_of=prefix_of,
                                                                          per_image_text=True)]
        key = step_key(first, "release", "cpu")
        assert key == step_key(second, "release", "cpu")
        given = [b for b in first if b is not None]
        inputs = StaticInputs.allocate(key, given, torch.device("cpu"))
        storage = {name: getattr(inputs, name).data_ptr() for name in ("masks", "labels", "features")}
        assert torch.equal(inputs.flags, torch.tensor([True, False, False, False]))
        for batches in (first, second):
            given = [b for b in batches if b is not None]
            inputs.load(key, given)
            assert torch.equal(inputs.masks, torch.cat([b[1] for b in given]))
            assert torch.equal(inputs.labels, torch.cat([b[2] for b in given]))
            assert torch.equal(inputs.features, torch.cat([given[0][3].expand(2, 64, 2), given[1][3]]))
            if prefix_of is None:
                assert inputs.prefix is None and torch.equal(inputs.images, torch.cat([b[0] for b in given]))
            else:
                assert inputs.images is None and torch.equal(inputs.prefix, torch.cat([b[5] for b in given]))
        assert storage == {name: getattr(inputs, name).data_ptr() for name in storage}
    no_masks = [batch(5, (False,)), batch(6, (False,))]
    assert StaticInputs.allocate(step_key(no_masks, "release", "cpu"), no_masks, torch.device("cpu")).flags is None


def test_the_recorded_work_run_eagerly_is_the_eager_step_bit_for_bit():
    """step_body with loss_parts, on static inputs, against group_train_step: the same losses, adapters
    and Adam state, across an idle run, runs without masks, a batch of 2, given prefixes and the bce form."""
    eager, body = models(), models()
    eager_opt, body_opt = GroupOptimizer(eager, [RATE, 2 * RATE, RATE]), GroupOptimizer(body, [RATE, 2 * RATE, RATE])
    lead = eager[0]
    steps = [
        ([batch(10, (False,)), batch(11, (False,)), batch(12, (True,))], "release"),  # seg of runs 0, 1 never stepped
        ([batch(20, (True,)), None, batch(22, (False,))], "release"),
        ([batch(30, (True, False)), batch(31, (False, True)), batch(32, (False, False))], "bce"),
        ([batch(40, (True,), prefix_of=lead), batch(41, (False,), prefix_of=lead), None], "release"),
        ([None, None, None], "release"),
    ]
    for batches, form in steps:
        expected = group_train_step(eager, eager_opt, batches, form)
        if all(b is None for b in batches):
            assert expected == [None] * RUNS
            continue
        assert_same_parts(body_step(body, body_opt, batches, form), expected)
        assert_same_training(body, body_opt, eager, eager_opt)
    assert all(p.grad is None for model in body for p in model.adapter_parameters())


def test_parameters_that_must_not_step_are_not_moved():
    """After a step of every run with masks, a step where run 1 is idle and run 2 has no mask: run 1's
    adapters and run 2's seg adapters keep their values, moments and step counts bit for bit; the rest step."""
    group = models()
    optimizer = GroupOptimizer(group, [RATE] * RUNS)
    body_step(group, optimizer, [batch(1, (True,)), batch(2, (True,)), batch(3, (True,))])
    kept = {id(p) for p in group[1].adapter_parameters()} | {id(p) for p in group[2].seg_adapters.parameters()}
    before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in optimizer.adam.state[p].items()})
              for model in group for p in model.adapter_parameters()}
    body_step(group, optimizer, [batch(4, (True,)), None, batch(6, (False,))])
    for model in group:
        for p in model.adapter_parameters():
            value, state = before[id(p)]
            after = optimizer.adam.state[p]
            if id(p) in kept:
                assert torch.equal(p, value) and all(torch.equal(after[k], v) for k, v in state.items())
            elif state:  # (the last stage's fc2 weights reach no loss: no gradient, no state, never stepped)
                assert int(after["step"]) == int(state["step"]) + 1
    for p in (group[0].seg_adapters[0].fc1[0].weight, group[2].det_adapters[0].fc1[0].weight):
        assert not torch.equal(p, before[id(p)][0])


def test_the_rehearsal_is_undone_bit_for_bit_in_place():
    """Eager steps rehearsed then undone: adapters and Adam state as before, in the same tensors; a
    parameter without Adam state before gets a zero state whose first step equals a fresh state's."""
    group, twin = models(), models()
    optimizer, twin_opt = GroupOptimizer(group, [RATE] * RUNS), GroupOptimizer(twin, [RATE] * RUNS)
    first = [batch(1, (True,)), batch(2, (False,)), None]  # run 1's seg and run 2 get no state
    body_step(group, optimizer, first)
    body_step(twin, twin_opt, first)
    stateless = [p for p in group[1].seg_adapters.parameters()] + group[2].adapter_parameters()
    assert not any(optimizer.adam.state.get(p) for p in stateless)
    addresses = {id(p): (p.data_ptr(), {k: v.data_ptr() for k, v in optimizer.adam.state[p].items()})
                 for p in group[0].adapter_parameters()}
    everything = [batch(3, (True,)), batch(4, (True,)), batch(5, (True,))]
    rehearse(optimizer, lambda: body_step(group, optimizer, everything), WARMUP_STEPS)
    for model, other in zip(group, twin):
        for p, q in zip(model.adapter_parameters(), other.adapter_parameters()):
            assert torch.equal(p, q) and p.grad is None
    for p, q in zip(group[0].adapter_parameters(), twin[0].adapter_parameters()):
        assert p.data_ptr() == addresses[id(p)][0]
        for name, value in optimizer.adam.state[p].items():
            assert value.data_ptr() == addresses[id(p)][1][name] and torch.equal(value, twin_opt.adam.state[q][name])
    assert sum(bool(optimizer.adam.state.get(p)) for p in stateless) > len(stateless) // 2  # made by the rehearsal
    for p in stateless:
        assert all(not bool(v.any()) for v in optimizer.adam.state.get(p, {}).values())
    for steps in (everything, [batch(6, (False,)), batch(7, (True,)), batch(8, (True,))]):
        assert_same_parts(body_step(group, optimizer, steps), body_step(twin, twin_opt, steps))
        assert_same_training(group, optimizer, twin, twin_opt)


def test_captured_step_refuses_a_cpu_device():
    group = models(runs=2)
    with pytest.raises(MVFAError, match="CUDA graphs need a CUDA device"):
        CapturedStep(group, GroupOptimizer(group, [RATE] * 2))


# ------------------------------------------------------------------------------------------------
# CUDA


def cuda_pair(runs: int = RUNS):
    """Two identical groups on the GPU, each with a capturable GroupOptimizer: one steps eagerly, one from graphs."""
    device = torch.device("cuda")
    eager, graphed = models(device, runs), models(device, runs)
    rates = [RATE * (1 + run) for run in range(runs)]
    eager_opt, graphed_opt = GroupOptimizer(eager, rates, capturable=True), GroupOptimizer(graphed, rates, capturable=True)
    return eager, eager_opt, graphed, graphed_opt, CapturedStep(graphed, graphed_opt)


def compare_steps(steps, eager, eager_opt, graphed, graphed_opt, captured, tol=GPU_TOL, amp=None):
    for batches in steps:
        with amp or torch.autocast("cuda", enabled=False):
            expected = group_train_step(eager, eager_opt, batches)
        with amp or torch.autocast("cuda", enabled=False):
            got = captured(graphed, graphed_opt, batches)
        assert_same_parts(got, expected, **tol)
        assert_same_training(graphed, graphed_opt, eager, eager_opt, **tol)
    assert all(p.grad is None for model in graphed for p in model.adapter_parameters())


@needs_cuda
def test_captured_steps_equal_eager_steps_across_keys():
    """A key replayed, a run given None (untouched: a second graph), another masks pattern (a third), and
    the first key again after the others were recorded into the shared pool."""
    eager, eager_opt, graphed, graphed_opt, captured = cuda_pair()
    cuda = torch.device("cuda")
    first = lambda seed: [batch(seed, (True,), cuda), batch(seed + 1, (False,), cuda), batch(seed + 2, (True,), cuda)]
    idle = lambda seed: [batch(seed, (True,), cuda), None, batch(seed + 2, (False,), cuda)]
    other = lambda seed: [batch(seed, (False,), cuda), batch(seed + 1, (True,), cuda), batch(seed + 2, (True,), cuda)]
    compare_steps([first(10), first(20)], eager, eager_opt, graphed, graphed_opt, captured)
    assert len(captured.graphs) == 1
    untouched = [p.detach().clone() for p in graphed[1].adapter_parameters()]
    moments = [{k: v.clone() for k, v in graphed_opt.adam.state[p].items()} for p in graphed[1].adapter_parameters()]
    compare_steps([idle(30), idle(40)], eager, eager_opt, graphed, graphed_opt, captured)
    assert all(torch.equal(a, b) for a, b in zip(untouched, graphed[1].adapter_parameters()))
    for p, state in zip(graphed[1].adapter_parameters(), moments):
        assert all(torch.equal(graphed_opt.adam.state[p][k], v) for k, v in state.items())
    compare_steps([other(50), other(60), first(70), idle(80)], eager, eager_opt, graphed, graphed_opt, captured)
    assert len(captured.graphs) == 3 and captured.eager_steps == 0


@needs_cuda
def test_a_solo_run_from_cached_prefixes_equals_its_eager_steps():
    eager, eager_opt, graphed, graphed_opt, captured = cuda_pair(runs=1)
    cuda = torch.device("cuda")
    steps = [[batch(seed, (seed % 3 != 0,), cuda, prefix_of=eager[0])] for seed in range(1, 7)]
    compare_steps(steps, eager, eager_opt, graphed, graphed_opt, captured)
    assert len(captured.graphs) == 2  # with and without a mask


@needs_cuda
def test_captured_steps_under_autocast_equal_eager_ones():
    """fp16 autocast: the recording must not read casts of the adapters cached by the rehearsal."""
    eager, eager_opt, graphed, graphed_opt, captured = cuda_pair()
    cuda = torch.device("cuda")
    steps = [[batch(seed + run, (run != 1,), cuda) for run in range(RUNS)] for seed in (10, 20, 30, 40)]
    compare_steps(steps, eager, eager_opt, graphed, graphed_opt, captured, AUTOCAST_TOL,
                  amp=torch.autocast("cuda", dtype=torch.float16))


@needs_cuda
def test_keys_beyond_the_cap_step_eagerly():
    eager, eager_opt, graphed, graphed_opt, _ = cuda_pair()
    captured = CapturedStep(graphed, graphed_opt, max_graphs=1)
    cuda = torch.device("cuda")
    steps = [[batch(seed + run, ((seed + run) % 2 == 0,), cuda) for run in range(RUNS)] for seed in (10, 11, 20, 21)]
    compare_steps(steps, eager, eager_opt, graphed, graphed_opt, captured)
    assert len(captured.graphs) == 1 and captured.eager_steps == 2


@needs_cuda
def test_captured_step_refuses_an_optimizer_without_capturable_state_and_other_models():
    group = models(torch.device("cuda"))
    with pytest.raises(MVFAError, match="capturable=True"):
        CapturedStep(group, GroupOptimizer(group, [RATE] * RUNS))
    optimizer = GroupOptimizer(group, [RATE] * RUNS, capturable=True)
    captured = CapturedStep(group, optimizer)
    with pytest.raises(ValueError, match="built for"):
        captured(models(torch.device("cuda")), optimizer, [batch(1, (True,), torch.device("cuda"))] * RUNS)
