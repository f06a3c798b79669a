"""
ARPG: autoregressive image generation with randomized parallel decoding, in one file.

Li, Yang, Li, Wang, "Autoregressive Image Generation with Randomized Parallel Decoding"
(ICLR 2026, arXiv 2503.10568).

The idea. An image is a grid of L tokens (codes of a VQ tokenizer, tokenizer.py), generated in a
random order. The model separates *what* is known from *where* to predict next. Pass 1 (the
"context decoder": causal self-attention) reads the class token and the tokens revealed so far
and turns them into keys and values. Pass 2 (the "guided decoder") asks one query per position
to predict: every query starts as the same learned [MASK] vector and carries only its target
position (through RoPE), and it reads Pass 1's keys and values by cross-attention. Queries never
attend to each other, so any number of positions can be predicted in one step against one KV
cache: decoding takes 32-64 steps instead of L (worked example: `ARPG.forward`).

Names. The two passes keep the official checkpoint's names, since those are its keys: Pass 1 is
`layers.self_dec` (ContextBlock, SelfAttention, `context_depth` blocks), Pass 2 `layers.cross_dec`
(GuidedBlock, CrossAttention, `guided_depth` blocks); `ARPG.context` and `ARPG.guided` run them.

This file is the model, written to be read top to bottom:

    shape legend -> 2-D RoPE (with the class-token quirk) -> attention -> Pass-1 and Pass-2
    blocks -> token sampling -> the model: training forward (random-order teacher forcing,
    paper Sec. 3.1), then `generate` (randomized parallel decoding, Sec. 3.1 and Alg. 1) with
    zero-shot editing (known tokens, Sec. 3.2) -> the fast decoding path (the same tokens, less
    overhead) -> checkpoint loading (official files and ours) -> the device check.

With the official presets (L, XL, XXL) it computes exactly what the official implementation
computes (tests/test_arpg.py checks logits and generations against fixtures made by running
it) and loads the released weights; the CPU-sized `tiny` preset departs in three marked places
(the class token's RoPE slot, Pass-2 queries that carry their position, a 2 + 5 block split).

Quick use:
    import torch
    from arpg import ARPG
    model = ARPG.from_checkpoint("arpg_300m.pt").eval()        # official ARPG-L
    tokens = model.generate(torch.tensor([207, 360]), steps=64, cfg_scale=5.0)  # (2, 256)
Train with `python train.py`, sample with `python sample.py`.
"""

import argparse
import functools
import math
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.fx.experimental._config  # dynamo's shape settings (compile_for_any_size)
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from data import atomic_output
from schedules import CFG_SCHEDULES, SAMPLING_DEFAULTS, check_decoding, default_steps, reveal_counts

# -----------------------------------------------------------------------------
# Shape legend (used in every shape comment below)
#   B  batch (rows; doubled to 2B when classifier-free guidance is on)
#   L  image tokens in the grid (rows * cols; 256 for 256x256 ImageNet with VQ-16)
#   S  decoding steps
#   T  tokens fed to Pass 1 in one call (L in training; at inference first the class token and any
#      known tokens, then the tokens revealed last step)
#   N  keys in a cache (everything Pass 1 has seen so far)
#   K  [MASK] queries in one call (L in training, the tokens to reveal this step at inference)
#   U  tokens still unknown when decoding starts (L, or fewer when editing keeps some)
#   C  model width (dim), H heads, D head dim = C / H
#   V  codebook size (vocab_size)


# -----------------------------------------------------------------------------
# Configuration and presets

@dataclass
class ARPGConfig:
    dim: int = 1024                    # model width C
    n_layer: int = 24                  # total blocks: Pass 1's, then Pass 2's
    pass1_layers: Optional[int] = None  # blocks of Pass 1 (the rest are Pass 2); None: half, the paper's split
    n_head: int = 16                   # attention heads H (head dim D = dim / n_head)
    vocab_size: int = 16384            # codebook size V of the VQ tokenizer
    num_classes: int = 1000            # class labels (ImageNet: 1000)
    block_size: int = 256              # image tokens L of the training grid (a square: 16 x 16)
    multiple_of: int = 256             # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # extra factor on the SwiGLU hidden (official; no preset sets it)
    rope_base: float = 10000.0         # RoPE frequency base
    class_rope: str = "zero"           # RoPE of the class token: "zero" (official, see below) or "identity"
    query_position: bool = False       # add a learned map of its RoPE row to each Pass-2 query (tiny; see ARPG.guided)
    norm_eps: float = 1e-5             # RMSNorm epsilon
    token_dropout_p: float = 0.1       # dropout on Pass-1 input embeddings (training only)
    attn_dropout_p: float = 0.0        # dropout on attention probabilities (training only)
    resid_dropout_p: float = 0.1       # dropout on each attention output projection (training only)
    ffn_dropout_p: float = 0.1         # dropout on each feed-forward output (training only)
    class_dropout_prob: float = 0.1    # P(label -> null class) in training, for classifier-free guidance

    def __post_init__(self):
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ValueError(f"dim {self.dim} must split into {self.n_head} heads whose size is a multiple of 4 "
                             "(2-D RoPE rotates pairs of channels in two halves)")
        if self.pass1_layers is None and self.n_layer % 2:
            raise ValueError(f"n_layer must be even (half Pass 1, half Pass 2), got {self.n_layer}; "
                             f"or set pass1_layers")
        if not 1 <= self.context_depth < self.n_layer:
            raise ValueError(f"pass1_layers must leave at least one block for each pass, got {self.pass1_layers} "
                             f"of {self.n_layer}")
        if self.class_rope not in ("zero", "identity"):
            raise ValueError(f"class_rope must be 'zero' or 'identity', got {self.class_rope!r}")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"block_size must be a square grid of tokens, got {self.block_size}")

    @property
    def context_depth(self) -> int:
        """Blocks of Pass 1, the context decoder."""
        return self.n_layer // 2 if self.pass1_layers is None else self.pass1_layers

    @property
    def guided_depth(self) -> int:
        """Blocks of Pass 2, the guided decoder."""
        return self.n_layer - self.context_depth

    @property
    def grid_size(self) -> int:
        """Side of the (square) training grid: 16 for 256 tokens."""
        return math.isqrt(self.block_size)


