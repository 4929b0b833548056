"""The release emulated: its CLIP loading, its block (explicit softmax attention returning the
weights), its forward, its training step, its 77-position text encoder and its test_few.py. A second
implementation of the model, so it reads the blocks' internals where the release's block did."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .library import (
    ABNORMAL_STATES,
    ADAPTER_MIX,
    CLIP,
    NORMAL_STATES,
    STREAM_KEEP,
    AdaptedViT,
    ImageSet,
    augment,
    compute_loss,
    load_config,
    make_optimizers,
    open_dataset,
    resample_positional_embedding,
    select_support,
    state_sentences,
    tokenize,
)


def release_train_step(model: AdaptedViT, optimizers, images, masks, labels, text_features, has_masks):
    """The release's step: the caller has set requires_grad on every CLIP weight; the whole forward,
    the frozen blocks before the first stage included, runs under autograd, and backward computes the
    backbone's weight gradients, which no optimiser uses (they accumulate, as in the release, whose
    optimisers zero only the adapters' gradients)."""
    optimizers.zero_grad()
    prefix = model.forward_intermediates(images, model.stages[:1])[0]
    parts = compute_loss(model, images, masks, labels, text_features, has_masks, prefix=prefix)
    parts.total.backward()
    optimizers.seg.step()
    optimizers.det.step()
    return parts


