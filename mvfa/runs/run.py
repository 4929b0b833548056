"""The runs: few-shot runs and zero-shot runs, each read top to bottom.

A run trains (with model selection, calibration and a saved checkpoint) or loads a checkpoint, then
scores the target's test split and writes its files (mvfa.runs.outputs). The four scripts, mvfa.demo and
mvfa.reproduce call `run(config)`.
"""
from __future__ import annotations

from collections.abc import Callable
import contextlib
from dataclasses import dataclass, field, replace
import json
from pathlib import Path
import time

import numpy as np
import torch

from CLIP.config import load_config
from dataset.medical import MedicalDataset, Sample, open_dataset, source_datasets_for_zero_shot
from dataset.tensors import TensorSet

from mvfa.calibration.normalization import Normalization
from mvfa.method.backbone import build_adapted_model
from mvfa.method.evaluation import EvalResult, check_two_classes, evaluate, evaluate_group
from mvfa.method.model import AdaptedViT
from mvfa.method.prefix import PrefixBudget, cache_set_prefixes, prefix_bytes
from mvfa.method.prompts import object_word
from mvfa.method.scorer import FewShotScorer, Scorer, ZeroShotScorer
from mvfa.runs.calibrate import calibrate, fit_reference, stored_normalization, stored_threshold
from mvfa.runs.checkpoints import (
    check_replaced_checkpoint, checkpoint_metadata, keep_last_good, read_test_checkpoint, save_adapters, support_names,
    warn_other_support,
)
from mvfa.runs.config import RunConfig
from mvfa.runs.graph_step import CapturedStep
from mvfa.runs.outputs import (
    check_outputs, map_overlays, print_release_lines, rows_of_maps, run_payload, threshold_report, write_run_files,
)
from mvfa.runs.replay import ReleaseRandom, listing_of
from mvfa.runs.run_log import RunLogger, make_logger
from mvfa.runs.support import cache_support_prefixes, prepare_few_shot
from mvfa.runs.training import (
    Selector, Track, TrainingDiverged, after_epoch, few_shot_batches, final_zero_shot_points, release_zero_shot_points,
    train_group_loop, train_loop, zero_shot_batches,
)
from mvfa.runtime.compute import autocast_for, compile_model, seed_everything
from mvfa.runtime.distributed import SINGLE, Dist, barrier, quiet_unless_main
from mvfa.runtime.errors import MVFAError
from mvfa.runtime.files import folder_lock

TEST_LABEL_WARNING = (
    "note: --select test picks the checkpoint with the best test-set AUROC, as the release did to "
    "produce the paper's tables; it uses test labels (use --select valid for a sound estimate)"
)


@dataclass
class RunResult:
    metrics: dict
    checkpoint: Path | None
    output_dir: Path
    evaluation: EvalResult


def run(config: RunConfig, dist: Dist = SINGLE) -> RunResult:
    """Train (with selection) or test, per config.mode and config.train; write the run's files.

    dist: this process's place among the ranks of a torchrun job (the default: a single process).
    Every rank must call run with the same config; all return the same metrics, rank 0 alone
    prints and writes files, and they return together (after rank 0 has written).

    Before any work: the settings (RunConfig.validate) and the output places (check_outputs); then
    rank 0 holds --output_dir (a lock file: a second run into it is refused while this one works).
    """
    return run_together([config], dist)[0]


# What may differ between runs that share one training trajectory: how they select and normalise,
# what they log, and where they write. Everything else decides the trajectory and must be equal.
PER_RUN_SETTINGS = ("select", "normalize", "eval_schedule", "threshold_rule", "target_fpr", "output_dir", "save_path",
                    "save_model", "save_maps", "logger", "overwrite")


def _differing(first: RunConfig, other: RunConfig, allowed: tuple[str, ...]) -> list[str]:
    """The settings outside `allowed` in which two runs' configs differ."""
    return [key for key, value in vars(first).items() if key not in allowed and vars(other)[key] != value]


def check_shared(configs: list[RunConfig]) -> None:
    """Runs trained together follow one trajectory: training runs of one mode whose other settings are equal."""
    if len(configs) > 1 and not all(c.train for c in configs):
        raise MVFAError("runs share a training trajectory only when they train (test runs are separate runs)")
    for other in configs[1:]:
        if differ := _differing(configs[0], other, PER_RUN_SETTINGS):
            raise MVFAError(f"runs trained together must differ only in {', '.join(PER_RUN_SETTINGS)}; "
                            f"these differ too: {', '.join(differ)}")
    folders = [c.output_dir.resolve() for c in configs]
    saved = [(c.save_path / c.checkpoint_name()).resolve() for c in configs if c.save_model]
    if len(set(folders)) < len(folders) or len(set(saved)) < len(saved):
        raise MVFAError("runs trained together need their own --output_dir and checkpoint (--save_path)")