# Parameter counts: ARPG-L 319,845,376; ARPG-XL 718,997,760; ARPG-XXL 1,302,449,664 (16384 codes,
# 1000 classes, as released); tiny 1,744,512 (128 codes, 10 classes, 8 x 8 grid; trains on a laptop CPU).
# tiny's 7 blocks are split 2 + 5, not half and half: a Pass-2 block is where a target's query
# reads the canvas, and at this size reading it well mattered more than encoding the known tokens
# once more (a Pass-2 block is also cheaper: it has no key/value projections). train.py trains 5
# blocks (2 + 3) instead where the CPU lacks bf16 (train.FP32_CPU_TINY_LAYERS). Each choice, with
# its measurements: EXPERIMENTS.md.
ARPG_PRESETS = {
    "tiny": ARPGConfig(dim=128, n_layer=7, pass1_layers=2, n_head=4, vocab_size=128, num_classes=10, block_size=64,
                       class_rope="identity", query_position=True),  # departures: RoPE section, ARPG.guided, the split
    "L": ARPGConfig(dim=1024, n_layer=24, n_head=16),
    "XL": ARPGConfig(dim=1280, n_layer=36, n_head=20),
    "XXL": ARPGConfig(dim=1536, n_layer=48, n_head=24),
}


# -----------------------------------------------------------------------------
# 2-D rotary position embedding (SPEC 4)
#
# RoPE tells attention *where* a token is by rotating its query/key channels. In 2-D, the head
# dim D is split in two: channel pairs in the first half rotate by the token's row, pairs in the
# second half by its column. A table row holds (cos, sin) for every pair: shape (D/2, 2).
#
# The table has one extra slot in front, slot 0, for the class token, so grid position p
# (row-major, p = row * cols + col) is slot p + 1: hence every `rope[... + 1]` below. In the
# official code slot 0 is all ZEROS (cos = sin = 0), not the identity rotation. Rotating by it
# multiplies a vector by zero, so the class token's query and key vanish: every attention logit
# against it is 0 and it acts only through its value. That is a quirk of LlamaGen's table, and
# the released ARPG weights were trained with it, so the L / XL / XXL presets keep it
# (class_rope="zero").
#
# The `tiny` preset uses the identity rotation instead (class_rope="identity"), a deliberate
# departure. With the zero slot no query can attend to the class more than its other keys let
# it, and no query can tell where it is on the canvas: RoPE alone gives only offsets between
# tokens, and the class key, the one key without a position, is zero. With the identity slot the
# class key is an ordinary, unrotated key, so the model can attend to the class as strongly as it
# likes and learn absolute position from it (class accuracy 13.6% -> 23.0% in an early short run:
# EXPERIMENTS.md). ImageNet-scale models learn around the quirk; a tiny one on a CPU budget cannot.

def build_rope_table(rows: int, cols: int, head_dim: int, base: float = 10000.0,
                     class_rope: str = "zero") -> torch.Tensor:
    """(cos, sin) of every grid position, after the class token's slot: (1 + rows*cols, D/2, 2)."""
    n_freq = head_dim // 4                                                # frequencies per half
    freqs = 1.0 / base ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    row_angle = torch.outer(torch.arange(rows).float(), freqs)           # (rows, D/4)
    col_angle = torch.outer(torch.arange(cols).float(), freqs)           # (cols, D/4)
    angle = torch.cat([row_angle[:, None, :].expand(rows, cols, n_freq),
                       col_angle[None, :, :].expand(rows, cols, n_freq)], dim=-1)  # (rows, cols, D/2)
    table = torch.stack([angle.cos(), angle.sin()], dim=-1).flatten(0, 1)  # (rows*cols, D/2, 2)
    class_slot = torch.zeros(1, head_dim // 2, 2)                         # "zero": the official slot
    if class_rope == "identity":
        class_slot[..., 0] = 1.0                                          # cos 1, sin 0: no rotation
    return torch.cat([class_slot, table])                                 # (1 + rows*cols, D/2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2k, 2k+1) of x (B, T, H, D) by rope (B or 1, T, D/2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)                      # (B, T, H, D/2, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]            # (B, T, 1, D/2) each
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)  # (B, T, H, D/2, 2)
    return rotated.flatten(-2).type_as(x)                                 # (B, T, H, D); math in fp32


# -----------------------------------------------------------------------------
# Llama-style building blocks: RMSNorm and the SwiGLU feed-forward (SPEC 3)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # normalise in fp32 even under bf16 autocast, as the official code does
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden = 2/3 of 4*dim rounded up (2816 for dim 1024)."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        hidden = int(2 * 4 * config.dim / 3)
        if config.ffn_dim_multiplier is not None:
            hidden = int(config.ffn_dim_multiplier * hidden)
        hidden = find_multiple(hidden, config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


# -----------------------------------------------------------------------------
# Attention. Masks are always explicit arguments: a boolean (queries, keys) tensor where True
# means "may attend", or None for "everything". Training passes a causal mask; inference passes
# None on purpose (SPEC 6), except to the prefill of known tokens when editing (`generate`).
# Nothing here looks at `self.training` to decide what is visible.
#
# On a CPU under bf16 autocast, attention is spelled out (`attend_unfused`) rather than fused:
# PyTorch's fused CPU attention is about 7x slower backwards in bf16, and running it in fp32
# between bf16 matrix multiplies still left the `tiny` training step ~10% slower than two bf16
# batched matrix multiplies around an fp32 softmax (2-core AMD EPYC: 216-231 ms against 195-206).

def attend(q, k, v, mask, dropout_p):
    """Scaled dot-product attention; q (B, H, K, D), k and v (B, H, N, D) -> (B, K, H*D)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return attend_unfused(q, k, v, mask, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, K, D)
    return rearrange(out, "b h k d -> b k (h d)")


def attend_unfused(q, k, v, mask, dropout_p):
    """attend() spelled out as softmax(q k^T / sqrt(D)) v, the softmax in fp32; mask (K, N) or None.

    Same result, to float rounding. Only bf16 training on a CPU uses it (above): in fp32 on a CPU the
    fused kernel is faster, decoding's few queries included (torch 2.13, 2-core AMD EPYC, fp32,
    32 rows of 4 heads: 28-428 against 54-464 us a call, from 1 query and 3 keys to 8 and 257).
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)              # (B, H, K, N)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(torch.softmax(scores.float(), dim=-1), dropout_p).type_as(v)
    return rearrange(weights @ v, "b h k d -> b k (h d)")


class SelfAttention(nn.Module):
    """Pass-1 attention: image tokens attend to the tokens revealed so far (and to themselves).

    With a cache (inference), the new keys/values are appended to the cached ones and the grown
    cache is returned, so Pass 1 only ever processes the tokens revealed in the previous step.
    """

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout_p = config.attn_dropout_p
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)
        self.to_k = nn.Linear(config.dim, config.dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.proj_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x, rope, mask=None, cache=None):
        # x (B, T, C); rope (B or 1, T, D/2, 2): each token is rotated by its own grid position
        # (B, T, H, D) each
        q, k, v = (rearrange(f(x), "b t (h d) -> b t h d", h=self.n_head) for f in (self.to_q, self.to_k, self.to_v))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                 # (B, H, T, D)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)                           # (B, H, N+T, D)
            v = torch.cat([cache[1], v], dim=2)                           # (B, H, N+T, D)
        out = attend(q, k, v, mask, self.dropout_p if self.training else 0.0)  # (B, T, C)
        return self.proj_dropout(self.proj(out)), (k, v)


