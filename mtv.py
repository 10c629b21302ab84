"""The MTV model: a SigLIP image-text model with four task heads on one shared ViT.

MTV ("Revisiting Multi-Task Visual Representation Learning", Di, Xie, Zhai 2026) trains one image
tower with four objectives at once. The towers here are SigLIP's (Zhai et al. 2023) parameter for
parameter, so released MTV/SigLIP checkpoints convert both ways (`MTV.from_siglip`, `to_siglip`):

    images ─► vision (ViT + MAP pool) ─┬─ pooled ─► "img"            clip   (SigLIP sigmoid loss)
                                       ├─ pooled ─► dino_head         ssl    (DINO)
                                       ├─ patch  ─► ibot_head         ssl    (iBOT, masked view)
                                       ├─ 4 layers ► depth_head       depth  (DPT)
                                       └─ patch + box ► ground_head   ground (CLOC prompter)
    tokens ─► text (transformer, last token) ─► "txt" / "name"
"""

import copy
import math
import os
import re
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

ALL_TASKS = ("clip", "ssl", "depth", "ground")

# -----------------------------------------------------------------------------
# Configs


@dataclass
class ViTConfig:
    image_size: int = 64  # training resolution; other sizes interpolate the position embeddings
    patch_size: int = 8
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_dim: int = 768
    eps: float = 1e-6  # LayerNorm epsilon, as SigLIP
    # "big_vision": xavier-uniform dense layers (SigLIP); "dino": truncated normal, std 0.02, for the
    # dense layers and the position table (DINO, iBOT, timm). Xavier's std is sqrt(2 / (fan_in +
    # fan_out)): for a square layer 0.031 at ViT-L's width, 0.088 at micro's 128, where the
    # untrained patch tokens come out mostly image-wide (README Results, "Where self-distillation
    # starts from").
    init: str = "big_vision"


VIT_INITS = ("big_vision", "dino")


@dataclass
class TextConfig:
    vocab_size: int = 258  # 256 bytes + pad + eos for the built-in byte tokenizer
    context_length: int = 96
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_dim: int = 768
    eps: float = 1e-6
    tokenizer: str = "byte"  # "byte", "words", or a directory holding a transformers tokenizer


@dataclass
class HeadConfig:
    ssl_hidden: int = 2048  # DINO/iBOT head: MLP width, bottleneck, number of prototypes (DINO's defaults)
    ssl_bottleneck: int = 256
    dino_prototypes: int = 65536
    ibot_prototypes: int = 8192
    depth_features: int = 256  # DPT's fusion width
    ground_layers: int = 2  # cross-attention layers of the region prompter
    # Initial sigmoid-loss biases: the prior log-odds of a pair being positive, -log(n - 1) for n
    # candidates. SigLIP's -10 is that for its 32k batch; train.py derives both from its global batch.
    clip_bias: float = -10.0
    ground_bias: float = -10.0


@dataclass
class MTVConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)


# Positional fields: ViTConfig(image_size, patch_size, width, depth, heads, mlp_dim), TextConfig(vocab_size,
# context_length, width, depth, heads, mlp_dim), HeadConfig(ssl_hidden, ssl_bottleneck, dino_prototypes,
# ibot_prototypes, depth_features, ground_layers).
PRESETS = {
    # The toy world: 64 px scenes, 8x8 patches, a 3M-parameter ViT that trains on a CPU.
    "tiny": MTVConfig(
        ViTConfig(64, 8, 192, 6, 3, 768),
        # hashed words: the toy world's web and full captions have 62 distinct words, at most 42 tokens
        TextConfig(2048, 64, 192, 4, 3, 768, tokenizer="words"),
        HeadConfig(512, 128, 1024, 512, 32, 2),
    ),
    # The toy ladder's model (README Results): tiny at two thirds of the width and image depth, half
    # the text depth and the DPT width; its 4-task step costs about 0.4x tiny's, which is what lets
    # Figure 1's 12 runs at a recipe where CLIP alone clearly learns fit about 90 minutes on 2 cores.
    "micro": MTVConfig(
        ViTConfig(64, 8, 128, 4, 2, 512),
        TextConfig(2048, 64, 128, 2, 2, 512, tokenizer="words"),
        HeadConfig(512, 128, 1024, 512, 16, 2),
    ),
    "S/16": MTVConfig(ViTConfig(224, 16, 384, 12, 6, 1536), TextConfig(258, 64, 384, 12, 6, 1536)),
    # Shaped exactly as google/siglip-base-patch16-224 and google/siglip-large-patch16-256, the
    # shapes of the released MTV checkpoints (SigLIP's 32k sentencepiece vocabulary, 64 tokens; with
    # the byte tokenizer only the first 258 rows are used).
    "B/16": MTVConfig(ViTConfig(224, 16, 768, 12, 12, 3072), TextConfig(32000, 64, 768, 12, 12, 3072)),
    "L/16": MTVConfig(ViTConfig(256, 16, 1024, 24, 16, 4096), TextConfig(32000, 64, 1024, 24, 16, 4096)),
}