def run_together(configs: list[RunConfig], dist: Dist = SINGLE) -> list[RunResult]:
    """Runs that differ only in how they select and normalise (PER_RUN_SETTINGS; e.g. the release's
    protocol and the leak-free one) trained once: one trajectory, every run's selection tracked
    along it, then per run its adapters calibrated, saved, tested and written. Evaluations change
    neither the adapters nor any random draw, so each run's files equal those of the run made alone.
    One config: `run`."""
    return run_grouped([configs], dist)[0]


# What may differ between the trajectories of runs trained in lockstep: the target dataset (and its
# prompt) and the few-shot split (its line of the seed files, or its draw).
GROUP_SETTINGS = ("obj", "prompt_name", "iterate", "fewshot_seed_dirs")


def run_grouped(config_sets: list[list[RunConfig]], dist: Dist = SINGLE) -> list[list[RunResult]]:
    """Training runs of one mode trained in lockstep as one batched computation (mvfa.method.group): the
    few-shot splits of one or several datasets, or the zero-shot targets. Each set of `config_sets`
    shares one trajectory (run_together: e.g. the two protocols); the sets differ only in the target
    and the split (GROUP_SETTINGS); each keeps its own support or sources, seeded orders, optimiser,
    evaluations, selection and files. Each run's results equal those of its set trained alone to
    float rounding (batched products sum in another order). Several sets: one process. Test runs (one
    config per set; several: the test scripts' several --obj and --iterate) are made in turn on one
    model (run_tests), each equal to its run made alone.

    Before any work: every config's settings (RunConfig.validate), the sets' agreement, the output
    places (check_outputs); then rank 0 holds each --output_dir (a lock file) until the runs end."""
    with quiet_unless_main(dist):
        for configs in config_sets:
            for config in configs:
                config.validate()
            check_shared(configs)
        if len(config_sets) > 1:
            check_group(config_sets, dist)
        every = [config for configs in config_sets for config in configs]
        if dist.active and every[0].cuda_graph:
            raise MVFAError("--cuda_graph trains in one process: under torchrun the ranks would not share their "
                            "adapters; remove --cuda_graph")
        if dist.is_main:
            for config in every:
                check_outputs(config)
        with contextlib.ExitStack() as locks:
            for config in every:
                locks.enter_context(folder_lock(config.output_dir, f"--output_dir {config.output_dir}", MVFAError,
                                                active=dist.is_main))
            if not every[0].train:
                results = run_tests(config_sets, dist)
            elif every[0].mode == "few-shot":
                results = few_shot_group(config_sets, dist)
            else:
                results = zero_shot_group(config_sets, dist)
            barrier(dist)
    return results


def check_group(config_sets: list[list[RunConfig]], dist: Dist) -> None:
    """Sets made together: training runs of one mode (trained in lockstep) or test runs (made in turn on
    one model) that differ in the target and the split only (test runs: and their --checkpoint)."""
    first = config_sets[0][0]
    kind = "runs trained in lockstep" if first.train else "test runs made together"
    if dist.active and first.train:
        raise MVFAError("runs trained in lockstep run in one process: under torchrun each rank trains its own runs")
    allowed = (*PER_RUN_SETTINGS, *GROUP_SETTINGS, *(() if first.train else ("checkpoint",)))
    for configs in config_sets[1:]:
        if differ := _differing(first, configs[0], allowed):
            raise MVFAError(f"{kind} must differ only in {', '.join(allowed)}; these differ too: {', '.join(differ)}")
    folders = [c.output_dir.resolve() for configs in config_sets for c in configs]
    if len(set(folders)) < len(folders):
        raise MVFAError(f"{kind} need their own --output_dir")


@dataclass
class RunState:
    """What a run has opened: the target, its test images, the checkpoint read or planned, the clock."""

    config: RunConfig
    dist: Dist
    device: torch.device
    started: float
    target: MedicalDataset
    word: str
    test_set: TensorSet | None = None
    meta: dict = field(default_factory=dict)  # the checkpoint's metadata (read, or what training will save)
    checkpoint: Path | None = None
    state: dict | None = None  # a test run: the adapters read
    budget: PrefixBudget | None = None


