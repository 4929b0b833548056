"""Section memory: evaluate's peak memory beyond the fused maps (two test-set sizes, the slope), and
the peak of a memory-bank search against Q x B x 4 bytes. On the CPU measured in a fresh child."""
from __future__ import annotations

import gc
import os

import torch

from .children import run_child, write_json_result
from .common import Context, random_images, random_test_set
from .config import BenchConfig
from .library import FewShotScorer, bank_branch, build_memory_bank, evaluate, max_cosine_to_bank, normalize_bank, prefix_bytes
from .peak_memory import PeakCUDA, PeakRSS, require_proc
from .report import Row


def measure_memory(ctx: Context) -> dict:
    """The memory figures, measured in this process (a fresh child process on the CPU)."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    peak = (lambda: PeakCUDA(device)) if device.type == "cuda" else PeakRSS
    text_features = ctx.text_features()
    bank = build_memory_bank(model, random_images(2, cfg.img_size, 7).float() / 255, cfg.eval_batch_size, cfg.precision,
                             branches=(bank_branch(True),))
    scorer = FewShotScorer(text_features, True, bank)
    evaluate(model, scorer, random_test_set(2, cfg.img_size, 8), batch_size=cfg.eval_batch_size, precision=cfg.precision)
    out = {"eval": {}}
    for count in cfg.memory_images:
        data = random_test_set(count, cfg.img_size, seed=9)
        with peak() as p:
            result = evaluate(model, scorer, data, batch_size=cfg.eval_batch_size, precision=cfg.precision)
        out["eval"][count] = p.growth
        del result, data
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    patches = model.grid_size**2
    queries = cfg.eval_batch_size * patches
    embed = model.embed_dim
    generator = torch.Generator(device=device).manual_seed(10)
    q = torch.randn(queries, embed, generator=generator, device=device)
    b = torch.randn(cfg.bank_tokens, embed, generator=generator, device=device)
    with peak() as p:
        max_cosine_to_bank(q, b)
    unit = normalize_bank(b)
    del b
    with peak() as p_unit:
        max_cosine_to_bank(q, unit, normalized=True)
    out["bank"] = {"queries": queries, "tokens": cfg.bank_tokens, "embed": embed, "peak": p.growth,
                   "peak_normalized": p_unit.growth, "bank_bytes": unit.numel() * 4,
                   "qb_bytes": queries * cfg.bank_tokens * 4}
    out["map_bytes"] = cfg.img_size * cfg.img_size * 4
    out["prefix_bytes"] = prefix_bytes(model, 1)
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    out["source"] = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
        "RSS high-water mark (VmHWM)" + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "")
    return out


def memory_child(cfg: BenchConfig, json_path: str) -> int:
    """The child process of the CPU memory figures: measure_memory in a fresh process, to `json_path`."""
    ctx = Context(cfg)
    try:
        result = measure_memory(ctx)
    finally:
        ctx.close()
    write_json_result(json_path, result)
    return 0


def section_memory(ctx: Context) -> list[Row]:
    cfg = ctx.cfg
    if ctx.device.type == "cuda":
        m = measure_memory(ctx)
    else:
        require_proc()
        # a fresh process (this one's allocator holds memory freed by earlier sections), with a fixed
        # mmap threshold: blocks over 128 KiB go back to the system when freed, so RSS follows live memory
        m = run_child("memory", cfg, MALLOC_MMAP_THRESHOLD_="131072")
        m["eval"] = {int(k): v for k, v in m["eval"].items()}
    (m1, g1), (m2, g2) = sorted(m["eval"].items())
    slope = (g2 - g1) / (m2 - m1)
    rows = [Row(f"evaluate peak growth, {count} images", growth / 1e6, "MB",
                note=f"few-shot with masks, batch {cfg.eval_batch_size}; {m['source']}")
            for count, growth in sorted(m["eval"].items())]
    beyond_note = f"slope between {m1} and {m2} images, minus the map"
    if slope < m["map_bytes"]:
        beyond_note += ("; the peak grew by less than the maps: it is a batch's forward, reached before every "
                        "map is written, and the per-image memory beyond the maps is below this measurement's resolution")
    rows += [
        Row("evaluate peak growth per image", slope, "bytes", note=f"slope between {m1} and {m2} images"),
        Row("fused map bytes per image", m["map_bytes"], "bytes", note=f"{cfg.img_size} x {cfg.img_size} x 4"),
        Row("evaluate bytes per image beyond the maps", slope - m["map_bytes"], "bytes", note=beyond_note),
        Row("evaluate fixed peak beyond per-image memory", (g1 - slope * m1) / 1e6, "MB",
            note="intercept: a batch's activations, the bank, scratch"),
    ]
    rows.append(Row("prefix cache bytes per image (sets evaluated every epoch)", m["prefix_bytes"], "bytes",
                    note="frozen-block outputs kept by --prefix_cache while training"))
    bank = m["bank"]
    rows.append(Row("bank search peak / (Q x B x 4 bytes)", bank["peak"] / bank["qb_bytes"], "x",
                    note=f"Q={bank['queries']} patches, B={bank['tokens']:,} tokens, D={bank['embed']}: "
                         f"peak {bank['peak'] / 1e6:.1f} MB, Q x B x 4 = {bank['qb_bytes'] / 1e6:.1f} MB, "
                         f"the bank itself {bank['bank_bytes'] / 1e6:.1f} MB"))
    rows.append(Row("bank search peak / (Q x B x 4 bytes), bank normalised once", bank["peak_normalized"] / bank["qb_bytes"],
                    "x", note=f"normalize_bank, then normalized=True: peak {bank['peak_normalized'] / 1e6:.1f} MB "
                              "(no per-search copy of the bank)"))
    return rows