class CrossAttention(nn.Module):
    """Pass-2 attention: [MASK] queries attend to the shared keys/values of Pass 1.

    Only the query and output projections live here; keys and values come from the one shared
    projection after Pass 1 (SPEC 3), already rotated by the position of the token they came from.
    "Target-aware": the query is rotated by the position it must predict (see `ARPG.forward`).
    """

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout_p = config.attn_dropout_p
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.proj_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x, target_rope, k, v, mask=None):
        # x (B, K, C); target_rope (B or 1, K, D/2, 2); k, v (B, H, N, D)
        q = rearrange(self.to_q(x), "b k (h d) -> b k h d", h=self.n_head)  # (B, K, H, D)
        q = apply_rope(q, target_rope)
        out = attend(q.transpose(1, 2), k, v, mask, self.dropout_p if self.training else 0.0)  # (B, K, C)
        return self.proj_dropout(self.proj(out))


# -----------------------------------------------------------------------------
# The two kinds of pre-norm block, and the two-pass decoder that holds them (SPEC 3).
# Submodule names (self_dec, cross_dec, attn_norm, to_k, ...) are the official checkpoint's keys.

class ContextBlock(nn.Module):
    """Pass-1 block: self-attention over revealed tokens (causal in training), then SwiGLU."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = SelfAttention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x, rope, mask=None, cache=None):
        attn_out, cache = self.attn(self.attn_norm(x), rope, mask, cache)
        x = x + attn_out
        return x + self.ffn(self.ffn_norm(x)), cache


class GuidedBlock(nn.Module):
    """Pass-2 block: [MASK] queries cross-attend to the shared KV, then SwiGLU."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = CrossAttention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x, target_rope, k, v, mask=None):
        x = x + self.attn(self.attn_norm(x), target_rope, k, v, mask)
        return x + self.ffn(self.ffn_norm(x))


class TwoPassDecoder(nn.Module):
    """The weights of the two passes, under the official checkpoint's names: Pass 1, the context
    decoder (self_dec), and Pass 2, the guided decoder (cross_dec), with the shared K/V projection
    and norm between them. It has no forward: ARPG.context and ARPG.guided run the passes."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.self_dec = nn.ModuleList(ContextBlock(config) for _ in range(config.context_depth))  # Pass 1
        self.cross_dec = nn.ModuleList(GuidedBlock(config) for _ in range(config.guided_depth))   # Pass 2
        # Between the passes: one norm and ONE shared key/value projection that every Pass-2 block
        # reads. Sharing it is what halves ARPG's KV-cache memory (paper Table 5, "shared KV").
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.to_k = nn.Linear(config.dim, config.dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.dim, bias=False)


# -----------------------------------------------------------------------------
# Sampling a token from logits (SPEC 6). The decoding schedules, MASK_SCHEDULES, reveal_counts
# and CFG_SCHEDULES, are in schedules.py: torch-free, so onnx_sampler.py uses the same ones.


def guide(logits, scale):
    """Classifier-free guidance: doubled logits (2B, K, V), the conditional half first, ->
    uncond + (cond - uncond) * scale (B, K, V) in float32, the official formula to the last bit.

    The halves may be bf16 (the fast path's head output): a GPU's kernels widen them exactly as
    they read them, with no float32 copy of the doubled logits (a CPU's kernels first copy each
    bf16 operand to float32). The result is a new tensor (copy=True leaves the doubled logits as
    they were) holding no view of them, so they are freed once the caller drops them. Every copy
    counts: at ARPG-L's size a step's doubled logits take up to 0.34 GB in float32 (64 images,
    40 targets)."""
    cond, uncond = logits.chunk(2)                                        # (B, K, V) each
    return cond.to(torch.float32, copy=True).sub_(uncond).mul_(scale).add_(uncond)


def sample_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Draw one token per row of logits (..., V) after temperature, top-k and top-p filtering,
    overwriting float32 logits with their probabilities.

    Sampling is in float32, as in the official loop: other logits are widened into a new float32
    tensor first, and are left as they were. Working in place, sampling holds only
    torch.multinomial's scratch beside the logits (top-p also sorts a copy)."""
    logits = logits.float()                                               # (no copy if float32)
    if temperature != 1.0:
        logits.div_(max(temperature, 1e-5))
    if top_k > 0:  # keep the k most likely
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set whose probability reaches top_p (always the top token)
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p    # mass before each (..., V), sorted
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)  # back to vocab order
        logits.masked_fill_(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1, out=logits)                     # in place, the same numbers
    flat = torch.multinomial(probs.flatten(0, -2), 1, generator=generator)  # (B*K, 1), as the official loop
    return flat.view(probs.shape[:-1])                                    # (B, K)


# -----------------------------------------------------------------------------
# The model