def run_tests(config_sets: list[list[RunConfig]], dist: Dist = SINGLE) -> list[list[RunResult]]:
    """Test runs (one config per set) of one mode that differ in the target and the split only (the test
    scripts' several --obj and --iterate): one model built for all, each checkpoint's adapters loaded in
    turn; each target's test images decoded once and, for a target of several runs, their frozen
    prefix computed once (while the budget allows). Each run's results equal those of its run made
    alone, bit for bit. Every checkpoint is read before the first test."""
    run_sets = [open_runs(configs, dist) for configs in config_sets]
    lead = run_sets[0][0]
    words = list(dict.fromkeys(runs[0].word for runs in run_sets))
    model, _, features = build_run_model(lead.config, lead.device, words)
    load_test_sets(run_sets, model, scored_again=lambda runs: len(runs) > 1)
    results = []
    for (run,) in run_sets:
        if len(run_sets) > 1:
            print_heading(run.config)
        results.append([run_one_test(run, model, features[run.word])])
    return results


def run_one_test(run: RunState, model: AdaptedViT, text_features: torch.Tensor) -> RunResult:
    """A test run on `model`: its checkpoint's adapters loaded, its scorer (few-shot: its support's
    memory bank), its test split scored and its files written."""
    config = run.config
    if config.mode == "zero-shot":
        scorer = ZeroShotScorer(text_features, run.target.has_masks, release_dtypes=release_dtypes(config))
        load_adapters(run, model)
        return test_and_write(run, model, scorer, [], None, [], None)
    few_shot, support = prepare_few_shot(config, run.target)
    print_support(config, support, named=False)
    if config.prefix_cache == "on":
        cache_support_prefixes(model, few_shot, config, run.budget)
    scorer = few_shot_scorer(config, run, text_features, few_shot)
    load_adapters(run, model)
    if not config.only_normal:
        warn_other_support(run.meta, support, run.checkpoint)
    return test_and_write(run, model, scorer, few_shot.support_samples, None, [], support)


def few_shot_group(config_sets: list[list[RunConfig]], dist: Dist = SINGLE) -> list[list[RunResult]]:
    """Few-shot training of one split or several (several: trained in lockstep, run_grouped; of one
    dataset or several); each set of configs shares its split's trajectory (run_together)."""
    run_sets = [open_runs(configs, dist) for configs in config_sets]
    model, models, replays, features = group_models(run_sets, [])
    targets = load_test_sets(run_sets, model)
    supports, scorers, batches = [], [], []
    for runs, split_model, split_replay in zip(run_sets, models, replays):
        split, target, text_features = runs[0].config, runs[0].target, features[runs[0].word]
        few_shot, support = prepare_few_shot(split, target)
        print_support(split, support, named=len(run_sets) > 1)
        cache_support_prefixes(split_model, few_shot, split, runs[0].budget)
        for run in runs:
            run.meta["support"] = support_names(support)
        supports.append((few_shot, support))
        scorers.append(few_shot_scorer(split, runs[0], text_features, few_shot))
        batches.append(few_shot_batches(split, few_shot, text_features, target.has_masks, split_replay))
    shared, after_step = shared_test_evaluations(run_sets, models, scorers, targets)
    selectors = [[few_shot_selection(run, split_model, scorer, few_shot.support_samples, lockstep) for run in runs]
                 for runs, split_model, scorer, (few_shot, _), lockstep in zip(run_sets, models, scorers, supports, shared)]
    trained = train_runs(run_sets, models, batches, selectors, after_step)
    return finish_runs(run_sets, models, scorers, trained,
                       [(few_shot.support_samples, support) for few_shot, support in supports])


def shared_test_evaluations(
    run_sets: list[list[RunState]], models: list[AdaptedViT], scorers: list[Scorer], targets: dict[str, list[int]],
) -> tuple[list["LockstepScores | None"], Callable[[], None] | None]:
    """The test-set selection evaluations (--select test) of a dataset's splits trained in lockstep, made
    together: per set its LockstepScores (None: evaluated alone), and what drops them after every step."""
    shared: list[LockstepScores | None] = [None] * len(run_sets)
    made = []
    for indices in targets.values():
        testing = [i for i in indices if any(run.config.select == "test" for run in run_sets[i])]
        if len(testing) > 1:
            lead = run_sets[testing[0]][0]
            made.append(LockstepScores([models[i] for i in testing], [scorers[i] for i in testing], lead.test_set,
                                       lead.config))
            for i in testing:
                shared[i] = made[-1]
    if not made:
        return shared, None
    return shared, lambda: [lockstep.invalidate() for lockstep in made]


