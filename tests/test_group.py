"""Runs trained together (mvfa.method.group, training.group_train_step): one batched forward and step for
several runs' adapters on one frozen backbone equals each run's own forward and step to float rounding,
and a run without a batch is not touched."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from CLIP import create_model
from mvfa.method.group import group_forward_from_prefix, group_tokens
from mvfa.method.model import AdaptedViT
from mvfa.runs.training import (
    Selector,
    Track,
    after_epoch,
    GroupOptimizer,
    group_train_step,
    make_optimizers,
    train_group_loop,
    train_loop,
    train_step,
)
from tests.scripts_helpers import TINY_MODEL, TINY_SIZE, TINY_STAGES

RUNS = 3
TOL = dict(rtol=1e-5, atol=1e-6)  # batched products may sum in another order than single ones
SETTINGS = dict(learning_rate=1e-3, batch_size=1, precision="fp32", det_loss="release", ddp=False, seed=0,
                img_size=TINY_SIZE, num_workers=0)


def models() -> list[AdaptedViT]:
    """A backbone and three runs on it, each with its own (different) adapters."""
    torch.manual_seed(0)
    lead = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES])
    runs = [lead.sibling() for _ in range(RUNS)]
    generator = torch.Generator().manual_seed(1)
    for model in runs:
        for parameter in model.adapter_parameters():
            parameter.data.normal_(0, 0.05, generator=generator)
    return runs


def batch(seed: int, with_mask: bool) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 3, TINY_SIZE, TINY_SIZE, generator=generator)
    masks = (torch.rand(1, 1, TINY_SIZE, TINY_SIZE, generator=generator) > 0.8).float()
    text = torch.nn.functional.normalize(torch.randn(64, 2, generator=generator), dim=0)
    return images, masks, torch.tensor([float(seed % 2)]), text, torch.tensor([with_mask]), None


def test_siblings_share_the_backbone_not_the_adapters():
    runs = models()
    assert all(model.visual is runs[0].visual for model in runs)
    assert runs[0].seg_adapters is not runs[1].seg_adapters
    assert not torch.equal(runs[0].seg_adapters[0].fc1[0].weight, runs[1].seg_adapters[0].fc1[0].weight)
    ids = [{id(p) for p in model.adapter_parameters()} for model in runs]
    assert not ids[0] & ids[1]


def test_grouped_forward_equals_each_runs_own():
    runs = models()
    images = torch.rand(RUNS * 2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prefix = runs[0].encode_prefix(images)
        grouped = group_forward_from_prefix(runs, prefix)
        for run, model in enumerate(runs):
            own = model.forward_from_prefix(prefix[2 * run : 2 * run + 2])
            for got, expected in zip(grouped[run].seg + grouped[run].det, own.seg + own.det):
                torch.testing.assert_close(got, expected, **TOL)


def test_grouped_steps_equal_each_runs_own_steps_and_an_idle_run_is_untouched():
    together, alone = models(), models()
    together_opt = GroupOptimizer(together, [1e-3] * RUNS)
    alone_opt = [make_optimizers(model, 1e-3) for model in alone]
    steps = [  # run 1 has no image at step 1 (it must not move); masks for some runs only
        [batch(10, True), batch(11, False), batch(12, True)],
        [batch(20, False), None, batch(22, True)],
        [batch(30, True), batch(31, True), batch(32, False)],
    ]
    for step in steps:
        idle_before = [p.detach().clone() for p in together[1].adapter_parameters()]
        grouped = group_train_step(together, together_opt, step)
        for run, given in enumerate(step):
            if given is None:
                assert grouped[run] is None
                continue
            own = train_step(alone[run], alone_opt[run], *given[:5])
            torch.testing.assert_close(grouped[run].total, own.total.detach(), **TOL)
            torch.testing.assert_close(grouped[run].det, own.det.detach(), **TOL)
            assert (grouped[run].seg is None) == (own.seg is None)
            if own.seg is not None:
                torch.testing.assert_close(grouped[run].seg, own.seg.detach(), **TOL)
        if step[1] is None:  # no forward, no Adam step: bit for bit as before
            assert all(torch.equal(a, b) for a, b in zip(idle_before, together[1].adapter_parameters()))
    assert all(p.grad is None for model in together for p in model.adapter_parameters())
    for run in range(RUNS):
        for got, expected in zip(together[run].adapter_parameters(), alone[run].adapter_parameters()):
            torch.testing.assert_close(got, expected, **TOL)
        for kind in ("seg", "det"):
            got = together_opt.state(run, kind)
            expected = getattr(alone_opt[run], kind).state_dict()["state"]
            assert [bool(state) for state in got] == [key in expected for key in range(len(got))]
            for key, state in expected.items():
                assert int(got[key]["step"]) == int(state["step"])  # an idle run's count did not move
                torch.testing.assert_close(got[key]["exp_avg"], state["exp_avg"], **TOL)
                torch.testing.assert_close(got[key]["exp_avg_sq"], state["exp_avg_sq"], **TOL)


def test_group_tokens_keep_every_runs_rows_in_order():
    """group_tokens gives all runs' tokens in the prefix's row order; group_forward_from_prefix its per-run views."""
    runs = models()
    prefix = runs[0].encode_prefix(torch.rand(RUNS * 2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        joint = group_tokens(runs, prefix)
        split = group_forward_from_prefix(runs, prefix)
    for run in range(RUNS):
        for whole, part in zip(joint.seg + joint.det, split[run].seg + split[run].det):
            assert torch.equal(whole[2 * run : 2 * run + 2], part)


def test_a_group_of_other_backbones_is_refused():
    runs = models()
    torch.manual_seed(5)
    stranger = AdaptedViT(create_model(TINY_MODEL, TINY_SIZE), [int(s) for s in TINY_STAGES])
    with pytest.raises(ValueError, match="share one backbone"):
        group_forward_from_prefix([runs[0], stranger], torch.zeros(2, (TINY_SIZE // 14) ** 2 + 1, runs[0].width))


def run_batches(seed: int, steps: int):
    """A run's batches: the same `steps` single images every epoch, some with masks."""
    fixed = [batch(seed * 100 + i, i % 2 == 0) for i in range(steps)]
    return lambda epoch: list(fixed)


