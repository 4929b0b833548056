"""Section startup: text features of the prompts over all 77 positions (the release) against the
trimmed context mvfa.method.text uses, and a hit of the on-disk text-feature cache."""
from __future__ import annotations

from .common import Context, best_of, timed_value
from .library import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, TextFeatureBank, encode_prompt_ensemble, state_sentences, tokenize
from .release import prompt_ensemble_full_context
from .report import Row


def section_startup(ctx: Context) -> list[Row]:
    cfg, device = ctx.cfg, ctx.device
    clip_model = ctx.clip_model
    word = "Brain"
    prompts = len(NORMAL_STATES + ABNORMAL_STATES) * len(TEMPLATES)
    if device.type == "cuda":  # warm-up: CUDA kernels for both shapes
        prompt_ensemble_full_context(clip_model, word)
        encode_prompt_ensemble(clip_model, word)
    full, full_features = timed_value(lambda: prompt_ensemble_full_context(clip_model, word), device, cfg.startup_repeats)
    trimmed, trimmed_features = timed_value(lambda: encode_prompt_ensemble(clip_model, word), device,
                                            cfg.startup_repeats)
    difference = float((full_features - trimmed_features).abs().max())
    longest = max(int(tokenize(state_sentences(word, s)).argmax(dim=-1).max()) + 1 for s in (NORMAL_STATES, ABNORMAL_STATES))
    cache_dir = ctx.tmp / "text-cache"
    TextFeatureBank(clip_model, cache_dir)(word)  # fills the cache
    hit = best_of(lambda: TextFeatureBank(clip_model, cache_dir)(word), device, max(3, cfg.startup_repeats), warmup=0)
    return [
        Row("text features s, full 77-position context (release)", full, "s",
            note=f"{prompts} prompts, tokenizing included, {device.type}"),
        Row("text features s, trimmed context (mvfa.method.text)", trimmed, "s", note=f"{longest} of 77 positions"),
        Row("text speed-up, trimmed vs full context", full / trimmed, "x"),
        Row("max |trimmed - full| of the text features", difference, "", note="the same features, fp32"),
        Row("text features s, on-disk cache hit", hit, "s",
            note="a new TextFeatureBank: fingerprint of the text tower's weights + torch.load"),
        Row("text speed-up, cache hit vs trimmed context", trimmed / hit, "x"),
    ]