def finish_runs(
    run_sets: list[list[RunState]], models: list[AdaptedViT], scorers: list[Scorer],
    trained: list[list[tuple[dict, list[dict]]]], supports: list[tuple[list[Sample], object]],
) -> list[list[RunResult]]:
    """Per set and run, after training: the selected adapters kept (calibrated, saved), the test split
    scored and the files written. `supports`: per set its support samples and support (zero-shot: [], None).
    Several runs: a line naming each before its own."""
    results = []
    several = sum(len(runs) for runs in run_sets) > 1
    for runs, model, scorer, (samples, support), set_trained in zip(run_sets, models, scorers, supports, trained):
        results.append([])
        for run, (best_state, log_rows) in zip(runs, set_trained):
            if several:
                print_heading(run.config)
            reference = keep_selected(run, model, best_state, scorer, samples)
            results[-1].append(test_and_write(run, model, scorer, samples, best_state, log_rows, support, reference))
    return results


def group_models(
    run_sets: list[list[RunState]], source_words: list[str],
) -> tuple[AdaptedViT, list[AdaptedViT], list[ReleaseRandom], dict[str, torch.Tensor]]:
    """The model of the first set and a sibling for each other set (the release's initial adapters,
    each set's own), each set's replay (a fork: each set draws as if alone), and the text features
    of every set's target word and of `source_words` (zero-shot sources), by word."""
    lead = run_sets[0][0]
    words = list(dict.fromkeys([runs[0].word for runs in run_sets] + source_words))
    model, replay, features = build_run_model(lead.config, lead.device, words)
    models = [model] + [model.sibling() for _ in run_sets[1:]]
    replays = [replay] + [replay.fork() for _ in run_sets[1:]]
    return model, models, replays, features


def load_test_sets(
    run_sets: list[list[RunState]], model: AdaptedViT,
    scored_again: Callable[[list[RunState]], bool] = lambda runs: any(run.config.select == "test" for run in runs),
) -> dict[str, list[int]]:
    """Each target's test images decoded once for the sets of its runs (load_test_set); one prefix-cache
    budget for the group; a target whose test set is `scored_again` (by default: training evaluates it
    after every epoch, --select test) keeps its prefixes. Returns, per target name, the indices of its sets."""
    targets: dict[str, list[int]] = {}
    for index, runs in enumerate(run_sets):
        targets.setdefault(runs[0].target.name, []).append(index)
    budget = None
    for indices in targets.values():
        runs = [run for i in indices for run in run_sets[i]]
        load_test_set(runs, budget)
        budget = runs[0].budget
        if scored_again(runs):
            cache(runs[0], model, runs[0].test_set)
    return targets


def print_heading(config: RunConfig) -> None:
    """The line before a run's own lines among several runs of one command."""
    print(f"== {config.label()}: {config.output_dir}", flush=True)


def print_support(config: RunConfig, support, named: bool) -> None:
    """The support line; `named`: with its split (several splits trained together)."""
    split = f" of --iterate {config.iterate}" if named else ""
    if config.only_normal:
        print(f"support{split}: {config.shot} normal valid images, no abnormal image ({support.source})")
    else:
        print(f"support{split}: {config.shot} abnormal + {config.shot} normal valid images ({support.source})")


def few_shot_scorer(config: RunConfig, run: RunState, text_features: torch.Tensor, few_shot) -> FewShotScorer:
    """The few-shot scorer of a support: its memory bank is rebuilt from the augmented normal images."""
    return FewShotScorer(
        text_features, run.target.has_masks, support_images=few_shot.normal_images, support_cache=few_shot.memory_cache,
        batch_size=config.eval_batch_size, bank_precision=bank_precision(config), release_dtypes=release_dtypes(config),
    )