def build_config(name: str) -> MTVConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets are {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


PRECISIONS = ("auto", "bf16", "fp32")


def autocast(device, precision="auto"):
    """The context every forward pass of train.py, evaluate.py and pseudolabel.py runs in: "auto" is
    bf16 autocast on CUDA (tensor cores, half the activation memory; weights and optimizer stay
    fp32) and fp32 elsewhere; "bf16" is bf16 autocast on any device. On the CPU it runs matmuls
    and convolutions in bf16 as CUDA does, so the tests use it to meet most dtype mismatches of
    the GPU path without a GPU; the CPU's lists of ops kept in fp32 differ somewhat from CUDA's."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def config_from_dict(d: dict) -> MTVConfig:
    """Inverse of `asdict(cfg)`; unknown keys are an error rather than silently dropped."""

    def make(cls, values):
        names = {f.name for f in fields(cls)}
        if unknown := set(values) - names:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; valid are {sorted(names)}")
        return cls(**values)

    return MTVConfig(make(ViTConfig, d["vision"]), make(TextConfig, d["text"]), make(HeadConfig, d["heads"]))


# -----------------------------------------------------------------------------
# Tokenizers: all map list[str] -> LongTensor (n, context_length), padded at the end like SigLIP's.
# `name_length` is how many positions a short entity name gets (the grounding task's names).


class ByteTokenizer:
    """UTF-8 bytes shifted by 2 (0 = pad, 1 = eos): no vocabulary file, no download, any language."""

    pad_id, eos_id, bos_id, offset = 0, 1, None, 2
    name_length = 32  # "small purple cylinder" is 21 bytes

    def __init__(self, context_length: int):
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def __call__(self, texts: list[str], length: int | None = None) -> torch.Tensor:
        """(n, length) ids; length defaults to the context length (short texts such as entity
        names may use fewer positions: the tower takes the first `length` position embeddings)."""
        length = length or self.context_length
        out = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        for i, text in enumerate(texts):
            ids = self.encode(text)[: length - 1]
            out[i, : len(ids)] = ids
            out[i, len(ids)] = self.eos_id  # always room: the text was cut to length - 1 tokens
        return torch.from_numpy(out)


class WordTokenizer(ByteTokenizer):
    """Lower-cased words and punctuation marks, each hashed (crc32) into one of vocab_size - 2 ids.

    No vocabulary file either, and one token per word instead of one per byte: captions become
    several times shorter and the text tower need not learn to spell, which is what lets the toy
    world's CLIP objective learn within a few hundred CPU steps. Distinct words may share an id
    once the vocabulary is large compared with vocab_size (feature hashing); the toy world's 62
    words are all distinct at the tiny preset's 2048 (a test checks it)."""

    name_length = 8
    pattern = re.compile(r"\w+|[^\w\s]")

    def __init__(self, context_length: int, vocab_size: int):
        super().__init__(context_length)
        self.buckets = vocab_size - self.offset

    def encode(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode()) % self.buckets + self.offset for w in self.pattern.findall(text.lower())]