def encode_text_full_context(clip_model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """The release's text encoder: all 77 positions through the causal transformer (the model
    itself encodes only up to the longest prompt's end token, which gives the same features)."""
    x = clip_model.token_embedding(tokens) + clip_model.positional_embedding
    x = clip_model.ln_final(clip_model.transformer(x, causal=True))
    return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ clip_model.text_projection


@torch.no_grad()
def prompt_ensemble_full_context(clip_model: CLIP, object_word: str) -> torch.Tensor:
    """mvfa.method.text.encode_prompt_ensemble with the release's full-context encoder."""
    device = next(clip_model.parameters()).device
    columns = []
    for states in (NORMAL_STATES, ABNORMAL_STATES):
        tokens = tokenize(state_sentences(object_word, states)).to(device)
        embeddings = F.normalize(encode_text_full_context(clip_model, tokens).float(), dim=-1)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


def release_block(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block whose attention is an explicit softmax returning the head-averaged attention
    weights, as the release's open_clip blocks (nn.MultiheadAttention with need_weights)."""
    attention = block.attn
    h = block.ln_1(x)
    batch, tokens, width = h.shape
    heads = attention.heads
    qkv = F.linear(h, attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q * (width // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + attention.out_proj(out)
    return x + block.mlp(block.ln_2(x)), weights.mean(dim=1)


def release_forward(model: AdaptedViT, images: torch.Tensor):
    """The release's CLIP_Inplanted forward: every block through release_block, adapters at the stages,
    the pooled class token; returns (pooled, seg tokens, det tokens), class tokens included."""
    visual = model.visual
    x = visual.embed(images)
    seg, det, kept_attention = [], [], []
    for number, block in enumerate(visual.transformer.resblocks, start=1):
        x, weights = release_block(block, x)
        if number == 12:
            kept_attention.append(weights)  # the release keeps one attention map
        if number in model.stages:
            i = model.stages.index(number)
            seg_mid, seg_out = model.seg_adapters[i](x)
            det_mid, det_out = model.det_adapters[i](x)
            x = STREAM_KEEP * x + ADAPTER_MIX * seg_out + ADAPTER_MIX * det_out
            seg.append(seg_mid)
            det.append(det_mid)
        if number == max(model.stages):
            break
    return visual.pool(x), seg, det


def _min_max(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def release_load_clip(model_name: str, size: int, path: str) -> CLIP:
    """The release's loading (kept as it was, whatever CLIP.create_model does now): a randomly
    initialised fp32 CLIP, the whole checkpoint in memory (as `torch.jit.load` holds OpenAI's archive),
    converted to fp32 in one dict and copied in by `load_state_dict`. Random weights, the fp16
    checkpoint and its fp32 copy coexist."""
    clip_model = CLIP(load_config(model_name), image_size=size)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict["visual.positional_embedding"] = resample_positional_embedding(
        state_dict["visual.positional_embedding"].float(), clip_model.visual.grid_size)
    clip_model.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return clip_model


def release_test_few(a: dict) -> None:
    """The work of test_few.py done the release's way (CPU, fp32): random-init CLIP then weights,
    every parameter requires grad, prompts over 77 positions, batch 1 throughout, attention maps
    materialised, per-image maps kept as numpy, sklearn's roc_auc_score over all pixels."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(a["seed"])
    size = a["img_size"]
    clip_model = release_load_clip(a["model_name"], size, a["clip_ckpt"]).eval()
    model = AdaptedViT(clip_model, a["stages"]).eval()
    model.load_adapter_state(torch.load(a["adapters"], map_location="cpu", weights_only=True))
    clip_model.requires_grad_(True)
    model.requires_grad_(True)
    make_optimizers(model, 1e-3)  # built by the release's test script too
    dataset = open_dataset(a["data_path"], "Brain")
    support = select_support(dataset, a["shot"], -1, a["seed"], [])
    abnormal = ImageSet(support.abnormal, size)
    normal = ImageSet(support.normal, size)
    abnormal_images = torch.stack([abnormal[i]["image"] for i in range(len(abnormal))])
    abnormal_masks = torch.stack([abnormal[i]["mask"] for i in range(len(abnormal))])
    augment(abnormal_images, abnormal_masks)  # the release augments the abnormal support too
    normal_images, _ = augment(torch.stack([normal[i]["image"] for i in range(len(normal))]))
    text_features = prompt_ensemble_full_context(clip_model, "Brain")

    seg_bank = [[] for _ in a["stages"]]
    with torch.no_grad():
        for i in range(normal_images.shape[0]):
            _, seg, _ = release_forward(model, normal_images[i : i + 1])
            for stage, tokens in enumerate(seg):
                seg_bank[stage].append(tokens[0])
    seg_bank = [torch.cat(tokens) for tokens in seg_bank]

    test = ImageSet(dataset.samples("test"), size)
    zero_maps, few_maps, masks, labels = [], [], [], []
    for i in range(len(test)):
        item = test[i]
        masks.append(item["mask"][0].numpy() > 0.5)
        labels.append(item["label"])
        with torch.no_grad():
            _, seg, _ = release_forward(model, item["image"][None])
            seg = [tokens[0, 1:] for tokens in seg]
            few = []
            for stage, patches in enumerate(seg):
                cos = F.normalize(seg_bank[stage], dim=-1) @ F.normalize(patches, dim=-1).T  # [bank, patches]
                grid = int(math.isqrt(cos.shape[1]))
                distance = torch.min(1 - cos, 0)[0].reshape(1, 1, grid, grid)
                few.append(F.interpolate(distance, size=size, mode="bilinear", align_corners=True)[0].numpy())
            few_maps.append(np.sum(few, axis=0))
            zero = []
            for patches in seg:
                logits = (100.0 * F.normalize(patches, dim=-1) @ text_features)[None]
                grid = int(math.isqrt(logits.shape[1]))
                logits = logits.permute(0, 2, 1).reshape(1, 2, grid, grid)
                upsampled = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
                zero.append(torch.softmax(upsampled, dim=1)[:, 1].numpy())
            zero_maps.append(np.sum(zero, axis=0))
    scores = 0.5 * _min_max(np.array(zero_maps)) + 0.5 * _min_max(np.array(few_maps))
    gt = np.asarray(masks).astype(np.int_)
    pixel = roc_auc_score(gt.flatten(), scores.flatten())
    image = roc_auc_score(np.array(labels), scores.reshape(scores.shape[0], -1).max(axis=1))
    print(f"Brain AUC : {round(image, 4)}")
    print(f"Brain pAUC : {round(pixel, 4)}")