def zero_shot_group(config_sets: list[list[RunConfig]], dist: Dist = SINGLE) -> list[list[RunResult]]:
    """Zero-shot training of one target or several (several: trained in lockstep, run_grouped), each
    on the other datasets' test images; each set of configs shares its target's trajectory (run_together)."""
    sources = [source_datasets_for_zero_shot(configs[0].data_path, configs[0].obj) for configs in config_sets]
    listings = [read_listings(c[0].listings) if c[0].listings is not None else None for c in config_sets]
    run_sets = [open_runs(configs, dist) for configs in config_sets]
    source_words = {s.name: _source_word(runs[0].config, s) for runs, target_sources in zip(run_sets, sources)
                    for s in target_sources}
    model, models, replays, features = group_models(run_sets, list(source_words.values()))
    load_test_sets(run_sets, model)
    decoded = {runs[0].target.name: runs[0].test_set for runs in run_sets}  # a target's test split: others' source
    scorers, selectors, batches = [], [], []
    for runs, target_model, replay, target_sources, listing in zip(run_sets, models, replays, sources, listings):
        config, target = runs[0].config, runs[0].target
        options = {"release_dtypes": release_dtypes(config)}
        scorers.append(ZeroShotScorer(features[runs[0].word], target.has_masks, **options))
        source_scorers = {s.name: ZeroShotScorer(features[source_words[s.name]], s.has_masks, **options)
                          for s in target_sources}
        selectors.append([zero_shot_selection(run, target_model, scorers[-1], target_sources, source_scorers)
                          for run in runs])
        batches.append(zero_shot_batches(
            config, target_sources, lambda source: features[source_words[source.name]], runs[0].budget.allow, replay,
            listing_of(config.order, listing, config.data_path), dist, decoded,
        ))
    trained = train_runs(run_sets, models, batches, selectors)
    return finish_runs(run_sets, models, scorers, trained, [([], None)] * len(run_sets))


def open_runs(configs: list[RunConfig], dist: Dist) -> list[RunState]:
    """The runs' device, seeds and target; the checkpoint each will replace (training) or reads (test)."""
    device = torch.device(configs[0].device)
    if device.type == "cpu" and configs[0].precision != "fp32":  # autocast_for uses no autocast on the CPU
        print(f"note: --precision {configs[0].precision} has no effect on the CPU: this run computes in fp32")
        configs = [replace(config, precision="fp32") for config in configs]
    seed_everything(configs[0].seed)
    started = time.time()
    target = open_dataset(configs[0].data_path, configs[0].obj)
    try:
        word = object_word(target.name, configs[0].prompt_name)
    except KeyError as err:
        raise MVFAError(str(err.args[0])) from None
    check_two_classes(torch.tensor([s.label for s in target.samples("test")]), f"the test split of {target.name}")
    runs = []
    for config in configs:
        run = RunState(config, dist, device, started, target, word)
        if config.train:
            run.meta = checkpoint_metadata(config, target, word)  # what the saved adapters will record
            check_replaced_checkpoint(config, run.meta, dist)
        else:
            run.checkpoint, run.state, run.meta = read_test_checkpoint(config, word)
        runs.append(run)
    return runs


def load_test_set(runs: list[RunState], budget: PrefixBudget | None = None) -> None:
    """The target's test images, decoded once; one prefix-cache budget for the runs' sets (`budget`:
    one shared with other targets' runs trained together)."""
    lead = runs[0]
    test_set = TensorSet.load(lead.target.samples("test"), lead.config.img_size, lead.config.num_workers,
                              desc=f"{lead.target.name} test")
    budget = budget if budget is not None else PrefixBudget(lead.config.prefix_cache, lead.device)
    for run in runs:
        run.test_set, run.budget = test_set, budget


def release_dtypes(config: RunConfig) -> bool:
    """Score as the release on CUDA with autocast (mvfa.method.scorer.Scorer.scoring_context)."""
    return config.scoring_dtypes == "release"


def bank_precision(config: RunConfig) -> str:
    """The memory bank's forward: without autocast (fp32) with the release's dtypes, as the release
    builds it; else under the run's autocast."""
    return "fp32" if release_dtypes(config) else config.precision