def in_eval_mode(method):
    """Run a sampling method with dropout off, then restore train/eval mode (train.py samples mid-training)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.train(was_training)
    return wrapper


class ARPG(nn.Module):
    """Class-conditional ARPG. Token space (one embedding table, SPEC 2):

        [0, V)            image codes
        V                 [MASK]: the content of every Pass-2 query
        V + 1 + c         class c
        V + classes + 1   null class (classifier-free guidance)
        V + classes + 2   unused, kept because the released checkpoints have it
    """

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.config = config
        V = config.vocab_size
        self.mask_id = V
        self.null_class_id = V + config.num_classes + 1
        self.embeddings = nn.Embedding(V + config.num_classes + 3, config.dim)
        self.embed_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = TwoPassDecoder(config)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, V, bias=False)
        head_dim = config.dim // config.n_head
        # Only with config.query_position (the tiny preset; not in the paper): see `guided`.
        self.query_position = nn.Linear(head_dim, config.dim, bias=False) if config.query_position else None
        # Not a parameter and not saved: the official checkpoints do not contain it either.
        self.register_buffer("rope", self.new_rope_table(config.grid_size, config.grid_size),
                             persistent=False)                            # (1 + L, D/2, 2)
        self.apply(self._init_weights)
        nn.init.zeros_(self.head.weight)  # start from uniform predictions, as the official recipe

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the RoPE table too (its cos and sin off by up to
        # 2e-3), where the official code keeps its table in fp32: the table follows the model's
        # device, never its dtype. A table on the meta device (a model built there, then given
        # storage by `to_empty`) has no values to move, so it is built again.
        rope = self.rope
        super()._apply(fn, recurse)
        device = self.head.weight.device
        if rope.is_meta and device.type != "meta":
            rope = self.new_rope_table(self.config.grid_size, self.config.grid_size)
        self.rope = rope.to(device)
        return self

    def class_ids(self, labels):
        """Class label c -> its token id."""
        return labels + self.config.vocab_size + 1

    def rope_table(self, rows, cols):
        """The RoPE table of a rows x cols grid: the saved one for the training grid, else a new one
        (outpainting and resolution expansion decode larger grids)."""
        if (rows, cols) == (self.config.grid_size,) * 2:
            return self.rope
        return self.new_rope_table(rows, cols).to(self.rope.device)

    def new_rope_table(self, rows, cols):
        """build_rope_table for this model's heads, base and class slot."""
        return build_rope_table(rows, cols, self.config.dim // self.config.n_head, self.config.rope_base,
                                self.config.class_rope)

    # --- the two passes, as separate calls (the ONNX export cuts the model exactly here) ---

    def context(self, ids, rope, mask=None, caches=None):
        """Pass 1: tokens in, keys and values out.

        ids (B, T) token ids; rope (B or 1, T, D/2, 2) their positions; caches: None or the list
        returned by the previous call. Returns the grown list: one (k, v) per Pass-1 layer, then
        the shared (k, v) that Pass 2 reads, each (B, H, N, D) with N = everything seen so far.
        """
        x = self.embed_dropout(self.embeddings(ids))                      # (B, T, C)
        grown = []
        for i, block in enumerate(self.layers.self_dec):
            x, layer_cache = block(x, rope, mask, None if caches is None else caches[i])
            grown.append(layer_cache)
        x = self.layers.norm(x)
        k = rearrange(self.layers.to_k(x), "b t (h d) -> b t h d", h=self.config.n_head)  # (B, T, H, D)
        k = apply_rope(k, rope)
        v = rearrange(self.layers.to_v(x), "b t (h d) -> b t h d", h=self.config.n_head)  # (B, T, H, D), not rotated
        k, v = k.transpose(1, 2), v.transpose(1, 2)                       # (B, H, T, D)
        if caches is not None:
            k = torch.cat([caches[-1][0], k], dim=2)                      # (B, H, N+T, D)
            v = torch.cat([caches[-1][1], v], dim=2)                      # (B, H, N+T, D)
        return grown + [(k, v)]

    def guided(self, target_rope, shared_kv, mask=None):
        """Pass 2: one [MASK] query per target position -> logits (B, K, V) for those positions.

        target_rope (B or 1, K, D/2, 2) is the RoPE of the positions to predict; the queries
        themselves all start as the same [MASK] embedding: position is the only thing that differs.

        In the paper, a query's position acts only through RoPE, that is only on *which* keys it
        attends to; the query's own vector never holds it. The `tiny` preset departs from that
        (config.query_position): it adds a learned linear map of the query's RoPE row (the cos and
        sin of its row and column at every frequency) to the [MASK] embedding, so the feed-forward
        layers can use "where am I" directly (class accuracy 21.6% -> 29.0% in an early short run:
        EXPERIMENTS.md).
        """
        k, v = shared_kv                                                  # (B, H, N, D) each
        B, K = k.shape[0], target_rope.shape[1]
        mask_ids = torch.full((B, K), self.mask_id, dtype=torch.long, device=k.device)
        x = self.embeddings(mask_ids)                                     # (B, K, C); no dropout on queries
        if self.query_position is not None:
            x = x + self.query_position(target_rope.flatten(-2).to(x.dtype))  # (B or 1, K, D) -> (B or 1, K, C)
        for block in self.layers.cross_dec:
            x = block(x, target_rope, k, v, mask)
        return self.head(self.norm(x)).float()                            # (B, K, V)

    # --- training: random-order teacher forcing (paper Sec. 3.1, SPEC 5) ---

    def forward(self, tokens, labels, order=None):
        """Teacher-forced logits and loss in a random order.

        tokens (B, L) codes in raster order; labels (B,); order (B, L) 0-based grid positions, a
        permutation per sample (drawn here when None). logits[b, i] predicts tokens[b, order[b, i]].

        Worked example, 4 tokens, order = [2, 0, 3, 1] (positions), c = class token:

            Pass-1 input   c        x[2]     x[0]     x[3]        (x[1] is never an input)
            its RoPE       slot 0   pos 2    pos 0    pos 3
            Pass-2 query   [MASK]   [MASK]   [MASK]   [MASK]
            its RoPE       pos 2    pos 0    pos 3    pos 1       <- "target-aware": where to predict
            predicts       x[2]     x[0]     x[3]     x[1]

        Query i may see keys 0..i (the class token and the i tokens revealed before it), and
        Pass-1 token j sees tokens 0..j: both passes are causal in this order.
        """
        self._check_tokens(tokens, self.config.block_size, "tokens")
        self._check_labels(labels, tokens.shape[0])
        B, L = tokens.shape
        if order is None:
            order = torch.rand(B, L, device=tokens.device).argsort(dim=1)  # one random order per sample
        self._check_order(order, (B, L))

        class_ids = self.class_ids(labels)
        if self.training and self.config.class_dropout_prob > 0:  # drop labels so the model also learns p(x)
            dropped = torch.rand(B, device=tokens.device) < self.config.class_dropout_prob
            class_ids = torch.where(dropped, torch.full_like(class_ids, self.null_class_id), class_ids)

        targets = tokens.gather(1, order)                                 # (B, L) tokens in generation order
        inputs = torch.cat([class_ids[:, None], targets[:, :-1]], dim=1)  # (B, L) class token, then all but the last
        # Slot 0 for the class token, then each input's position + 1 (slot p + 1 is position p).
        input_slots = torch.cat([torch.zeros_like(order[:, :1]), order[:, :-1] + 1], dim=1)  # (B, L)
        input_rope = self.rope[input_slots]                               # (B, L, D/2, 2)
        target_rope = self.rope[order + 1]                                # (B, L, D/2, 2)
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()  # (L, L): i sees 0..i

        shared_kv = self.context(inputs, input_rope, mask=causal)[-1]    # the last entry: the K/V Pass 2 reads
        logits = self.guided(target_rope, shared_kv, mask=causal)         # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    # --- inference: randomized parallel decoding (paper Sec. 3.1, Alg. 1; SPEC 6 and 7) ---
    # inference_mode rather than no_grad: PyTorch then skips its autograd bookkeeping on every
    # operation, which at the `tiny` size on a CPU is 5-11% of a sampling call (batch 16 / 64,
    # either path). The tokens it returns are for reading: they cannot be saved for a backward.

    @torch.inference_mode()
    @in_eval_mode
    def generate(self, labels, steps=None, cfg_scale=SAMPLING_DEFAULTS["cfg_scale"],
                 cfg_schedule=SAMPLING_DEFAULTS["cfg_schedule"], schedule=SAMPLING_DEFAULTS["schedule"],
                 temperature=1.0, top_k=0, top_p=SAMPLING_DEFAULTS["top_p"], order=None, generator=None,
                 known_tokens=None, known_mask=None, grid=None, fast=False, compile=False):
        """Sample image tokens (B, rows*cols) in raster order for class labels (B,).

        steps: decoding steps S (default 32, or one per token when fewer are to be decoded);
        cfg_scale: guidance g (1 = no guidance, and no doubled batch); cfg_schedule "linear" ramps
        guidance from 1 to g as the canvas fills, "constant" keeps g; schedule "arccos" or "cosine"
        says how many tokens each step reveals; temperature, top_k, top_p shape the sampling
        distribution; order: the 0-based generation order (a permutation of all positions, shared
        by the batch; random when None); generator: a torch.Generator for reproducible orders and
        samples; grid: (rows, cols) to decode, default the training grid, larger for outpainting
        or resolution expansion (the RoPE table is rebuilt for it).

        Zero-shot editing (SPEC 7): known_tokens (B, rows*cols) with known_mask (B, rows*cols)
        True where a token is given. Pass 1 is prefilled with the class token and every known
        token (each at its own position, causally in the sequence `order` gives them), then only
        the unknown positions are decoded, in `order` with the known positions skipped. Known
        tokens come back unchanged.

        fast=True runs the same loop on preallocated caches (`StaticCachePasses`, below): the same
        tokens, faster; compile=True (with fast=True) also compiles its steps (worth it on GPUs
        for long runs).
        """
        rows, cols = grid or (self.config.grid_size,) * 2
        L = rows * cols
        device = self.embeddings.weight.device
        self._check_labels(labels, None)
        B = labels.shape[0]
        check_decoding(schedule, cfg_schedule, temperature, top_k, top_p, cfg_scale)
        if compile and not fast:
            raise ValueError("compile=True compiles the fast path's steps: pass fast=True too")
        if generator is not None and generator.device.type != device.type:  # it draws the order and the samples
            raise ValueError(f"the generator is on {generator.device.type}, the model on {device.type}: make it with "
                             f"torch.Generator({device.type!r})")
        rope = self.rope_table(rows, cols)                                # (1 + L, D/2, 2)

        # 1. Which positions are given, which to decode, and in what order.
        known_mask = self._check_known(known_tokens, known_mask, B, L)
        if order is None:
            noise = torch.rand(L, generator=generator, device=generator.device if generator else "cpu")
            order = noise.argsort()                                       # (L,)
        self._check_order(order, (L,))
        order = order.to(device)
        unknown_order = order                                             # (U,) in generation order
        if known_mask is not None:
            is_known = known_mask[0][order]                               # (L,) in generation order
            unknown_order = order[~is_known]
        U = unknown_order.numel()
        steps = default_steps(U) if steps is None else steps
        if not 1 <= steps <= U:
            raise ValueError(f"steps must be between 1 and the {U} tokens to decode, got {steps}")

        # 2. The first Pass-1 input: the class token (RoPE slot 0), then any known tokens.
        use_cfg = cfg_scale != 1.0
        class_ids = self.class_ids(labels.to(device))[:, None]           # (B, 1)
        tokens = torch.zeros(B, L, dtype=torch.long, device=device)
        feed_ids, feed_slots = class_ids, torch.zeros(1, dtype=torch.long, device=device)
        prefill_mask = None
        if known_mask is not None:
            known_pos = order[is_known]                                   # (L - U,) in generation order
            tokens[:, known_pos] = known_tokens.to(device)[:, known_pos]  # (B, L - U) written
            feed_ids = torch.cat([class_ids, tokens[:, known_pos]], dim=1)  # (B, 1 + L - U)
            feed_slots = torch.cat([feed_slots, known_pos + 1])          # (1 + L - U,)
            # The known tokens are read as if they had been generated first, one by one in `order`:
            # causally, exactly as in training. Read all at once with no mask (as the decoding steps
            # are), each would see tokens it never saw in training: given 32 of their 64 tokens, a
            # default-run `tiny` model's completions of real images kept their class 76.9% of the
            # time, against 95.0% with this mask (README, zero-shot editing).
            T = len(feed_slots)                                           # the class token and the known tokens
            prefill_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T): each sees those before it
        if use_cfg:  # the unconditional half: null class, same revealed tokens
            feed_ids = torch.cat([feed_ids, feed_ids], dim=0)             # (2B, T)
            feed_ids[B:, 0] = self.null_class_id

        counts = reveal_counts(U, steps, schedule)                        # tokens per step (schedules.py)
        if fast:  # caches for every token Pass 1 reads: all but the last step's, which are never fed back
            passes = StaticCachePasses(self, len(feed_ids), feed_ids.shape[1] + U - counts[-1], compile)
            rope = passes.rope_rows(rope)  # its RoPE rows: made once, then gathered by slot as the table's are
        else:
            passes = self
        caches, decoded = None, 0
        for n_reveal in counts:
            # 3. Pass 1 reads only what is new; no mask (after the prefill): tokens fed together see each other.
            feed_rope = rope[feed_slots][None]                            # (1, T, D/2, 2); fast: (1, T, 2D (+ C))
            caches = passes.context(feed_ids, feed_rope, mask=prefill_mask, caches=caches)
            prefill_mask = None
            # 4. Pass 2: one [MASK] query per target, rotated by the target's position.
            target_pos = unknown_order[decoded:decoded + n_reveal]       # (K,)
            logits = passes.guided(rope[target_pos + 1][None], caches[-1])  # (B or 2B, K, V)
            decoded += n_reveal
            # 5. Classifier-free guidance, scaled by how much of the canvas is known after this step
            #    (the official loop uses decoded / L; known tokens count as filled when editing).
            if use_cfg:
                filled = (L - U + decoded) / L
                logits = guide(logits, CFG_SCHEDULES[cfg_schedule](cfg_scale, filled))  # (B, K, V)
            # 6. Sample, and write the new tokens to their grid positions.
            new_tokens = sample_tokens(logits, temperature, top_k, top_p, generator)  # (B, K), drawn in float32
            del logits  # not held through the next step's passes
            tokens[:, target_pos] = new_tokens                          # (B, K) written
            # 7. They are next step's Pass-1 input (both halves with guidance).
            feed_ids = torch.cat([new_tokens, new_tokens]) if use_cfg else new_tokens  # (2B or B, K)
            feed_slots = target_pos + 1
        return tokens

    # --- loading released and trained weights ---

    @classmethod
    def from_checkpoint(cls, path_or_state, config=None):
        """Load an official ARPG file or one of ours, strictly. The config is the argument, else
        the one saved in the checkpoint (ours), else inferred from the weight shapes (official)."""
        checkpoint = read_checkpoint(path_or_state)
        state = unwrap_state_dict(checkpoint)
        missing = [key for key in ("embeddings.weight", "head.weight") if key not in state]
        if missing:  # both: another kind of checkpoint; one: a damaged or edited ARPG file
            raise ValueError(f"checkpoint holds no ARPG weights (no {' / '.join(missing)})"
                             + ("; is it a tokenizer checkpoint?" if len(missing) == 2 else ""))
        if config is None:
            saved = checkpoint.get("config")
            config = config_from_dict(ARPGConfig, saved, "ARPG checkpoint") if isinstance(saved, dict) \
                else infer_config(state)
        model = cls(config)
        load_strict(model, state, "ARPG checkpoint")
        return model

    # --- input checks: one clear message instead of an index error deep inside ---
    # Shapes are always checked. Values (a min, a max, a sort) are not while torch.compile traces:
    # reading them on the host splits the compiled graph (a training step became 7 graphs) and, on a
    # GPU, waits for the device. Compiled training checks its codes as it reads them (train.py).

    @staticmethod
    def _check_integers(tensor, name):
        if tensor.dtype != torch.long:  # they index embeddings and targets; a uint8 label + offset would wrap
            raise ValueError(f"{name} must be integers (torch.long), got {tensor.dtype}")

    def _check_tokens(self, tokens, length, name):
        self._check_integers(tokens, name)
        if tokens.dim() != 2 or tokens.shape[1] != length:
            raise ValueError(f"{name} must have shape (batch, {length}), got {tuple(tokens.shape)}")
        if torch.compiler.is_compiling():
            return
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"{name} must be codes in [0, {self.config.vocab_size}), "
                             f"got values in [{tokens.min().item()}, {tokens.max().item()}]")

    def _check_labels(self, labels, batch):
        self._check_integers(labels, "labels")
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
            raise ValueError(f"labels must have shape ({batch or 'batch'},), got {tuple(labels.shape)}")
        if torch.compiler.is_compiling():
            return
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.num_classes):
            raise ValueError(f"class ids must be in [0, {self.config.num_classes}), "
                             f"got {sorted(set(labels.tolist()))}")

    @staticmethod
    def _check_order(order, shape):
        if order.dtype != torch.long:                                     # it indexes and gathers
            raise ValueError(f"order must be a torch.long tensor (as argsort and randperm give), got {order.dtype}")
        if tuple(order.shape) == shape and torch.compiler.is_compiling():
            return
        expected = torch.arange(shape[-1], device=order.device)
        if tuple(order.shape) != shape or not (order.sort(dim=-1).values == expected).all():
            raise ValueError(f"order must be a permutation of the {shape[-1]} grid positions with shape {shape}")

    def _check_known(self, known_tokens, known_mask, batch, length):
        if known_tokens is None and known_mask is None:
            return None
        if known_tokens is None or known_mask is None:
            raise ValueError("known_tokens and known_mask go together: give both or neither")
        for name, given in (("known_tokens", known_tokens), ("known_mask", known_mask)):
            if tuple(given.shape) != (batch, length):
                raise ValueError(f"{name} must have shape ({batch}, {length}), got {tuple(given.shape)}")
        known_mask = known_mask.bool().to(self.embeddings.weight.device)
        # One mask for the whole batch keeps every row's Pass-1 cache the same length.
        if not (known_mask == known_mask[:1]).all():
            raise ValueError("known_mask must be the same for every row; edit different masks in separate calls")
        self._check_tokens(known_tokens.masked_fill(~known_mask.to(known_tokens.device), 0), length, "known_tokens")
        return known_mask