class PretrainedTokenizer:
    """A transformers tokenizer from a directory, padded to max_length as SigLIP was trained."""

    def __init__(self, path: str, context_length: int):
        self.tok = _transformers().AutoTokenizer.from_pretrained(path)
        self.context_length = context_length
        self.pad_id, self.eos_id, self.bos_id = self.tok.pad_token_id, self.tok.eos_token_id, self.tok.bos_token_id
        self.name_length = min(16, context_length)

    def __call__(self, texts: list[str], length: int | None = None) -> torch.Tensor:
        enc = self.tok(list(texts), padding="max_length", truncation=True, max_length=length or self.context_length,
                       return_tensors="pt")
        return enc["input_ids"]


def build_tokenizer(text_cfg: TextConfig):
    if text_cfg.tokenizer == "byte":
        if text_cfg.vocab_size < 256 + ByteTokenizer.offset:
            raise ValueError(f"the byte tokenizer needs vocab_size >= 258, got {text_cfg.vocab_size}")
        return ByteTokenizer(text_cfg.context_length)
    if text_cfg.tokenizer == "words":
        if text_cfg.vocab_size < 3:
            raise ValueError(f"the words tokenizer needs vocab_size >= 3, got {text_cfg.vocab_size}")
        return WordTokenizer(text_cfg.context_length, text_cfg.vocab_size)
    return PretrainedTokenizer(text_cfg.tokenizer, text_cfg.context_length)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("this needs the optional `transformers` package: pip install 'mtv[experts]'") from e
    return transformers


# -----------------------------------------------------------------------------
# Transformer blocks, shared by both towers and the region prompter. Names follow timm (norm1, attn,
# mlp, norm2); q/k/v/out projections are kept separate as in SigLIP so conversion is a renaming.


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, context=None):
        """Self-attention, or cross-attention from x (B, M, W) to context (B, N, W)."""
        context = x if context is None else context
        q = rearrange(self.q_proj(x), "b m (h d) -> b h m d", h=self.heads)  # (B, H, M, W/H)
        k = rearrange(self.k_proj(context), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, W/H)
        v = rearrange(self.v_proj(context), "b n (h d) -> b h n d", h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)  # fused kernel; no mask: SigLIP attends everywhere
        return self.out_proj(rearrange(x, "b h m d -> b m (h d)"))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


class Block(nn.Module):
    """Pre-norm transformer block (ViT / SigLIP)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.attn, self.mlp = Attention(width, heads), MLP(width, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_transformer(module: nn.Module):
    """big_vision's ViT init, as SigLIP: xavier-uniform dense layers, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# Image tower: SiglipVisionTransformer (conv patches, learned positions, no CLS token, MAP pool).


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP): one learned probe attends to all patches, then an MLP."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.width) * cfg.width**-0.5)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim)

    def forward(self, x):  # (B, N, W) -> (B, W)
        x = self.attn(self.probe.expand(len(x), -1, -1), x, x, need_weights=False)[0]  # (B, 1, W)
        x = x + self.mlp(self.norm(x))  # no residual around the attention: as SigLIP
        return x[:, 0]