def build_run_model(
    config: RunConfig, device: torch.device, words: list[str],
) -> tuple[AdaptedViT, ReleaseRandom, dict[str, torch.Tensor]]:
    """The run's model with the release's initial adapters (training), the text features of `words`
    (by word: the targets' and the zero-shot sources'), the text tower dropped, the visual tower in
    fp32; and the replay of the release's draws, which the training batches go on drawing from."""
    model, text_bank = build_adapted_model(
        config.model_name, config.img_size, config.features_list, config.clip_ckpt, config.pretrain,
        config.quick_gelu, device, config.cache_dir, visual_fp32_later=True,
    )
    if config.compile:
        compile_model(model)
    replay = ReleaseRandom(config.seed)  # the release's draws: two random CLIP builds, then the adapters
    if config.train:
        replay.skip_clip_builds(load_config(config.model_name), config.img_size)
        replay.init_adapters(model.seg_adapters, model.det_adapters)
    if release_dtypes(config) and device.type == "cuda" and config.precision != "fp32":
        # the release encodes its prompts under autocast
        text_bank.encoding_autocast = (f"autocast-{config.precision}", lambda: autocast_for(device, config.precision))
    features = {word: text_bank(word) for word in words}  # zero-shot training: each source its own prompts
    text_bank.drop_text_tower()  # every word the run needs is encoded: free the text weights (0.5 GB for ViT-L)
    if config.train or config.compile:
        model.visual.float()
    else:  # a test run: the blocks keep the checkpoint's dtype, computed in fp32 (bit for bit the same)
        model.float_with_block_workspace()
    return model, replay, features


def score(run: RunState, model: AdaptedViT, scorer: Scorer, data: TensorSet, **options) -> EvalResult:
    """`evaluate` with the run's batch size, precision and ranks (options: evaluate's keywords)."""
    return evaluate(model, scorer, data, batch_size=run.config.eval_batch_size, precision=run.config.precision,
                    dist=run.dist, **options)


def cache(run: RunState, model: AdaptedViT, data: TensorSet) -> TensorSet:
    """Sets evaluated after every epoch keep their frozen-block outputs (this rank's batches), while the budget allows."""
    size = run.config.eval_batch_size
    shard = run.dist.batch_shard(len(data), size)
    if run.budget.allow(prefix_bytes(model, shard[1] - shard[0])):
        cache_set_prefixes(data, model, size, run.config.precision, shard if run.dist.active else None)
    return data


def train_runs(
    run_sets: list[list[RunState]], models: list[AdaptedViT], batches: list, selectors: list[list[Selector]],
    after_step: Callable[[], None] | None = None,
) -> list[list[tuple[dict, list[dict]]]]:
    """Train each set of runs once (the runs of a set share a trajectory: each run's selection is tracked
    along it), several sets in lockstep as one batched computation (`models`: siblings on one
    backbone). Returns per set and run the selected state and the log rows. A diverged trajectory
    saves the last good selection of each of its runs."""
    lead = run_sets[0][0]
    if any(run.config.select == "test" for runs in run_sets for run in runs):
        print(TEST_LABEL_WARNING)
    named = any(len(runs) > 1 for runs in run_sets)
    tracks = [[Track(selector, run.config.select, [],
                     make_logger(run.config.logger, run.config.output_dir) if lead.dist.is_main else RunLogger(),
                     f"[--select {run.config.select}] " if named else "")
               for run, selector in zip(runs, set_selectors)] for runs, set_selectors in zip(run_sets, selectors)]
    try:
        if len(run_sets) == 1 and not lead.config.cuda_graph:
            states = [train_loop(lead.config, models[0], batches[0], tracks[0], lead.device, lead.dist)]
        else:  # runs in lockstep; or one, its step replayed from CUDA graphs (the group step of one run)
            states = train_group_loop([runs[0].config for runs in run_sets], models, batches, tracks, lead.device,
                                      after_step=after_step,
                                      captured_step=CapturedStep if lead.config.cuda_graph else None)
    except TrainingDiverged as err:
        diverged = err.run
        runs = run_sets[diverged]
        kept = [keep_last_good(run.config, models[diverged], best, err.where, run.meta, run.dist)
                for run, best in zip(runs, err.best)]
        shown = kept if not named else [f"{track.name.strip()} {part}" for track, part in zip(tracks[diverged], kept)]
        where = f" ({runs[0].config.output_dir})" if len(run_sets) > 1 else ""
        raise MVFAError(f"{err}{where}; {'; '.join(shown)}; lower --learning_rate (this run: "
                        f"{runs[0].config.learning_rate:g})") from None
    finally:
        for set_tracks in tracks:
            for track in set_tracks:
                track.logger.close()
    return [[(state, track.log_rows) for state, track in zip(set_states, set_tracks)]
            for set_states, set_tracks in zip(states, tracks)]