class Scores:
    """Scripted selection scores; keeps nothing (the adapters are compared through the results)."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def __call__(self):
        value = self.values.pop(0)
        return value, {"test_score": value}


def test_the_group_loop_equals_each_runs_own_loop():
    """Three runs in lockstep (the second with fewer epochs: it stops stepping, the others go on; the
    third with more steps per epoch): each run's rows, selection and adapters equal its own loop's."""
    epochs, steps = [2, 1, 2], [3, 3, 4]
    scores = [[0.2, 0.9], [0.5], [0.1, 0.3]]

    def tracks(run: int) -> list[Track]:
        return [Track(Selector(after_epoch, Scores(scores[run])), "test")]

    together = models()
    group_tracks = [tracks(run) for run in range(RUNS)]
    grouped = train_group_loop([SimpleNamespace(**SETTINGS, epoch=e) for e in epochs], together,
                               [run_batches(run, steps[run]) for run in range(RUNS)], group_tracks, torch.device("cpu"))
    alone = models()
    for run in range(RUNS):
        own_tracks = tracks(run)
        (own,) = train_loop(SimpleNamespace(**SETTINGS, epoch=epochs[run]), alone[run], run_batches(run, steps[run]),
                            own_tracks, torch.device("cpu"))
        (got,) = grouped[run]
        assert (got["epoch"], got["step"], got["score"]) == (own["epoch"], own["step"], own["score"])
        assert got["epoch_losses"] == pytest.approx(own["epoch_losses"], rel=1e-5)
        rows, own_rows = group_tracks[run][0].log_rows, own_tracks[0].log_rows
        assert [(r["epoch"], r["step"], r["test_score"]) for r in rows] == [(r["epoch"], r["step"], r["test_score"]) for r in own_rows]
        for group in ("seg_adapters", "det_adapters"):
            for key, tensor in own["adapters"][group].items():
                torch.testing.assert_close(got["adapters"][group][key], tensor, **TOL)
        for got_parameter, own_parameter in zip(together[run].adapter_parameters(), alone[run].adapter_parameters()):
            torch.testing.assert_close(got_parameter, own_parameter, **TOL)  # the finished run stopped moving


def test_the_group_loop_steps_through_the_captured_step_it_is_given():
    """captured_step (training with --cuda_graph: graph_step.CapturedStep) is made once, from the models and
    a capturable optimiser, and makes every step. CUDA graphs need a GPU, so here the step it makes is the
    eager group step on a non-capturable twin: the loop's results equal the plain group loop's bit for bit."""
    made, stepped = [], []

    def maker(group_models, optimizer):
        made.append((group_models, optimizer.adam.defaults["capturable"]))
        twin = GroupOptimizer(group_models, [SETTINGS["learning_rate"]] * len(group_models))

        def step(step_models, _optimizer, batches, det_loss_form):
            stepped.append(sum(batch is not None for batch in batches))
            return group_train_step(step_models, twin, batches, det_loss_form)

        return step

    def loop(captured_step):
        runs = models()[:2]
        tracks = [[Track(Selector(after_epoch, Scores([0.1, 0.2])), "test")] for _ in runs]
        results = train_group_loop([SimpleNamespace(**SETTINGS, epoch=2)] * 2, runs, [run_batches(run, 3) for run in range(2)],
                                   tracks, torch.device("cpu"), captured_step=captured_step)
        return runs, results

    captured, captured_results = loop(maker)
    plain, plain_results = loop(None)
    assert len(made) == 1 and made[0][0] == captured and made[0][1] is True
    assert stepped == [2] * 6  # 2 epochs x 3 steps, both runs each time
    for got, own in zip(captured_results, plain_results):
        assert got[0]["epoch_losses"] == own[0]["epoch_losses"]
    for got_model, own_model in zip(captured, plain):
        assert all(torch.equal(a, b) for a, b in zip(got_model.adapter_parameters(), own_model.adapter_parameters()))


@pytest.mark.parametrize("has_masks", [True, False])
def test_grouped_evaluation_equals_each_runs_own(has_masks):
    """evaluate_group: every run's image scores, maps and AUROCs in one pass equal its own evaluate."""
    from dataset.tensors import TensorSet
    from mvfa.method.evaluation import evaluate, evaluate_group
    from mvfa.method.memory_bank import build_memory_bank
    from mvfa.method.scorer import FewShotScorer

    runs = models()
    generator = torch.Generator().manual_seed(7)
    images = (torch.rand(7, 3, TINY_SIZE, TINY_SIZE, generator=generator) * 255).round().to(torch.uint8)
    masks = torch.zeros(7, TINY_SIZE, TINY_SIZE, dtype=torch.bool)
    masks[4:, 10:30, 10:30] = True
    data = TensorSet(images, masks, torch.tensor([0, 0, 0, 0, 1, 1, 1]), [f"{i}.png" for i in range(7)])
    text = torch.nn.functional.normalize(torch.randn(64, 2, generator=generator), dim=0)
    support = torch.rand(2, 3, TINY_SIZE, TINY_SIZE, generator=generator)
    scorers = [FewShotScorer(text, has_masks, support_images=support, batch_size=4) for _ in runs]
    grouped = evaluate_group(runs, scorers, data, batch_size=3)
    for model, scorer, got in zip(runs, scorers, grouped):
        own = evaluate(model, scorer, data, batch_size=3)
        torch.testing.assert_close(torch.as_tensor(got.image_scores), torch.as_tensor(own.image_scores), **TOL)
        assert got.metrics.keys() == own.metrics.keys()
        for key, value in own.metrics.items():
            assert got.metrics[key] == pytest.approx(value, abs=1e-6), key
        if has_masks:
            torch.testing.assert_close(got.maps, own.maps, **TOL)