# -----------------------------------------------------------------------------
# The fast decoding path: the same tokens, less overhead (used by `generate(fast=True)`)
#
# The readable loop above stays the reference. `StaticCachePasses` gives it a drop-in replacement
# for `context` and `guided` that computes the same numbers, up to float rounding (in float32 the
# logits agree to ~1e-6 and the sampled tokens are the same (tests/test_arpg.py) except where a
# draw falls that close to the edge between two codes, a rare event over millions of draws), with
# changes that only save time:
#   1. Preallocated caches. Every cache is one (2, batch, H, capacity, D) buffer allocated once;
#      each step writes its new keys/values in place by index. Growing caches with torch.cat (as
#      the official sampler does) copies the whole cache every step, and holds the old and the new
#      copy at once. The capacity leaves out the last step's tokens, which Pass 1 never reads.
#   2. Fewer, larger operations. On a CPU, each Pass-1 layer's q/k/v, the shared k/v and each
#      SwiGLU's w1/w3 run as one matrix multiply each (`FUSED_WEIGHTS_ON`); RoPE is
#      x * cos + swap(x) * sin with tables built once per call (`rope_rows`, `rotate`), as is each
#      target slot's query-position offset; attention is the readable path's (`attend`); and
#      the code is plain functions of weight tensors, not module calls.
#      At the `tiny` size on a CPU, a decoding call is ~30,000 small operations whose Python and
#      dispatch overhead costs about as much as the arithmetic, so their number is what this path cuts.
#   3. Optionally compiled steps (torch.compile with dynamic shapes: one set of graphs serves
#      every step size, `compile_for_any_size`): fewer kernel launches, which is what limits
#      small batches on GPUs. Compiling takes minutes, so it pays off for long runs (FID), not
#      for one grid.
# `context` returns views of the filled part of each buffer: exactly what the readable caches hold.