def keep_selected(
    run: RunState, model: AdaptedViT, best_state: dict, scorer: Scorer, support: list[Sample],
) -> tuple | None:
    """The run's selected adapters loaded, calibrated (--threshold_rule) and saved (--save_model).
    Returns the calibration's fit_reference of them (None: no calibration, or it found no valid data)."""
    config = run.config
    model.load_adapter_state(best_state["adapters"])
    run.meta.update(best_epoch=best_state["epoch"], best_step=best_state["step"])
    reference = None
    if config.threshold_rule != "none":
        def fit() -> tuple:
            nonlocal reference
            reference = fit_reference(config, model, run.target, scorer, support, run.dist)
            return reference

        run.meta.update(calibrate(config, model, run.target, scorer, support, run.dist, fit))
    run.checkpoint = save_adapters(config, model, run.meta, run.dist)
    return reference


def load_adapters(run: RunState, model: AdaptedViT) -> None:
    model.load_adapter_state(run.state, source=str(run.checkpoint))
    print(f"loaded adapters from {run.checkpoint}")


def test_and_write(
    run: RunState, model: AdaptedViT, scorer: Scorer, support_samples: list[Sample], best_state: dict | None,
    log_rows: list[dict], support, reference: tuple | None = None,
) -> RunResult:
    """Score the test split (with the chosen normalisation and the checkpoint's threshold), print the
    release's lines, write the overlays (--save_maps) and the run's files. `reference`: the
    calibration's fit_reference of these adapters (--normalize valid uses it instead of fitting again)."""
    config, dist = run.config, run.dist
    source = str(run.checkpoint) if run.checkpoint else "the trained adapters"
    normalization = chosen_normalization(
        config, run.meta, source,
        lambda: (reference or fit_reference(config, model, run.target, scorer, support_samples, dist))[1],
    )
    threshold = stored_threshold(run.meta, source, scorer.scoring_mode)
    score_under = threshold[1] if threshold is not None and normalization != threshold[1] else None
    result = score(run, model, scorer, run.test_set, normalization=normalization, full_metrics=True,
                   desc=f"{run.target.name} test", score_under=score_under)
    metrics = {**result.metrics, "seconds": round(time.time() - run.started, 2)}
    print_release_lines(config.obj, metrics)
    payload = run_payload(config, metrics, result, run.checkpoint, run.meta, support, best_state, dist)
    if threshold is not None:
        payload["threshold"] = threshold_report(result, threshold[0], score_under is not None, run.meta)
    if config.save_maps is not None:
        def maps_of(indices: list[int]) -> torch.Tensor | None:
            """The maps of test images `indices`: kept by the evaluation, else scored again (datasets without masks)."""
            if result.maps is not None:
                return rows_of_maps(result.maps, result.map_range, indices, dist)
            chosen = score(run, model, scorer, run.test_set.subset(indices), normalization=result.normalization,
                           desc="maps", keep_maps=True, metrics=False)
            return rows_of_maps(chosen.maps, chosen.map_range, list(range(len(indices))), dist)

        written = map_overlays(config, result, run.test_set, maps_of, config.output_dir / "maps",
                               threshold[0] if threshold is not None else None, scorer.score_is_map_max)
        print(f"wrote {len(written)} overlays to {config.output_dir / 'maps'}")
    if dist.is_main:
        write_run_files(config, result, payload, log_rows, support)
    return RunResult(metrics, run.checkpoint, config.output_dir, result)


def chosen_normalization(config: RunConfig, meta: dict, source: str, fit_valid) -> Normalization | None:
    """The test evaluation's statistics: None for --normalize test (the release's min-max over the test
    set), fitted on valid normal images (`fit_valid()`), or the checkpoint's."""
    if config.normalize == "valid":
        normalization = fit_valid()
        print(f"normalisation: fitted on {normalization.source}")
        return normalization
    if config.normalize != "checkpoint":
        return None
    normalization = stored_normalization(meta, source)
    if normalization is None:
        raise MVFAError(
            f"{source} holds no normalisation statistics (a release checkpoint, or trained with "
            "--threshold_rule none or without valid data): use --normalize valid or test"
        )
    print(f"normalisation: stored in the checkpoint ({normalization.source})")
    return normalization


# ------------------------------------------------------------------------------------------------
# Model selection


def selection_samples(config: RunConfig, dataset: MedicalDataset, exclude: list[Sample]) -> list[Sample]:
    """--select valid for few-shot: the valid images that are not support images."""
    used = {s.path for s in exclude}
    samples = [s for s in dataset.samples("valid") if s.path not in used]
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        raise MVFAError(
            f"--select valid needs normal and abnormal valid images of {dataset.name} besides the "
            f"{config.shot}-shot support; {len(samples)} remain ({'none' if not labels else 'one class'}): "
            "use --select last or a smaller --shot"
        )
    return samples


