"""Every name the benchmark takes from the toolkit (mvfa, CLIP, dataset), imported here and nowhere
else in mvfa.bench (but `metrics`, which runs alone with its own two light imports): when the
library's modules move, this is the one file to retarget. The library never imports mvfa.bench."""
from __future__ import annotations

from CLIP import create_model, tokenize
from CLIP.config import load_config
from CLIP.model import CLIP, resample_positional_embedding
from dataset.medical import ImageSet, open_dataset, select_support
from dataset.synthetic import generate_benchmark
from dataset.tensors import TensorSet
from mvfa.method.augment import AUGMENTATIONS, augment
from mvfa.method.evaluation import evaluate
from mvfa.method.memory_bank import bank_branch, build_memory_bank
from mvfa.method.model import ADAPTER_MIX, STREAM_KEEP, AdaptedViT
from mvfa.method.prefix import PrefixBudget, cache_set_prefixes, prefix_bytes
from mvfa.method.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, object_word, state_sentences
from mvfa.method.scorer import FewShotScorer, ZeroShotScorer
from mvfa.method.scoring import max_cosine_to_bank, normalize_bank
from mvfa.method.text import TextFeatureBank, encode_prompt_ensemble
from mvfa.parsers import bench_parser
from mvfa.runs.config import RunConfig
from mvfa.runs.graph_step import CapturedStep
from mvfa.runs.replay import ReleaseRandom
from mvfa.runs.support import FewShotData, cache_support_prefixes
from mvfa.runs.training import (
    ZERO_SHOT_EVALS_PER_EPOCH,
    GroupOptimizer,
    Selector,
    Track,
    after_epoch,
    compute_loss,
    few_shot_batches,
    group_train_step,
    make_optimizers,
    train_loop,
    train_step,
)
from mvfa.runtime.compute import autocast_for
from mvfa.runtime.files import save_torch_atomic, write_text_atomic

__all__ = [
    "ABNORMAL_STATES", "ADAPTER_MIX", "AUGMENTATIONS", "AdaptedViT", "CLIP", "CapturedStep", "FewShotData", "GroupOptimizer", "ImageSet",
    "NORMAL_STATES", "PrefixBudget", "ReleaseRandom", "RunConfig", "STREAM_KEEP", "Selector", "TEMPLATES", "Track",
    "TensorSet", "TextFeatureBank", "ZERO_SHOT_EVALS_PER_EPOCH", "after_epoch", "augment", "autocast_for",
    "bank_branch", "bench_parser", "build_memory_bank", "cache_set_prefixes", "cache_support_prefixes", "compute_loss", "create_model",
    "encode_prompt_ensemble", "evaluate", "prefix_bytes", "FewShotScorer", "ZeroShotScorer", "few_shot_batches", "generate_benchmark", "group_train_step",
    "load_config", "make_optimizers", "object_word", "max_cosine_to_bank", "normalize_bank", "open_dataset",
    "resample_positional_embedding", "save_torch_atomic", "select_support", "state_sentences", "tokenize", "train_loop", "train_step",
    "write_text_atomic",
]