# Where the fast path multiplies by q|k|v, k|v and w1|w3 concatenated, one matrix each, rather
# than by their parts. The concatenated copies are made for each call (keeping them between calls
# would need their invalidation whenever the model's weights change), so they count in its peak
# memory. On a CPU they pay: at `tiny` a fast call took 158 ms with them, 180 ms without (medians of
# 30 alternating calls, 16 images, 32 steps). On a GPU they would add 0.36 GB to ARPG-L's bf16
# peak (weights 0.64 GB, caches 1.48 GB at 32 steps, batch 64) against a 2.6 GB target (the paper
# measured 2.64-2.78 GB), to save kernel launches that compiled steps make cheap: there the parts
# stay apart (what that does to a GPU's speed is not measured yet).
FUSED_WEIGHTS_ON = ("cpu",)


def project(x, weight):
    """F.linear(x, weight) for a weight of `StaticCachePasses`: one concatenated matrix (on the
    devices of FUSED_WEIGHTS_ON), or a tuple of its parts (elsewhere), multiplied one by one and
    their outputs put side by side as the matrix's."""
    if isinstance(weight, tuple):
        return torch.cat([F.linear(x, part) for part in weight], dim=-1)
    return F.linear(x, weight)


def compile_for_any_size(step):
    """torch.compile(step) with every size of its inputs symbolic, each with a symbol of its own.
    By default dynamo gives sizes that happen to be equal one symbol ("duck shaping") and traces
    again when they part: a first batch of as many rows as the model is wide (64 images with
    guidance for `tiny`) held the batch to the width, and sizes equal at one step and not at the
    next got graphs of their own, up to dynamo's limit of 8 per function, past which it runs
    eagerly. With duck shaping off, a process traces each step's few graphs once (sizes 0 and 1 are
    still traced apart from the rest), whatever the batches and step counts that follow."""
    compiled = torch.compile(step, dynamic=True)

    def run(*args):
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(*args)
    return run