def few_shot_selection(
    run: RunState, model: AdaptedViT, scorer: Scorer, support: list[Sample], shared: "LockstepScores | None" = None,
) -> Selector:
    """After every epoch: the test set's (--select test) or the valid images' (valid) pAUC + AUC;
    `shared`: splits trained in lockstep evaluate the test set together."""
    config = run.config
    if config.select == "valid":
        data = cache(run, model, TensorSet.load(
            selection_samples(config, run.target, support), config.img_size, config.num_workers, desc="valid"
        ))
    else:
        data = run.test_set if config.select == "test" else None

    def evaluation():
        if config.select == "test" and shared is not None:
            result = shared.result(model)
        else:
            result = score(run, model, scorer, data, desc=f"{config.select} eval")
        return result.selection_score, {f"{config.select}_{k}": v for k, v in result.metrics.items()}

    return Selector(after_epoch, evaluation, keep_ties=False, active=config.select != "last")


class LockstepScores:
    """The test-set evaluations of splits trained in lockstep, made for every split in one pass
    (evaluate_group) when the first asks after a step; the others read theirs. The group loop calls
    `invalidate` after every step."""

    def __init__(self, models: list[AdaptedViT], scorers: list[Scorer], data: TensorSet, config: RunConfig) -> None:
        self.models, self.scorers, self.data, self.config = models, scorers, data, config
        self.results: list[EvalResult] | None = None

    def invalidate(self) -> None:
        self.results = None

    def result(self, model: AdaptedViT) -> EvalResult:
        if self.results is None:
            self.results = evaluate_group(self.models, self.scorers, self.data, batch_size=self.config.eval_batch_size,
                                          precision=self.config.precision, desc="test eval (splits together)")
        return self.results[next(i for i, m in enumerate(self.models) if m is model)]


def zero_shot_selection(
    run: RunState, model: AdaptedViT, scorer: Scorer, sources: list[MedicalDataset], source_scorers: dict[str, Scorer],
) -> Selector:
    """At the release's points of each epoch: the target's test pAUC + AUC (--select test), or the mean
    over the sources' valid splits of theirs (valid); --eval_schedule final scores after N/5 ... N steps."""
    config = run.config
    valid_sets = []
    if config.select == "valid":
        for source in sources:
            samples = source.samples("valid")
            if {s.label for s in samples} == {0, 1}:
                data = cache(run, model, TensorSet.load(samples, config.img_size, config.num_workers,
                                                        desc=f"{source.name} valid"))
                valid_sets.append((source, data))
        if not valid_sets:
            raise MVFAError("--select valid needs a source dataset whose valid split has both classes")

    def evaluation():
        if config.select == "test":
            result = score(run, model, scorer, run.test_set, desc=f"{run.target.name} test eval")
            return result.selection_score, {f"test_{k}": v for k, v in result.metrics.items()}
        values, detail = [], {}
        for source, data in valid_sets:
            result = score(run, model, source_scorers[source.name], data, desc=f"{source.name} valid eval")
            values.append(result.selection_score)
            detail[f"valid_{source.name}"] = result.selection_score
        return float(np.mean(values)), detail

    if config.eval_schedule == "release":  # before steps 0, N//5, 2N//5, ...; the latest tie wins
        return Selector(release_zero_shot_points, evaluation, keep_ties=True, active=config.select != "last")
    return Selector(final_zero_shot_points, evaluation, keep_ties=False, active=config.select != "last")


def read_listings(path: Path) -> dict[str, list[str]]:
    """--listings: a JSON object mapping image folders (relative to --data_path, e.g.
    "Brain_AD/test/good/img") to the file names in the order a recorded run listed them."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MVFAError(f"--listings {path} is not a readable JSON file ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v) for k, v in raw.items()
    ):
        raise MVFAError(f"--listings {path} must map folder names to lists of file names, e.g. "
                        '{"Brain_AD/test/good/img": ["0001.png", ...]}')
    return raw


def _source_word(config: RunConfig, source: MedicalDataset) -> str:
    """The object word of a zero-shot source dataset (only registered names can be sources)."""
    try:
        return object_word(source.name, None)
    except KeyError:
        raise MVFAError(
            f"zero-shot training uses {source.name} from {config.data_path}, which has no registered object "
            "word: remove it from --data_path or add it to mvfa.method.prompts.REAL_NAME"
        ) from None