class VisionTower(nn.Module):
    def __init__(self, cfg: ViTConfig, mask_token: bool = False):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(self.grid**2, cfg.width) * cfg.width**-0.5)  # (N, W)
        # iBOT replaces masked patch embeddings with one learned token; only built when SSL trains it.
        self.mask_token = nn.Parameter(torch.zeros(cfg.width)) if mask_token else None
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.head = MAPHead(cfg)
        init_transformer(self)
        if cfg.init == "dino":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif cfg.init != "big_vision":
            raise ValueError(f"unknown vision init {cfg.init!r}; valid are {', '.join(VIT_INITS)}")

    def pos_embed_at(self, gh: int, gw: int) -> torch.Tensor:
        """(gh * gw, W) position embeddings; bicubic resize for other grids (SigLIP's interpolate_pos_encoding)."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        pos = rearrange(self.pos_embed, "(h w) d -> 1 d h w", h=self.grid)
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)  # (1, W, gh, gw)
        return rearrange(pos, "1 d h w -> (h w) d")

    def forward(self, images, mask=None, layers=(), pool=True) -> dict:
        """images (B, 3, H, W); mask (B, N) bool, True = replace by the mask token (iBOT);
        layers: block indices whose outputs to return (for dense heads); pool=False skips the MAP head."""
        x = self.patch_embed(images)  # (B, W, H/p, W/p)
        gh, gw = x.shape[-2:]
        x = rearrange(x, "b d h w -> b (h w) d")  # (B, N, W)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)  # before positions, as iBOT
        x = x + self.pos_embed_at(gh, gw)
        wanted = [i % len(self.blocks) for i in layers]
        saved = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                saved[i] = x
        x = self.norm(x)
        return {"patch": x, "pooled": self.head(x) if pool else None, "layers": [saved[i] for i in wanted]}


# -----------------------------------------------------------------------------
# Text tower: SiglipTextTransformer (bidirectional, no padding mask, pooled = last token).


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, out_dim: int):
        super().__init__()
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * cfg.width**-0.5)  # (T, W)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.head = nn.Linear(cfg.width, out_dim)  # into the image embedding space
        nn.init.normal_(self.token_embed.weight, std=cfg.width**-0.5)
        init_transformer(self)

    def forward(self, tokens):  # (B, T) -> (B, D)
        x = self.token_embed(tokens) + self.pos_embed[: tokens.shape[1]]  # (B, T, W)
        for block in self.blocks:
            x = block(x)
        # SigLIP pools the last position, padding included: with max_length padding every caption
        # ends in the same slot and full attention lets that slot read the whole text.
        return self.head(self.norm(x)[:, -1])


# -----------------------------------------------------------------------------
# Task heads


class ProjectionHead(nn.Module):
    """DINO head: 3-layer MLP -> bottleneck -> L2 normalise -> weight-normalised prototypes.

    The prototype norms g are fixed at 1 (DINO's norm_last_layer), so the logits are cosines
    and cannot grow by inflating weights, which stabilises training."""

    def __init__(self, width: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (K, 1) prototype norms
        g.data.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x):  # (..., W) -> (..., K)
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class ResidualConvUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT fusion: add the (refined) skip features, refine, upsample to the next scale, 1x1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.res1, self.res2, self.out = ResidualConvUnit(c), ResidualConvUnit(c), nn.Conv2d(c, c, 1)

    def forward(self, x, skip, size):
        x = self.res2(x + self.res1(skip))
        return self.out(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


def dpt_layers(vit: ViTConfig) -> tuple:
    """The 4 block indices DPT taps, evenly spaced to the last: e.g. 2, 5, 8, 11 of 12, as DPT.
    Module-level so that evaluate.py probes the same taps on models without a depth head."""
    return tuple((i + 1) * vit.depth // 4 - 1 for i in range(4))


class DepthHead(nn.Module):
    """DPT (Ranftl et al. 2021): tokens of 4 blocks reassembled into a 4x, 2x, 1x, 1/2x pyramid of
    the patch grid, fused coarse to fine, then a conv head to one channel at input resolution."""

    def __init__(self, vit: ViTConfig, features: int):
        super().__init__()
        self.layers = dpt_layers(vit)
        c = features

        def resample(factor):
            if factor > 1:
                return nn.ConvTranspose2d(c, c, factor, stride=factor)
            return nn.Identity() if factor == 1 else nn.Conv2d(c, c, 3, stride=2, padding=1)

        self.reassemble = nn.ModuleList(nn.Sequential(nn.Conv2d(vit.width, c, 1), resample(f)) for f in (4, 2, 1, 0.5))
        self.fusion = nn.ModuleList(FusionBlock(c) for _ in range(4))
        self.head_in = nn.Conv2d(c, c // 2, 3, padding=1)
        self.head_out = nn.Sequential(nn.Conv2d(c // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1))

    def forward(self, layers, grid, size):
        """layers: 4 x (B, N, W) block outputs; grid (gh, gw); size (H, W) -> (B, H, W) inverse depth."""
        pyramid = [reassemble(rearrange(x, "b (h w) d -> b d h w", h=grid[0]))
                   for reassemble, x in zip(self.reassemble, layers)]  # (B, C, 4gh, 4gw) ... (B, C, gh/2, gw/2)
        sizes = [p.shape[-2:] for p in pyramid]
        targets = sizes[2::-1] + [(2 * sizes[0][0], 2 * sizes[0][1])]  # each fusion upsamples to the next finer
        x = 0
        for fuse, skip, target in zip(self.fusion, pyramid[::-1], targets):
            x = fuse(x, skip, target)  # (B, C, 8gh, 8gw) at the end
        x = F.interpolate(self.head_in(x), size=size, mode="bilinear", align_corners=True)  # (B, C/2, H, W)
        # softplus instead of DPT's final ReLU: non-negative, but never stuck at zero with no gradient
        return F.softplus(self.head_out(x))[:, 0]


def box_features(boxes, n_freq: int = 8):
    """(..., 4) boxes x0, y0, x1, y1 in 0..1 -> (..., 16 * n_freq) Fourier features of corners, centre, size.
    Fourier features (Tancik et al. 2020) let an MLP resolve fine positions that raw coordinates blur.
    Computed in float32: the highest frequency's angles reach ~400, beyond bfloat16's precision."""
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    coords = torch.stack([x0, y0, x1, y1, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)  # (..., 8)
    freqs = math.pi * 2.0 ** torch.arange(n_freq, device=boxes.device)
    angles = coords[..., None] * freqs  # (..., 8, F)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


class CrossBlock(nn.Module):
    """Pre-norm block whose queries attend to a separate context (no self-attention: regions stay independent)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.norm1, self.norm_kv = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.attn, self.mlp = Attention(width, heads), MLP(width, mlp_dim)

    def forward(self, q, context):
        q = q + self.attn(self.norm1(q), self.norm_kv(context))
        return q + self.mlp(self.norm2(q))


class GroundPrompter(nn.Module):
    """CLOC's prompter (Chen et al. 2024): a query token plus an embedding of the box cross-attends to
    the patch tokens and becomes a region embedding in the text space. Patches get the same box
    embedding of their own cell, so query and keys share one coordinate frame."""

    def __init__(self, vit: ViTConfig, out_dim: int, layers: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(vit.width) * 0.02)
        self.box_embed = nn.Sequential(nn.Linear(16 * 8, vit.width), nn.GELU(), nn.Linear(vit.width, vit.width))
        self.blocks = nn.ModuleList(CrossBlock(vit.width, vit.heads, vit.mlp_dim, vit.eps) for _ in range(layers))
        self.norm = nn.LayerNorm(vit.width, eps=vit.eps)
        self.proj = nn.Linear(vit.width, out_dim)
        init_transformer(self)

    def forward(self, patch, grid, boxes):
        """patch (B, N, W) final tokens, grid (gh, gw), boxes (B, M, 4) -> (B, M, D) L2-normalised."""
        gh, gw = grid
        ys, xs = torch.meshgrid(torch.arange(gh, device=patch.device), torch.arange(gw, device=patch.device),
                                indexing="ij")
        cells = torch.stack([xs / gw, ys / gh, (xs + 1) / gw, (ys + 1) / gh], -1)  # (gh, gw, 4)
        cells = box_features(rearrange(cells, "h w c -> (h w) c")).to(patch.dtype)  # (N, 128)
        context = patch + self.box_embed(cells)  # (B, N, W)
        q = self.query + self.box_embed(box_features(boxes).to(patch.dtype))  # (B, M, W)
        for block in self.blocks:
            q = block(q, context)
        return F.normalize(self.proj(self.norm(q)), dim=-1)


# -----------------------------------------------------------------------------
# The model


class MTV(nn.Module):
    def __init__(self, cfg: MTVConfig, tasks=ALL_TASKS):
        super().__init__()
        if bad := [t for t in tasks if t not in ALL_TASKS]:
            raise ValueError(f"unknown tasks {bad}; valid tasks are {', '.join(ALL_TASKS)}")
        self.cfg, self.tasks = cfg, tuple(t for t in ALL_TASKS if t in tasks)
        self.tokenize = build_tokenizer(cfg.text)
        width, h = cfg.vision.width, cfg.heads
        self.vision = VisionTower(cfg.vision, mask_token="ssl" in tasks)
        if "clip" in tasks or "ground" in tasks:  # both align images with text
            self.text = TextTower(cfg.text, out_dim=width)
        # SigLIP's learnable temperature and bias, one pair per sigmoid loss: logits start at
        # 10 * cos + bias with the bias at the prior log-odds, so the many negatives begin with a
        # small loss instead of dominating. Grounding has its own pair: its candidates are the
        # names of the batch (train.NAMES_PER_IMAGE per image), not its captions.
        if "clip" in tasks:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.heads.clip_bias)))
        if "ssl" in tasks:
            self.dino_head = ProjectionHead(width, h.ssl_hidden, h.ssl_bottleneck, h.dino_prototypes)
            self.ibot_head = ProjectionHead(width, h.ssl_hidden, h.ssl_bottleneck, h.ibot_prototypes)
        if "depth" in tasks:
            self.depth_head = DepthHead(cfg.vision, h.depth_features)
        if "ground" in tasks:
            self.ground_head = GroundPrompter(cfg.vision, width, h.ground_layers)
            self.ground_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.ground_logit_bias = nn.Parameter(torch.tensor(float(cfg.heads.ground_bias)))

    def _grid(self, images):
        return images.shape[-2] // self.cfg.vision.patch_size, images.shape[-1] // self.cfg.vision.patch_size

    # Single-purpose entry points (evaluation, users).

    def encode_image(self, images):  # (B, 3, H, W) -> (B, D)
        return F.normalize(self.vision(images)["pooled"], dim=-1)

    def encode_text(self, tokens):  # (B, T) -> (B, D)
        return F.normalize(self.text(tokens), dim=-1)

    def depth_taps(self, layers):
        """The DPT head's inputs: the tapped block outputs through the tower's final LayerNorm, as
        Depth Anything V2 feeds its head (DINOv2's get_intermediate_layers with norm=True)."""
        return [self.vision.norm(x) for x in layers]

    def predict_depth(self, images):  # (B, 3, H, W) -> (B, H, W) relative inverse depth
        layers = self.vision(images, layers=self.depth_head.layers, pool=False)["layers"]
        return self.depth_head(self.depth_taps(layers), self._grid(images), images.shape[-2:])

    def embed_regions(self, images, boxes):  # (B, 3, H, W), (B, M, 4) -> (B, M, D)
        return self.ground_head(self.vision(images, pool=False)["patch"], self._grid(images), boxes)

    # Training: everything the enabled tasks need, each tower run once per kind of view.

    def forward(self, batch: dict, ssl: bool = True) -> dict:
        """ssl=False (train.py before --ssl-start): the ssl heads and views are left out, so that
        the tower runs on the caption views alone and DDP sees those parameters unused."""
        tasks, out = self.tasks, {}
        views = batch["global"]  # (G*B, 3, S, S) view-major: view 0 of every image, then view 1, ...
        # ssl reads the last two global views (DINO's pair; iBOT masks the last): views 0 and 1, or
        # with separate ssl views (data.AugConfig.ssl_views) views 1 and 2 after the caption view 0.
        b = len(batch["ibot_mask"]) if "ssl" in tasks else len(views)
        ssl = ssl and "ssl" in tasks
        mask = None
        if ssl:  # the caption view stays clean for clip, depth and ground
            m = ibot_masks(batch)  # (B, N) the last ssl view's, or (2B, N) both ssl views'
            mask = torch.cat([m.new_zeros((len(views) - len(m), m.shape[1])), m])  # (G*B, N)
        else:
            views = views[:b]
        layers = self.depth_head.layers if "depth" in tasks else ()
        vis = self.vision(views, mask=mask, layers=layers, pool="clip" in tasks or ssl)
        if "clip" in tasks:
            # the bias as a copy, not the parameter itself: DDP looks for unused parameters (before
            # --ssl-start) in the outputs' autograd graph, which a bare parameter is not part of
            out["logit_scale"], out["logit_bias"] = self.logit_scale.exp(), self.logit_bias.clone()
            out["img"] = F.normalize(vis["pooled"][:b], dim=-1)  # (B, D)
            out["txt"] = self.encode_text(batch["text"])  # (B, D)
        if ssl:
            out["dino_global"] = self.dino_head(vis["pooled"][-2 * b:])  # (2B, K)
            out["pooled"] = vis["pooled"][-2 * b:]  # (2B, W) student global features, for KoLeo
            if "local" in batch:  # DINO multi-crop; without local crops only the two global views pair up
                out["dino_local"] = self.dino_head(self.vision(batch["local"])["pooled"])  # (L*B, K)
            out["ibot"] = self.ibot_head(vis["patch"][-len(m):])  # (B or 2B, N, K') the masked view(s)
        if "depth" in tasks:
            out["depth"] = self.depth_head(self.depth_taps([x[:b] for x in vis["layers"]]), self._grid(views),
                                           views.shape[-2:])
        if "ground" in tasks:
            regions = self.ground_head(vis["patch"][:b], self._grid(views), batch["boxes"])  # (B, M, D)
            # The R valid boxes, row-major, without a boolean index (it would make the host wait for
            # the GPU to count them, forward and backward): a stable sort puts the valid slots first.
            first = torch.argsort((~batch["box_valid"]).flatten().byte(), stable=True)[: len(batch["name_tokens"])]
            out["region"] = regions.flatten(0, 1)[first]  # (R, D) row-major, the order of name_tokens
            # names are tokenized shorter than captions (`name_length`), hence their own text pass
            out["name"] = self.encode_text(batch["name_tokens"])  # (R, D)
            out["ground_logit_scale"] = self.ground_logit_scale.exp()
            out["ground_logit_bias"] = self.ground_logit_bias.clone()  # a copy: see logit_bias
        return out

    def ssl_teacher(self) -> nn.Module:
        """A frozen copy of the SSL branch for the EMA teacher, with the student's parameter names."""
        if "ssl" not in self.tasks:
            raise ValueError("ssl_teacher() needs a model built with the 'ssl' task")
        teacher = SSLTeacher(copy.deepcopy(self.vision), copy.deepcopy(self.dino_head), copy.deepcopy(self.ibot_head))
        return teacher.requires_grad_(False)

    # Saving, loading, converting.

    def config_dict(self) -> dict:
        return {"config": asdict(self.cfg), "tasks": list(self.tasks)}

    @classmethod
    def from_config_dict(cls, d: dict) -> "MTV":
        return cls(config_from_dict(d["config"]), tasks=d["tasks"])

    @classmethod
    def initialised(cls, cfg: MTVConfig, tasks, seed: int) -> "MTV":
        """The model train.py starts from with --seed seed: the one definition of "at initialisation",
        so that evaluate.py --init scores exactly the weights a run took its first step from."""
        torch.manual_seed(seed)
        return cls(cfg, tasks)

    @classmethod
    def from_siglip(cls, model_or_path, tasks=("clip",)) -> "MTV":
        """A transformers SiglipModel (or a local directory holding one) as an MTV model. Heads of
        other tasks start from random initialisation. A tokenizer saved in that directory is used."""
        tf = _transformers()
        tokenizer = "byte"
        if isinstance(model_or_path, (str, os.PathLike)):
            path = Path(model_or_path)
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} is not a local transformers model directory (no config.json)")
            if any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "spiece.model")):
                tokenizer = str(path)
            model_or_path = tf.SiglipModel.from_pretrained(path)
        vc, tc = model_or_path.config.vision_config, model_or_path.config.text_config
        projection = getattr(tc, "projection_size", tc.hidden_size)  # older transformers project to the text width
        if not vc.vision_use_head or vc.hidden_act != "gelu_pytorch_tanh" or projection != vc.hidden_size:
            raise ValueError("only SigLIP models with the MAP head, gelu_pytorch_tanh and text projection to "
                             "the vision width convert")
        cfg = MTVConfig(
            ViTConfig(vc.image_size, vc.patch_size, vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads,
                      vc.intermediate_size, vc.layer_norm_eps),
            TextConfig(tc.vocab_size, tc.max_position_embeddings, tc.hidden_size, tc.num_hidden_layers,
                       tc.num_attention_heads, tc.intermediate_size, tc.layer_norm_eps, tokenizer),
            HeadConfig(),
        )
        model = cls(cfg, tasks=tasks)
        theirs, ours = model_or_path.state_dict(), model.state_dict()
        # strict=False: the task heads (and iBOT's mask token) are not in SigLIP and keep their init
        model.load_state_dict({k: theirs[v].reshape(ours[k].shape) for k, v in _siglip_names(model).items()},
                              strict=False)
        return model

    def to_siglip(self):
        """This model's towers as a transformers SiglipModel (the task heads are not part of SigLIP)."""
        tf = _transformers()
        if not hasattr(self, "text"):
            raise ValueError("to_siglip() needs the text tower: build the model with 'clip' or 'ground'")
        v, t = self.cfg.vision, self.cfg.text
        config = tf.SiglipConfig(
            vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                               num_hidden_layers=v.depth, num_attention_heads=v.heads,
                               intermediate_size=v.mlp_dim, layer_norm_eps=v.eps),
            text_config=dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length,
                             hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.heads,
                             intermediate_size=t.mlp_dim, layer_norm_eps=t.eps, projection_size=v.width,
                             pad_token_id=self.tokenize.pad_id, eos_token_id=self.tokenize.eos_id,
                             bos_token_id=self.tokenize.bos_id),
        )
        model = tf.SiglipModel(config)
        theirs, ours = model.state_dict(), self.state_dict()
        model.load_state_dict({v: ours[k].reshape(theirs[v].shape) for k, v in _siglip_names(self).items()})
        return model