# RoPE for the fast path: the rotation as two multiply-adds against tables built once per call.

def rotation_tables(rope):
    """RoPE rows (..., D/2, 2) as two (..., D) tables for `rotate`: cos per channel, and sin with
    the sign of each channel's partner: -sin on even channels, +sin on odd ones."""
    cos, sin = rope.unbind(-1)                                            # (..., D/2) each
    return torch.stack([cos, cos], dim=-1).flatten(-2), torch.stack([-sin, sin], dim=-1).flatten(-2)


def rotate(x, cos, sin):
    """apply_rope with fewer operations, same numbers: (even, odd) -> (even*cos - odd*sin,
    odd*cos + even*sin) as x * cos + (x with each pair swapped) * signed sin. x (..., D)."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)             # (odd, even) per pair
    return (x32 * cos + swapped * sin).type_as(x)


class StaticCachePasses:
    """The fast path's `context` and `guided` for one decoding call: preallocated caches, joined
    weights and plain-function (optionally compiled) steps, as this section's opening comment describes."""

    def __init__(self, model: "ARPG", batch: int, capacity: int, compile: bool = False):
        config, layers = model.config, model.layers
        self.n_head, self.eps = config.n_head, config.norm_eps
        self.head_dim = config.dim // config.n_head                      # D
        self.embeddings = model.embeddings.weight                         # (V + classes + 3, C)
        self.mask_embedding = model.embeddings.weight[model.mask_id]     # (C,): every Pass-2 query starts here
        self.query_position = None if model.query_position is None else model.query_position.weight  # (C, D)
        # Projections that share an input are joined: one concatenated matrix on the devices of
        # FUSED_WEIGHTS_ON, a tuple of the parts elsewhere (`project` multiplies by either).
        join = torch.cat if self.embeddings.device.type in FUSED_WEIGHTS_ON else tuple
        # Per block: (attention norm, q|k|v or q projection, output projection, FFN norm, w1|w3, w2)
        self.context_blocks = [(b.attn_norm.weight, join([b.attn.to_q.weight, b.attn.to_k.weight, b.attn.to_v.weight]),
                                b.attn.proj.weight, b.ffn_norm.weight, join([b.ffn.w1.weight, b.ffn.w3.weight]),
                                b.ffn.w2.weight) for b in layers.self_dec]  # q|k|v: (3C, C), or its three (C, C) parts
        self.guided_blocks = [(b.attn_norm.weight, b.attn.to_q.weight, b.attn.proj.weight, b.ffn_norm.weight,
                               join([b.ffn.w1.weight, b.ffn.w3.weight]), b.ffn.w2.weight) for b in layers.cross_dec]
        self.shared_kv = (layers.norm.weight, join([layers.to_k.weight, layers.to_v.weight]))  # k|v: (2C, C), or parts
        self.head = (model.norm.weight, model.head.weight)
        shape = (2, batch, config.n_head, capacity, self.head_dim)        # (k|v, B, H, N, D)
        self.buffers = [self.embeddings.new_empty(shape) for _ in range(len(layers.self_dec) + 1)]  # + shared KV
        self.filled = 0                                                   # cache positions written so far
        # The steps are kept as plain functions, called with self: a bound method stored on self
        # is a reference cycle, and every call's caches would outlive it until Python's cycle
        # collector ran (on a GPU, gigabytes per call at the ARPG-L size).
        steps = (StaticCachePasses._context_step, StaticCachePasses._guided)
        self.steps = tuple(compile_for_any_size(step) for step in steps) if compile else steps

    def rope_rows(self, rope):
        """The RoPE table (1 + L, D/2, 2) as this path's rows, one per slot: the cos and signed sin
        tables of `rotate` (D each) and, where the model has query positions, the offset they add
        to a query at that slot (C), all computed once per call instead of at every step."""
        cos, sin = rotation_tables(rope)                                  # (1 + L, D) each
        if self.query_position is None:
            return torch.cat([cos, sin], dim=-1)
        offset = F.linear(rope.flatten(-2).to(self.query_position.dtype), self.query_position)  # (1 + L, C)
        return torch.cat([cos, sin, offset.to(cos.dtype)], dim=-1)

    def context(self, ids, rope, mask=None, caches=None):
        """ARPG.context's signature and result, with `rope_rows` for the RoPE rows. The caches live
        in self.buffers; the `caches` argument only says whether this is a new batch's first call
        (None) or a later one."""
        if caches is None:                                                # a new batch of images starts
            self.filled = 0
        self.steps[0](self, ids, rope, self.filled, mask)
        self.filled += ids.shape[1]
        return [(buffer[0, :, :, :self.filled], buffer[1, :, :, :self.filled]) for buffer in self.buffers]

    def guided(self, target_rope, shared_kv):
        """ARPG.guided's result (`_guided`) for ARPG.guided's arguments less `mask` (decoding never
        passes one), with `rope_rows` for the RoPE rows, in the head's dtype (ARPG.guided returns
        float32)."""
        return self.steps[1](self, target_rope, shared_kv)

    def _norm(self, x, weight):
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _feed_forward(self, x, norm_weight, w13, w2):
        """SwiGLU of the normed x, (B, *, C) -> (B, *, C); the caller adds the residual."""
        gate, up = project(self._norm(x, norm_weight), w13).chunk(2, dim=-1)  # (B, *, hidden) each
        return F.linear(F.silu(gate) * up, w2)

    def _context_step(self, ids, rope, start, mask=None):
        """Pass 1 for T new tokens, written into the caches at [start, start + T): ARPG.context in place.
        mask: None, or (T, start + T) bool, True = may attend (the causal prefill of known tokens)."""
        x = F.embedding(ids, self.embeddings)                             # (B, T, C)
        B, T, C = x.shape
        end = start + T
        D = self.head_dim
        cos, sin = rope[:, :, None, None, :D], rope[:, :, None, None, D:2 * D]  # (1, T, 1, 1, D) each
        for (attn_norm, qkv_weight, proj, ffn_norm, w13, w2), cache in zip(self.context_blocks, self.buffers):
            qkv = project(self._norm(x, attn_norm), qkv_weight).view(B, T, 3, self.n_head, -1)  # (B, T, 3, H, D)
            q, k = rotate(qkv[:, :, :2], cos, sin).transpose(1, 3).unbind(2)  # (B, H, T, D) each
            cache[0, :, :, start:end] = k                                # (B, H, T, D) into (B, H, N, D)
            cache[1, :, :, start:end] = qkv[:, :, 2].transpose(1, 2)
            out = attend(q, cache[0, :, :, :end], cache[1, :, :, :end], mask, 0.0)  # (B, T, C)
            x = x + F.linear(out, proj)
            x = x + self._feed_forward(x, ffn_norm, w13, w2)
        k, v = project(self._norm(x, self.shared_kv[0]), self.shared_kv[1]).view(B, T, 2, self.n_head, -1).unbind(2)
        # k, v (B, T, H, D) each, written as (B, H, T, D) into the shared cache
        self.buffers[-1][0, :, :, start:end] = rotate(k, cos[:, :, 0], sin[:, :, 0]).transpose(1, 2)
        self.buffers[-1][1, :, :, start:end] = v.transpose(1, 2)

    def _guided(self, target_rope, shared_kv):
        """Pass 2: ARPG.guided on the flat weights, without a mask (decoding never has one)."""
        k, v = shared_kv                                                  # (B, H, N, D) each
        B, K, C = k.shape[0], target_rope.shape[1], self.mask_embedding.shape[0]
        D = self.head_dim
        cos, sin = target_rope[:, :, None, :D], target_rope[:, :, None, D:2 * D]  # (1, K, 1, D) each
        x = self.mask_embedding.expand(B, K, C)                           # (B, K, C)
        if self.query_position is not None:
            x = x + target_rope[:, :, 2 * D:].to(x.dtype)                 # + the slots' offsets (1, K, C), every row
        for attn_norm, q_weight, proj, ffn_norm, w13, w2 in self.guided_blocks:
            q = F.linear(self._norm(x, attn_norm), q_weight).view(B, K, self.n_head, -1)  # (B, K, H, D)
            q = rotate(q, cos, sin)
            out = attend(q.transpose(1, 2), k, v, None, 0.0)             # (B, K, C)
            x = x + F.linear(out, proj)
            x = x + self._feed_forward(x, ffn_norm, w13, w2)
        # Not widened here: guide widens bf16 logits as it reads them (on a GPU), with no float32
        # copy of both halves.
        return F.linear(self._norm(x, self.head[0]), self.head[1])        # (B, K, V) in the head's dtype


