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
from mvfa.augment import AUGMENTATIONS, augment
from mvfa.config import RunConfig
from mvfa.evaluation import evaluate
from mvfa.memory_bank import bank_branch, build_memory_bank
from mvfa.prefix import PrefixBudget, cache_set_prefixes, prefix_bytes
from mvfa.compute import autocast_for
from mvfa.scorer import FewShotScorer, ZeroShotScorer
from mvfa.support import FewShotData, cache_support_prefixes
from mvfa.files import save_torch_atomic, write_text_atomic
from mvfa.model import ADAPTER_MIX, STREAM_KEEP, AdaptedViT
from mvfa.parsers import bench_parser
from mvfa.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, state_sentences
from mvfa.replay import ReleaseRandom
from mvfa.scoring import max_cosine_to_bank, normalize_bank
from mvfa.text import TextFeatureBank, encode_prompt_ensemble
from mvfa.training import (
    ZERO_SHOT_EVALS_PER_EPOCH,
    Selector,
    after_epoch,
    compute_loss,
    few_shot_batches,
    make_optimizers,
    train_loop,
    train_step,
)

__all__ = [
    "ABNORMAL_STATES", "ADAPTER_MIX", "AUGMENTATIONS", "AdaptedViT", "CLIP", "FewShotData", "ImageSet",
    "NORMAL_STATES", "PrefixBudget", "ReleaseRandom", "RunConfig", "STREAM_KEEP", "Selector", "TEMPLATES",
    "TensorSet", "TextFeatureBank", "ZERO_SHOT_EVALS_PER_EPOCH", "after_epoch", "augment", "autocast_for",
    "bank_branch", "bench_parser", "build_memory_bank", "cache_set_prefixes", "cache_support_prefixes", "compute_loss", "create_model",
    "encode_prompt_ensemble", "evaluate", "prefix_bytes", "FewShotScorer", "ZeroShotScorer", "few_shot_batches", "generate_benchmark",
    "load_config", "make_optimizers", "max_cosine_to_bank", "normalize_bank", "open_dataset",
    "resample_positional_embedding", "save_torch_atomic", "select_support", "state_sentences", "tokenize", "train_loop", "train_step",
    "write_text_atomic",
]