class SSLTeacher(nn.Module):
    def __init__(self, vision: VisionTower, dino_head: ProjectionHead, ibot_head: ProjectionHead):
        super().__init__()
        self.vision, self.dino_head, self.ibot_head = vision, dino_head, ibot_head

    def forward(self, batch: dict) -> dict:
        b = len(batch["ibot_mask"])
        masked = 2 * b if "ibot_mask_first" in batch else b  # rows of ibot_masks(batch)
        vis = self.vision(batch["global"][-2 * b:])  # the two ssl views, unmasked: the teacher sees every patch
        return {"dino_global": self.dino_head(vis["pooled"]), "ibot": self.ibot_head(vis["patch"][-masked:])}


def ibot_masks(batch):
    """The iBOT masks of the ssl views, view-major as the views: (B, N) for the last view, or (2B, N)
    when both are masked (data.AugConfig.mask_views = "both", as iBOT)."""
    if "ibot_mask_first" in batch:
        return torch.cat([batch["ibot_mask_first"], batch["ibot_mask"]])
    return batch["ibot_mask"]


def _siglip_names(model: MTV) -> dict:
    """{our state-dict key: transformers SiglipModel key} for the two towers and the logit scale/bias."""
    prefixes = {  # matched longest first, so vision.head.attn wins over vision.head
        "vision.patch_embed": "vision_model.embeddings.patch_embedding",
        "vision.pos_embed": "vision_model.embeddings.position_embedding.weight",
        "vision.blocks": "vision_model.encoder.layers",
        "vision.norm": "vision_model.post_layernorm",
        "vision.head.attn": "vision_model.head.attention",
        "vision.head.norm": "vision_model.head.layernorm",
        "vision.head": "vision_model.head",
        "text.token_embed": "text_model.embeddings.token_embedding",
        "text.pos_embed": "text_model.embeddings.position_embedding.weight",
        "text.blocks": "text_model.encoder.layers",
        "text.norm": "text_model.final_layer_norm",
        "text.head": "text_model.head",
        "logit_scale": "logit_scale",
        "logit_bias": "logit_bias",
    }
    inside = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn": "self_attn"}  # block-level names
    names = {}
    for key in model.state_dict():
        for ours, theirs in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):
            if key == ours or key.startswith(ours + "."):
                rest = [inside.get(part, part) for part in key[len(ours):].split(".")]
                names[key] = theirs + ".".join(rest)
                break
    return names


def load_error(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line. torch's own message runs over
    many lines and suggests weights_only=False, which would run whatever code the file holds."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:  # a pickled object that is not a tensor or plain data
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0].splitlines()[0]
        return f"torch.load(weights_only=True) refuses it: {reason}"
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_model(path, map_location="cpu") -> MTV:
    """An MTV model from a checkpoint written by train.py (keys "model_config" and "model")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)  # plain data only, never code
    except Exception as e:  # truncated, not a checkpoint, or holding pickled objects
        raise ValueError(f"{path} is not a readable mtv checkpoint ({load_error(e)})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not an mtv checkpoint (expected the keys 'model_config' and 'model')")
    model = MTV.from_config_dict(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model