# -----------------------------------------------------------------------------
# Checkpoints: official files and ours (SPEC 8). Always `weights_only=True`: a checkpoint is
# data, and loading one must never run pickled code. Loading is strict: a key that is missing,
# unexpected or of the wrong shape is an error that names it, never a silent skip.

def read_checkpoint(path_or_state):
    """A checkpoint as a dict: from a path (read safely) or an already loaded dict."""
    if isinstance(path_or_state, dict):
        return path_or_state
    if os.path.isdir(path_or_state):
        raise ValueError(f"{path_or_state} is a folder; give the checkpoint file in it")
    if not os.path.isfile(path_or_state):
        raise FileNotFoundError(f"checkpoint not found: {path_or_state}")
    try:
        # The official training script saves its argparse arguments beside the weights (SPEC 8). A
        # Namespace is a bag of attributes: unpickling one sets them and runs no code, so it is allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path_or_state, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; say what to do instead
        # PyTorch's message for a pickled object is a page that tells how to run its code anyway
        pickled_object = re.search(r"GLOBAL (\S+)", str(error))        # e.g. "GLOBAL __main__.Config"
        if pickled_object:
            raise ValueError(f"cannot read {path_or_state}: it holds a pickled {pickled_object[1]}, and checkpoints "
                             f"are read weights-only, never running pickled code; re-save it as a dict of tensors "
                             f"and plain Python values") from None
        raise ValueError(f"cannot read {path_or_state} ({type(error).__name__}): is it a PyTorch checkpoint?") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path_or_state} holds a {type(checkpoint).__name__}, not a checkpoint's dict of weights")
    return checkpoint


def config_from_dict(config_class, saved, what="checkpoint"):
    """config_class(**saved), refused in one line when the checkpoint names settings this code does
    not have (it was written by another version of it) instead of a TypeError."""
    unknown = sorted(set(saved) - {field.name for field in fields(config_class)})
    if unknown:
        raise ValueError(f"{what} has settings this version of the code does not know ({', '.join(unknown)}): "
                         f"it was written by another version; load it with that one")
    return config_class(**saved)


def unwrap_state_dict(checkpoint):
    """The state dict inside a checkpoint: under 'state_dict' (released files), 'model' (official
    training script, and ours), 'module' (DeepSpeed), or the dict itself. The 'module.' prefix
    of DistributedDataParallel and the '_orig_mod.' prefix of torch.compile are removed."""
    for key in ("state_dict", "model", "module"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return strip_wrapper_prefixes({k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)})


def strip_wrapper_prefixes(state):
    """The state dict's keys without the prefixes its wrappers added, however they were nested
    (torch.compile of a DDP model saves '_orig_mod.module.embeddings.weight')."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            return strip_wrapper_prefixes({k[len(prefix):]: v for k, v in state.items()})
    return state


def load_strict(module, state, what="checkpoint"):
    """load_state_dict that reports every missing, unexpected or misshapen key in one error."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                 for k in sorted(own.keys() & state.keys()) if own[k].shape != state[k].shape]
    if missing or unexpected or misshapen:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = [f"{name}: {show(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if keys]
        raise ValueError(f"{what} does not match the model; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    with atomic_output(path, ".pt") as tmp:
        torch.save(obj, tmp)


def infer_config(state) -> ARPGConfig:
    """Recognise a released model (L, XL, XXL or any width they share) from its weight shapes.

    The heads and the grid are not visible in the weights: the head count comes from the preset
    of the same width, the grid is the released 16 x 16.
    """
    n_rows, dim = state["embeddings.weight"].shape
    vocab_size = state["head.weight"].shape[0]
    context, guided = (len({k.split(".")[2] for k in state if k.startswith(f"layers.{name}.")})
                       for name in ("self_dec", "cross_dec"))  # blocks per pass
    heads = {preset.dim: preset.n_head for preset in ARPG_PRESETS.values()}
    if dim not in heads:
        raise ValueError(f"cannot infer the head count of a model of width {dim} (the presets' widths are "
                         f"{', '.join(str(w) for w in heads)}): load it in Python with "
                         f"ARPG.from_checkpoint(path, config=ARPGConfig(...))")
    return replace(ARPG_PRESETS["L"], dim=dim, n_layer=context + guided, n_head=heads[dim], vocab_size=vocab_size,
                   pass1_layers=None if context == guided else context, num_classes=n_rows - vocab_size - 3)


# -----------------------------------------------------------------------------
# The device check the scripts share (train, sample, bench, tokenizer)

def check_device(name):
    """Refuse, in one line, a --device this PyTorch cannot run on (the scripts' shared check)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this PyTorch sees no CUDA GPU (a CPU-only build, or no driver); "
                         f"use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: no such GPU; this machine has {torch.cuda.device_count()}, numbered "
                         f"from cuda:0")
