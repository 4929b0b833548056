"""OpenAI-style CLIP ViT: vision and text transformers with OpenAI's parameter names.

Read top to bottom: activation, attention, block, transformer, vision tower, text tower, CLIP.
Parameter names equal OpenAI's state-dict keys, so checkpoints load without renaming.
Tensors are batch first: [batch, tokens, width].
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig, TextConfig, VisionConfig
from .errors import CLIPError

QUICK_GELU_SCALE = 1.702  # OpenAI's sigmoid approximation of GELU: x * sigmoid(1.702 x)
LAYER_NORM_EPS = 1e-5
INIT_LOGIT_SCALE = math.log(1 / 0.07)
# The text tower's attributes of CLIP (logit_scale, a scalar, stays).
TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def make_activation(quick_gelu: bool) -> nn.Module:
    return QuickGELU() if quick_gelu else nn.GELU()


class PackedAttention(nn.Module):
    """Multi-head self-attention on one packed q/k/v projection, through SDPA (no attention maps kept)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = PackedAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=make_activation(quick_gelu),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


def context_used(tokens: torch.Tensor) -> int:
    """Positions up to and including the last end-of-text token of a token batch [B, context]
    (the end-of-text token has the largest id)."""
    return int(tokens.argmax(dim=-1).max()) + 1


def resample_positional_embedding(positional: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resample a [1 + g*g, width] embedding to a grid_size x grid_size grid; the class position is kept.

    Bicubic with antialiasing, align_corners False, computed in fp32 (as open_clip's resize does).
    """
    old_grid = math.isqrt(positional.shape[0] - 1)
    if old_grid * old_grid != positional.shape[0] - 1:
        raise ValueError(f"positional embedding of {positional.shape[0]} rows is not 1 + a square grid")
    if old_grid == grid_size:
        return positional
    class_pos, grid = positional[:1], positional[1:]
    width = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, width).to(positional.dtype)
    return torch.cat([class_pos, grid], dim=0)


class VisionTransformer(nn.Module):
    """conv patches + class token + positions -> ln_pre -> blocks -> ln_post(class) @ proj."""

    def __init__(self, config: VisionConfig, embed_dim: int, image_size: int, quick_gelu: bool) -> None:
        super().__init__()
        width, patch = config.width, config.patch_size
        self.patch_size = patch
        self.image_size = image_size
        self.grid_size = image_size // patch
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width).mul_(scale))
        self.positional_embedding = nn.Parameter(torch.randn(self.grid_size**2 + 1, width).mul_(scale))
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.randn(width, embed_dim).mul_(scale))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> tokens after ln_pre [B, 1 + grid^2, width] (class token first)."""
        patches = self.conv1(images)  # [B, width, gh, gw]; pixels beyond the last full patch are dropped
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        class_token = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        positional = self.positional_embedding
        if grid_h != grid_w:
            raise ValueError(f"square inputs expected, got a {grid_h} x {grid_w} patch grid")
        if grid_h != self.grid_size:  # an input size other than the one the model was built for
            positional = resample_positional_embedding(positional, grid_h)
        tokens = torch.cat([class_token, patches], dim=1) + positional.to(patches.dtype)
        return self.ln_pre(tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens -> image embedding: ln_post on the class token, then the projection."""
        return self.ln_post(tokens[:, 0]) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.transformer(self.embed(images)))


class CLIP(nn.Module):
    """OpenAI's CLIP layout: `visual.*` for the image tower, the text tower at the top level."""

    def __init__(self, config: CLIPConfig, image_size: int | None = None) -> None:
        super().__init__()
        self.config = config
        text: TextConfig = config.text
        self.visual = VisionTransformer(
            config.vision, config.embed_dim, image_size or config.vision.image_size, config.quick_gelu
        )
        self.context_length = text.context_length
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.randn(text.context_length, text.width).mul_(0.01))
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, config.quick_gelu)
        self.ln_final = nn.LayerNorm(text.width, eps=LAYER_NORM_EPS)
        self.text_projection = nn.Parameter(torch.randn(text.width, config.embed_dim).mul_(text.width**-0.5))
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def has_text_tower(self) -> bool:
        return hasattr(self, "token_embedding")

    def drop_text_tower(self) -> None:
        """Free the text tower's weights (0.5 GB in fp32 for ViT-L) once every text feature the caller
        needs is computed; encode_text then raises a CLIPError. The state dict loses the text keys."""
        for name in TEXT_TOWER:
            if hasattr(self, name):
                delattr(self, name)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False, context: int | None = None) -> torch.Tensor:
        """Token ids [B, context] -> text embeddings [B, embed_dim].

        Under the causal mask a position sees only those before it, so the end-of-text features
        depend only on the context up to the longest prompt's end token: only that much is encoded,
        or `context` positions when given (at least that much), so that batches of one prompt list
        are all encoded at the same length.
        """
        if not self.has_text_tower:
            raise CLIPError("the text tower of this CLIP model was dropped (drop_text_tower); encode text before")
        eot_positions = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        used = context_used(tokens)
        if context is not None:
            if not used <= context <= tokens.shape[1]:
                raise ValueError(f"context {context} must cover the end tokens ({used}) and fit the tokens ({tokens.shape[1]})")
            used = context
        x = self.token_embedding(tokens[:, :used]) + self.positional_embedding[:used]
        x = self.ln_final(self.transformer(x, causal=True))
        features = x[torch.arange(x.shape[0], device=x.device), eot_positions] @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True), self.logit_scale.exp()
