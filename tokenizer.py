"""
The image tokenizer: LlamaGen's VQ-16, rebuilt, loadable from `vq_ds16_c2i.pt`, and trainable on a CPU.

ARPG never sees pixels. A VQ tokenizer (SPEC 8; LlamaGen, Sun et al. 2024, which
follows VQGAN, Esser et al. 2021) turns an image into a grid of integers, ARPG models that grid,
and the same tokenizer turns generated grids back into pixels:

    image (B, 3, H, W) in [-1, 1] --encoder--> (B, z, h, w) --1x1 conv--> (B, d, h, w)
        --nearest l2-normalised code--> codes (B, h, w) in [0, V)
    codes --codebook lookup--> (B, d, h, w) --1x1 conv--> (B, z, h, w) --decoder--> image

with h = H / f, w = W / f for the downsampling factor f = 2 ** (len(ch_mult) - 1) (16 for VQ-16:
256x256 -> 16x16 = 256 tokens; 8 for the small preset: 64x64 -> 8x8 = 64 tokens).

This file, top to bottom: config and presets -> uint8 <-> [-1, 1] helpers -> conv building blocks
-> encoder / decoder -> vector quantizer -> VQModel -> training (the small tokenizer, on a CPU) ->
image folders (pre-tokenized for ARPG, or read to train the tokenizer on) -> command line.

Use it:
    from tokenizer import VQModel, images_to_tensor, tensor_to_images
    vq = VQModel.from_checkpoint("vq_ds16_c2i.pt").eval()      # LlamaGen's VQ-16
    codes = vq.encode(images_to_tensor(uint8_images))          # (B, 16, 16) int64
    pixels = tensor_to_images(vq.decode(codes))                # uint8 (B, 256, 256, 3)

Pre-tokenize ImageNet-style folders (one subfolder per class) for ARPG training:
    python tokenizer.py --tokenize /data/imagenet/train --out /data/imagenet_codes \\
        --vq-ckpt vq_ds16_c2i.pt --image-size 256 --batch-size 64 --device cuda
    python tokenizer.py --tokenize my_images --out my_codes --vq-ckpt out/tokenizer.pt --image-size 64

The small tokenizer for the built-in dataset is trained by `train_tokenizer`, which the
training script calls (CPU: 900 steps, at most 2.5 minutes on 2 cores in a timed run). For your
own small images, train it on them first, then ARPG on the same folder:
    python tokenizer.py --train my_images --out out/my_tokenizer.pt      # 64x64 crops, 1200 steps
    python train.py --data my_images --tokenizer out/my_tokenizer.pt --out out/my_arpg.pt
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from arpg import check_device, config_from_dict, load_strict, read_checkpoint, save_atomic, unwrap_state_dict
from data import beside, check_output_path, read_image, run_script, save_image_grid
from muon import Muon

# -----------------------------------------------------------------------------
# Config and presets


@dataclass
class VQConfig:
    codebook_size: int = 16384        # V: number of codes (ARPG's vocab_size)
    codebook_embed_dim: int = 8       # d: dimension of a code (tiny on purpose: LlamaGen found it raises usage)
    codebook_l2_norm: bool = True     # l2-normalise latents and codes before the nearest-neighbour search
    z_channels: int = 256             # channels of the encoder output / decoder input, around the 1x1 convs
    ch: int = 128                     # base channels; level i of the encoder has ch * ch_mult[i]
    ch_mult: tuple = (1, 1, 2, 2, 4)  # one entry per resolution level; len - 1 = number of 2x downsamplings
    encoder_num_res_blocks: int = 2   # residual blocks per encoder level
    decoder_num_res_blocks: int = 3   # residual blocks per decoder level
    dropout: float = 0.0              # dropout inside residual blocks (0 in LlamaGen's released model)
    norm_groups: int = 32             # GroupNorm groups (32 in LlamaGen); must divide every width ch * m
    local_codes: bool = False         # encode every f x f patch on its own, so a code depends on its patch only

    def __post_init__(self):
        # JSON gives lists; a tuple keeps the config equal to itself after a round trip.
        self.ch_mult = tuple(self.ch_mult)

    @property
    def downsample(self):
        """f: pixels per token along each side (one 2x downsampling per level after the first)."""
        return 2 ** (len(self.ch_mult) - 1)


VQ_PRESETS = {
    # LlamaGen's VQ-16 (vq_ds16_c2i.pt): 71,883,403 parameters, 16x downsampling.
    "VQ-16": VQConfig(),
    # For the built-in 64x64 shapes: 8x downsampling (8x8 tokens), 128 codes. 700,955 parameters.
    # Local codes: with a whole-image encoder, the code of a flat background patch also carries
    # where a nearby edge runs (a side channel that raises PSNR), so one background colour got
    # spread over ~160 codes, all of which ARPG then has to learn to predict. Encoding
    # every patch on its own gives one code per flat colour and keeps the codes easy to model;
    # the decoder still sees the whole grid.
    # 128 codes, not more: with 512, an edge patch's code changed with sub-pixel shifts of the
    # edge (20 near-identical circles got 5.6 different codes per position), which ARPG cannot
    # predict. 128 codes are coarser per patch, and the decoder, which sees the neighbours,
    # places the edges: held-out PSNR 24.0 -> 25.4 dB at the same 800 steps (32 codes: 22.5 dB).
    "small": VQConfig(codebook_size=128, codebook_embed_dim=8, z_channels=64, ch=16, ch_mult=(1, 1, 2, 4),
                      encoder_num_res_blocks=1, decoder_num_res_blocks=1, norm_groups=4, local_codes=True),
}


# -----------------------------------------------------------------------------
# uint8 images <-> tensors in [-1, 1]

def images_to_tensor(images):
    """uint8 images (B, H, W, 3), numpy or torch -> float32 tensor (B, 3, H, W) in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.array(images))  # a copy: arrays from PIL are read-only
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return rearrange(images, "b h w c -> b c h w").float() / 127.5 - 1.0


def tensor_to_images(tensor):
    """Tensor (B, 3, H, W) in [-1, 1] -> uint8 numpy (B, H, W, 3), by clamp(127.5 x + 128, 0, 255) (SPEC 8).

    The +128 (not +127.5) followed by truncation rounds to the nearest level, so
    tensor_to_images(images_to_tensor(u)) == u exactly.
    """
    pixels = (127.5 * tensor.detach().float() + 128.0).clamp(0, 255).to(torch.uint8)
    return rearrange(pixels, "b c h w -> b h w c").cpu().numpy()


# -----------------------------------------------------------------------------
# Building blocks (VQGAN / LlamaGen layout: GroupNorm(32, eps 1e-6), swish, 3x3 convs)

class Conv2d(nn.Conv2d):
    """nn.Conv2d, the same weights and results, with a shortcut for 1x1 feature maps.

    The local encoder (`VQModel.encode_latents`) brings every 8x8 patch down to a 1x1 map, and
    its last blocks run there. A k x k conv with 'same' zero padding sees a 1x1 input only
    through its centre tap (every other tap falls on padding), so it is exactly a linear map
    with the centre tap's (out, in) matrix; the other taps get zero gradients either way. The
    library's conv kernels are slow on such maps (on a 2-core AVX2 CPU a 3x3 conv's backward took
    ~10 ms for what is a (1024, 64) x (64, 64) product): the small tokenizer's training step went
    from 333 to 230 ms (EXPERIMENTS.md). An ONNX export (a trace) records the plain convolution:
    the same numbers, and no test of the map's size frozen into the graph.
    """

    def forward(self, x):
        k_h, k_w = self.kernel_size
        odd = k_h % 2 and k_w % 2                                         # an even kernel would grow the map
        if (not torch.jit.is_tracing() and x.shape[-2:] == (1, 1) and self.stride == (1, 1) and odd
                and self.dilation == (1, 1) and self.groups == 1 and self.padding == (k_h // 2, k_w // 2)
                and self.padding_mode == "zeros"):
            centre = self.weight[:, :, k_h // 2, k_w // 2]                  # (out, in)
            return F.linear(x.flatten(1), centre, self.bias)[:, :, None, None]
        return super().forward(x)


def group_norm(channels, cfg: VQConfig):
    return nn.GroupNorm(num_groups=cfg.norm_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv -> norm -> swish -> dropout -> conv, plus a (1x1-projected) shortcut."""

    def __init__(self, in_channels, out_channels, cfg: VQConfig):
        super().__init__()
        self.norm1 = group_norm(in_channels, cfg)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 conv on the shortcut only when the channel count changes (named as in LlamaGen).
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):  # (B, Cin, h, w) -> (B, Cout, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1 convs as projections."""

    def __init__(self, channels, cfg: VQConfig):
        super().__init__()
        self.norm = group_norm(channels, cfg)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x):  # (B, C, h, w)
        B, C, h, w = x.shape
        y = self.norm(x)
        q, k, v = (rearrange(proj(y), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))  # (B, 1, h*w, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, C), softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv. The zero padding is asymmetric (right and
    bottom only), as in VQGAN/LlamaGen: with it the output grid aligns with the input's top-left
    corner. The released weights were trained this way."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, h, w) -> (B, C, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks (each followed by attention at the lowest resolution),
    then an optional resampling. Submodule names `res`, `attn`, `downsample`/`upsample` are the
    checkpoint's."""

    def __init__(self, in_channels, out_channels, n_blocks, with_attention, resample, cfg: VQConfig):
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, cfg) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels, cfg) for _ in range(n_blocks)) if with_attention else None
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def forward(self, x):
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn is not None:
                x = self.attn[i](x)
        for resample in (self.downsample, self.upsample):  # at most one of them exists
            if resample is not None:
                x = resample(x)
        return x


def middle(channels, cfg: VQConfig):
    """The bottleneck of both encoder and decoder: residual block, attention, residual block."""
    return nn.ModuleList([ResnetBlock(channels, channels, cfg), AttnBlock(channels, cfg),
                          ResnetBlock(channels, channels, cfg)])


# -----------------------------------------------------------------------------
# Encoder and decoder

class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/f, W/f). Levels go from fine to coarse; every level but
    the last halves the resolution; attention only at the last (coarsest) level."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(cfg.ch if i == 0 else widths[i - 1], widths[i], cfg.encoder_num_res_blocks,
                  with_attention=(i == n_levels - 1), resample="down" if i < n_levels - 1 else None,
                  cfg=cfg)
            for i in range(n_levels))
        self.mid = middle(widths[-1], cfg)
        self.norm_out = group_norm(widths[-1], cfg)
        self.conv_out = Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)                 # (B, ch, H, W)
        for level in self.conv_blocks:
            h = level(h)                    # ... -> (B, ch * ch_mult[-1], H/f, W/f)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f): the encoder mirrored. Levels go from coarse to
    fine; attention only at the first (coarsest) level; every level but the last doubles the
    resolution. The output is NOT squashed (no tanh), as in LlamaGen: it may leave [-1, 1]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # coarse to fine
        self.conv_in = Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = middle(widths[0], cfg)
        self.conv_blocks = nn.ModuleList(
            Level(widths[0] if i == 0 else widths[i - 1], widths[i], cfg.decoder_num_res_blocks,
                  with_attention=(i == 0), resample="up" if i < n_levels - 1 else None, cfg=cfg)
            for i in range(n_levels))
        self.norm_out = group_norm(widths[-1], cfg)
        self.conv_out = Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)                 # (B, ch * ch_mult[-1], h, w)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)                    # ... -> (B, ch, h*f, w*f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, h*f, w*f)


# -----------------------------------------------------------------------------
# Vector quantizer with l2-normalised codes (SPEC 8)

USAGE_WINDOW = 65536  # the `codebook_used` buffer: the codes of the last 65536 latents seen in training


class VectorQuantizer(nn.Module):
    """Nearest-code lookup. With `codebook_l2_norm` both the latent and every code are projected
    onto the unit sphere first, so "nearest" means largest cosine similarity: no code can win by
    being long, which keeps many codes in use (LlamaGen, Sec. 2.1; ViT-VQGAN)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        # A rolling record of recently chosen codes, used to find dead codes during training.
        # Floats because that is how the released checkpoint stores it; -1 marks an empty slot.
        self.register_buffer("codebook_used", torch.full((USAGE_WINDOW,), -1.0))

    def codebook(self):
        """The codes as used for search and lookup: (V, d), unit length if l2-normalised."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def normalize(self, z):
        """Latents (B, d, h, w) as the search sees them: unit length along d if l2-normalised."""
        return F.normalize(z, dim=1) if self.l2_norm else z

    def nearest(self, z):
        """Latents (B, d, h, w) -> index of the nearest code (B, h, w) int64. Footgun: call it outside
        bf16 autocast, as `forward` does, or rounded distances pick other codes. (It cannot turn
        autocast off itself: the meta device, on which the tests build the model, has none.)"""
        flat = rearrange(self.normalize(z), "b d h w -> (b h w) d")       # (B*h*w, d)
        codebook = self.codebook()                                        # (V, d)
        # Squared distance |z|^2 + |e|^2 - 2 z.e, all pairs at once: (B*h*w, V).
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        B, _, h, w = z.shape
        return dist.argmin(dim=1).view(B, h, w)

    def lookup(self, codes):
        """Codes (B, h, w) -> quantised latents (B, d, h, w)."""
        return rearrange(F.embedding(codes, self.codebook()), "b h w d -> b d h w")

    def forward(self, z):
        """Training path: (z_q with straight-through gradients, codes, codebook loss, commitment loss).

        VQ-VAE (van den Oord et al. 2017, Eq. 3): the codebook loss pulls the chosen codes towards
        the (frozen) latents, the commitment loss pulls the latents towards their (frozen) codes.
        argmin has no gradient, so the decoder's gradient is copied past the quantizer onto z
        (straight-through estimator): z + (z_q - z).detach() equals z_q but differentiates as z.
        """
        # In fp32 even under bf16 autocast (train_tokenizer): rounded distances would pick other
        # codes, and with 8-dimensional codes this part costs next to nothing.
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            codes = self.nearest(z)
            z = self.normalize(z)
            z_q = self.lookup(codes)
            codebook_loss = F.mse_loss(z_q, z.detach())
            commitment_loss = F.mse_loss(z, z_q.detach())
        if self.training:
            self.record_usage(codes)
        return z + (z_q - z).detach(), codes, codebook_loss, commitment_loss

    @torch.no_grad()
    def record_usage(self, codes):
        """Push the codes of one batch into the rolling `codebook_used` window."""
        recent = codes.flatten()[-USAGE_WINDOW:].float()
        n = recent.numel()
        if n == 0:                                                        # ([-0:] would be the whole window)
            return
        self.codebook_used[:-n] = self.codebook_used[n:].clone()
        self.codebook_used[-n:] = recent

    @torch.no_grad()
    def init_from_latents(self, z):
        """Seed every code from the latents z (B, d, h, w) and forget the usage record: the
        data-dependent codebook initialisation that ends the autoencoder warm-up (k-means++
        seeding, as SoundStream starts its codebooks from k-means on the first batch)."""
        self.codebook_used.fill_(-1)
        self.restart_dead_codes(z)

    @torch.no_grad()
    def restart_dead_codes(self, z):
        """Move every code absent from the usage window onto a latent of the batch z (B, d, h, w).
        A dead code gets no gradient from the codebook loss and would stay dead; put where the
        encoder actually puts latents, it gets chosen again. Returns how many moved.

        Where to put them matters for generation, not only for reconstruction. Most patches of
        the built-in shapes are flat background, so codes restarted on *random* latents pile up
        there: one flat colour ends up spread over many near-identical codes, which carry
        no picture but are pure noise for ARPG to predict. So the new codes are placed as in
        k-means++ seeding: one at a time, on a latent drawn with probability proportional to its
        squared distance from the nearest code so far. Latents that are already well described
        (flat patches) are rarely drawn; badly described ones (edges, corners) often. One departure:
        with no code in use yet (`init_from_latents`), every latent starts at weight 1 rather than
        at a distance, so the weights stay capped at 1 (unit latents are up to 4 apart): a latent
        more than 60 degrees from every code so far weighs as much as any other such one. The
        recipe's numbers were measured with it; exact k-means++ there is untried."""
        used = torch.zeros(self.embedding.num_embeddings, dtype=torch.bool, device=z.device)
        seen = self.codebook_used[self.codebook_used >= 0].long()
        used[seen] = True
        dead = (~used).nonzero().squeeze(1)
        candidates = rearrange(self.normalize(z), "b d h w -> (b h w) d")     # (N, d)
        if used.any():
            gap = torch.cdist(candidates, self.codebook()[used]).pow(2).min(dim=1).values  # (N,)
        else:
            gap = torch.ones(len(candidates), device=z.device)                # no code yet: uniform
        for code in dead.tolist():
            if gap.sum() <= 0:  # every latent already has a code on it
                gap = torch.ones_like(gap)
            pick = torch.multinomial(gap, 1)[0]
            self.embedding.weight.data[code] = candidates[pick]
            gap = torch.minimum(gap, (candidates - candidates[pick]).pow(2).sum(dim=1))
        return len(dead)


# -----------------------------------------------------------------------------
# The tokenizer: encoder -> 1x1 conv -> quantizer -> 1x1 conv -> decoder

class VQModel(nn.Module):
    """LlamaGen's VQ tokenizer. With VQ_PRESETS["VQ-16"] its state dict is key-for-key and
    shape-for-shape that of `vq_ds16_c2i.pt`, so the released weights load strictly."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.downsample = config.downsample                # f: pixels per token along each side
        self.encoder = Encoder(config)
        self.quant_conv = Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.quantize = VectorQuantizer(config)
        self.post_quant_conv = Conv2d(config.codebook_embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def device(self):
        return self.quant_conv.weight.device

    def check_images(self, images):
        """Raise a clear ValueError unless images is a float tensor (B, 3, H, W), H and W multiples of f."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"expected images as a tensor (B, 3, H, W) in [-1, 1], got {shape}; "
                             f"use images_to_tensor() for uint8 (B, H, W, 3) arrays")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got {images.dtype}; use images_to_tensor()")
        H, W = images.shape[-2:]
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"image size {H}x{W} is not divisible by the tokenizer's downsampling "
                             f"factor {self.downsample}")

    def check_image_size(self, size):
        """Raise a clear ValueError unless `size` (--image-size) is a positive multiple of f."""
        if size < self.downsample or size % self.downsample:
            raise ValueError(f"--image-size must be a positive multiple of the tokenizer's downsampling factor "
                             f"{self.downsample}, got {size}")

    def check_codes(self, codes):
        """Raise a clear ValueError unless codes is an integer tensor (B, h, w) within [0, V)."""
        if (not torch.is_tensor(codes) or codes.ndim != 3 or codes.is_floating_point() or codes.is_complex()
                or codes.dtype == torch.bool):
            got = f"{type(codes).__name__} {getattr(codes, 'dtype', '')} {tuple(getattr(codes, 'shape', ()))}"
            raise ValueError(f"expected codes as an integer torch tensor (B, h, w), got {got}; "
                             f"torch.from_numpy() converts a numpy array")
        V = self.config.codebook_size
        if codes.numel() and (codes.min() < 0 or codes.max() >= V):
            raise ValueError(f"codes must lie in [0, {V}), got values from {int(codes.min())} to {int(codes.max())}")

    def encode_latents(self, images):
        """Images (B, 3, H, W) -> unquantised latents (B, d, H/f, W/f)."""
        self.check_images(images)
        images = images.to(self.device, torch.float32)
        if not self.config.local_codes:
            return self.quant_conv(self.encoder(images))
        # Each f x f patch through the encoder as an image of its own (the encoder brings it down
        # to 1 x 1), then the latents back on the grid: see VQ_PRESETS["small"] for why.
        B, C, H, W = images.shape
        f = self.downsample
        patches = rearrange(images, "b c (h p) (w q) -> (b h w) (c p q)", p=f, q=f)  # (B*h*w, C*f*f)
        distinct, where = patches, slice(None)                            # every patch, in order
        if images.device.type == "cpu":
            # A CPU's time goes on the arithmetic, so each distinct patch goes through the encoder
            # once, and its latent is copied to every place it occurs: a patch's latent depends on
            # that patch alone, and flat backgrounds repeat. Exact, gradients included: a shared
            # latent's gradient is the sum over its copies, as if each had been encoded on its own
            # (with dropout 0, as in both presets; else repeated patches would share one mask).
            # On the built-in shapes ~37% of a 16-image batch's patches are distinct, and the small
            # tokenizer's training step takes 104 instead of 121 ms (bf16, 2 cores; EXPERIMENTS.md).
            # A GPU encodes them all at once in about the time of a few, and torch.unique would
            # wait for the values.
            distinct, where = torch.unique(patches, dim=0, return_inverse=True)  # (U, C*f*f), (B*h*w,)
            # Rounded up to a multiple of 8 patches with copies of the first, whose latents go
            # unread: the CPU's convolutions ran an odd count 1.4x slower.
            distinct = torch.cat([distinct, distinct[:1].expand(-len(distinct) % 8, -1)])  # (U + fillers, C*f*f)
        latents = self.quant_conv(self.encoder(distinct.view(-1, C, f, f)))[where]  # (B*h*w, d, 1, 1)
        return rearrange(latents, "(b h w) d 1 1 -> b d h w", b=B, h=H // f)

    def codes_to_latents(self, codes):
        """Codes (B, h, w) -> quantised latents (B, d, h, w): the (l2-normalised) codebook rows."""
        self.check_codes(codes)
        return self.quantize.lookup(codes.to(self.device, torch.int64))

    def decode_latents(self, latents):
        """Quantised latents (B, d, h, w) -> raw decoder output (B, 3, h*f, w*f), not clamped."""
        return self.decoder(self.post_quant_conv(latents))

    @torch.no_grad()
    def encode(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) int64 (no gradients)."""
        return self.quantize.nearest(self.encode_latents(images))

    @torch.no_grad()
    def encode_images(self, images_uint8, batch_size=64):
        """uint8 images (N, H, W, 3) -> codes (N, H/f, W/f) int64 on the CPU, in batches. 64 images a
        batch, not more: on a 2-core CPU the small tokenizer's activations then stay in the caches
        (the 5000 built-in images: 15 s in batches of 256, 6 s in batches of 64).

        With local codes, a patch's code depends on that patch alone, so each distinct patch is
        encoded once, as an f x f image of its own, and its code copied to every place it occurs.
        Flat backgrounds repeat: of the 1.28M patches of the 20,000 built-in images, 32.5% are
        distinct, and tokenizing the built-in data took 13 s instead of 22 s (EXPERIMENTS.md). (The
        per-batch search of `encode_latents` then finds no repeats in these chunks: ~0.7 s of it.)"""
        def in_batches(images, n):                                        # (M, h, w, 3) -> (M, h/f, w/f)
            return torch.cat([self.encode(images_to_tensor(images[i:i + n])).cpu() for i in range(0, len(images), n)])

        images_uint8 = np.asarray(images_uint8)
        if (images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3
                or not len(images_uint8)):
            raise ValueError(f"expected uint8 images (N >= 1, H, W, 3), got {images_uint8.dtype} {images_uint8.shape}")
        N, H, W, _ = images_uint8.shape
        f = self.downsample
        self.check_images(images_to_tensor(images_uint8[:1]))           # H and W multiples of f
        if not self.config.local_codes:
            return in_batches(images_uint8, batch_size)
        patches = rearrange(images_uint8, "n (h p) (w q) c -> (n h w) p q c", p=f, q=f)  # (N*h*w, f, f, 3)
        as_bytes = np.ascontiguousarray(patches).reshape(len(patches), -1)  # one row of f*f*3 bytes each
        # Each row viewed as one opaque value, so np.unique compares whole patches: `first` indexes
        # one example of each distinct patch, `where` maps every patch to its example.
        _, first, where = np.unique(as_bytes.view(np.dtype((np.void, as_bytes.shape[1]))).ravel(),
                                    return_index=True, return_inverse=True)
        distinct = patches[first]                                         # (U, f, f, 3)
        chunk = batch_size * (H // f) * (W // f)                          # as many patches as batch_size images
        codes = in_batches(distinct, chunk).flatten()                     # (U,)
        return codes[torch.from_numpy(where.ravel())].view(N, H // f, W // f)

    @torch.no_grad()
    def decode(self, codes):
        """Codes (B, h, w) -> images (B, 3, h*f, w*f), clamped to [-1, 1] (no gradients)."""
        return self.decode_latents(self.codes_to_latents(codes)).clamp(-1.0, 1.0)

    def forward(self, images, quantize=True):
        """Training path: (reconstruction (B, 3, H, W) unclamped, codes (B, h, w), codebook loss,
        commitment loss); gradients flow to everything through the straight-through quantizer.

        quantize=False skips the codebook (the decoder sees the normalised latents themselves;
        codes None, losses 0): the autoencoder warm-up of train_tokenizer."""
        latents = self.encode_latents(images)
        if not quantize:
            zero = latents.new_zeros(())
            return self.decode_latents(self.quantize.normalize(latents)), None, zero, zero
        z_q, codes, codebook_loss, commitment_loss = self.quantize(latents)
        return self.decode_latents(z_q), codes, codebook_loss, commitment_loss

    @classmethod
    def from_checkpoint(cls, path_or_state, config=None):
        """Build and load a tokenizer from a checkpoint path or an already loaded dict.

        The state dict may sit under "model" (LlamaGen's vq_ds16_c2i.pt and our own files),
        "state_dict", "module", or be the dict itself; files are read with weights_only=True.
        The config is, in order: the argument, the checkpoint's "config" entry (our files), or
        read from the weight shapes (`infer_vq_config`: LlamaGen's files have none). Loading is
        strict: any missing, unexpected or misshapen key is a ValueError naming it.
        """
        checkpoint = read_checkpoint(path_or_state)
        state = unwrap_state_dict(checkpoint)
        where = "the given state" if isinstance(path_or_state, dict) else os.fspath(path_or_state)
        if "embeddings.weight" in state:                                  # ARPG's token table
            raise ValueError(f"{where} is an ARPG checkpoint, not a tokenizer: pass the VQ tokenizer's checkpoint")
        if config is None:
            stored = checkpoint.get("config")
            config = config_from_dict(VQConfig, stored, where) if isinstance(stored, dict) else infer_vq_config(state)
        model = cls(config)
        try:
            load_strict(model, state, what=f"VQ checkpoint {where}")
        except ValueError as error:
            raise ValueError(f"{error} (config used: {asdict(config)}; pass config=VQConfig(...) "
                             f"if the checkpoint has another architecture)") from None
        return model


def infer_vq_config(state) -> VQConfig:
    """The architecture of a LlamaGen-style tokenizer from its weight shapes (VQ-16 for
    vq_ds16_c2i.pt, and LlamaGen's other sizes alike): the widths from the convolutions, the
    depths from the block numbers, the codebook from its table. What the weights cannot show is
    LlamaGen's: the l2-normalised search, 32 GroupNorm groups, whole-image codes."""
    def count(prefix):                                                    # distinct block numbers after prefix
        return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})
    levels = count("encoder.conv_blocks.")
    read = ["encoder.conv_in.weight", "quantize.embedding.weight", "quant_conv.weight",
            *(f"encoder.conv_blocks.{i}.res.0.conv1.weight" for i in range(levels))]
    if any(key not in state for key in read):
        return VQ_PRESETS["VQ-16"]  # not a whole tokenizer's weights: loading names what is missing
    ch = state["encoder.conv_in.weight"].shape[0]
    codebook_size, code_dim = state["quantize.embedding.weight"].shape
    ch_mult = tuple(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels))
    if any(ch * m % VQConfig.norm_groups for m in ch_mult):
        raise ValueError(f"tokenizer weights of widths {[ch * m for m in ch_mult]}, not all divisible by "
                         f"LlamaGen's {VQConfig.norm_groups} GroupNorm groups, and no config saved with them: "
                         f"pass config=VQConfig(...)")
    return VQConfig(codebook_size=codebook_size, codebook_embed_dim=code_dim, ch=ch, ch_mult=ch_mult,
                    z_channels=state["quant_conv.weight"].shape[1],
                    encoder_num_res_blocks=count("encoder.conv_blocks.0.res."),
                    decoder_num_res_blocks=count("decoder.conv_blocks.0.res."))


# -----------------------------------------------------------------------------
# Training (VQ-VAE losses; for the built-in dataset on a CPU)

COMMITMENT_BETA = 0.25      # weight of the commitment loss (VQ-VAE's beta; LlamaGen uses 0.25 too)
AUTOENCODER_WARMUP = 0.25   # fraction of training spent as a plain autoencoder, before quantizing
RESTART_EVERY = 50          # steps between dead-code restarts
# Steps when neither max_steps nor minutes is given: 2.4-2.9 min on 2 cores of an Intel Xeon with AMX
# or an AMD EPYC with AVX-512 BF16, about 5 min on an AVX2-only EPYC. 1200 rather than
# 800: held-out PSNR 23.8 -> 26.4 dB (seed 0) and 25.1 -> 26.1 dB (seed 1) on an Intel AVX-512 machine,
# and the ARPG trained on its codes reached loss 1.04 instead of 1.27 and 51.3% class accuracy
# instead of 44.8% (1000 samples each; EXPERIMENTS.md). train.py's default run trains it for 900 steps, to
# leave the ARPG more of its time budget (train.TOKENIZER_STEPS).
DEFAULT_STEPS = 1200
# Images to train on, at most: 1200 steps of 16 see each of 5000 about 4 times. train.py's default
# run gives it the first 5000 of its 20,000 built-in images: trained on all of them (1200 steps, each
# image seen once) its reconstructions were classified 97.4% instead of 99.2% (seed 0), and the
# ARPG on its codes reached 83.3% class accuracy, not 89.5%. `--train` picks them at random.
TRAINING_IMAGES = 5000


def psnr_from_mse(mse):
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2) from their mean squared error."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def _learning_rate(progress, lr, warmup=0.05, final_ratio=0.1):
    """Linear warm-up over the first 5% of training, then cosine decay to 10% of lr."""
    if progress < warmup:
        return lr * progress / warmup
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return lr * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))


def _save_reconstruction_grid(vq, images_uint8, path):
    """Rows of inputs and their reconstructions, for watching training."""
    with torch.no_grad():
        recon = tensor_to_images(vq.decode(vq.encode(images_to_tensor(images_uint8))))
    rows = np.stack([images_uint8, recon])  # (2, n, H, W, 3)
    save_image_grid(rows, ["input", "recon"], path)


def make_tokenizer_optimizers(vq, lr, muon_lr):
    """The tokenizer's optimizers: Muon (muon.py) for the convolution kernels between the first and
    the last layer when muon_lr > 0, AdamW for the rest, with weight decay on its kernels only: not
    on biases, norms, or the codebook (the codebook is l2-normalised, so shrinking it would only
    change its effective learning rate). The first and last layers stay with AdamW, as in Muon's
    own recipe: they map pixels in and out (3 channels) rather than features to features. Each
    parameter group keeps its peak learning rate as "peak_lr". With Muon at 0.02, the default
    1200 steps on the built-in shapes reached 27.77 / 28.01 / 27.64 dB of held-out PSNR (seeds
    0 / 1 / 2) against 26.44 / 26.14 / 25.60 with AdamW alone (Muon at 0.05: 25.97 dB, seed 1)."""
    first_and_last = {"encoder.conv_in.weight", "decoder.conv_out.weight"}
    named = list(vq.named_parameters())
    muon = [p for name, p in named if muon_lr > 0 and p.ndim == 4 and name not in first_and_last]
    in_muon = {id(p) for p in muon}
    rest = [(name, p) for name, p in named if id(p) not in in_muon]
    decays = {name: p.ndim >= 2 and "embedding" not in name for name, p in rest}
    optimizers = [torch.optim.AdamW(
        [{"params": [p for name, p in rest if decays[name]], "weight_decay": 0.05, "peak_lr": lr},
         {"params": [p for name, p in rest if not decays[name]], "weight_decay": 0.0, "peak_lr": lr}],
        lr=lr, betas=(0.9, 0.95))]
    if muon:
        optimizers.append(Muon([{"params": muon, "peak_lr": muon_lr}], lr=muon_lr))
    return optimizers


def train_tokenizer(images_uint8, config, out_path, max_steps=None, minutes=None, batch_size=16, lr=2e-3,
                    muon_lr=0.02, seed=0, device="cpu", preview_path=None, precision="fp32"):
    """
    Train a VQModel from scratch on uint8 images (N, H, W, 3) and return it (in eval mode).

    Loss = MSE(reconstruction, image) + codebook loss + 0.25 * commitment loss (VQ-VAE, Eq. 3),
    with straight-through gradients through the quantizer. Pixel MSE is exactly what PSNR
    measures. LlamaGen adds a VGG perceptual loss and a PatchGAN loss for sharp ImageNet
    textures; flat shapes do not need them (and no pretrained VGG can be downloaded here).

    Two stages, because a CPU budget is short:
      1. The first 25% of training is a plain autoencoder: the decoder sees the (l2-normalised)
         latents themselves. Colours and edges are learnt without the discrete bottleneck,
         whose straight-through gradients are slow to start from a random codebook.
      2. Then the codes are placed on latents of the (now meaningful) encoder by k-means++
         seeding, and VQ training goes on; every RESTART_EVERY steps, codes unused in the recent
         window are moved onto live latents, so the whole codebook stays in use.
    On the built-in shapes the warm-up is worth about 3 dB of PSNR at the same budget.
    The convolution kernels are trained by Muon (peak lr `muon_lr`, 0: AdamW for everything), the
    rest by AdamW (peak lr `lr`): see `make_tokenizer_optimizers`. With precision="bf16" the
    encoder and decoder run under bf16 autocast, the quantizer and the losses in fp32 (train.py
    picks it where it is faster: `tokenizer_precision`).

    Stops after `max_steps`, or after `minutes` of wall time, whichever comes first (DEFAULT_STEPS,
    1200, if neither is given); stages and the learning rate (warm-up + cosine) follow that budget.
    At the end the checkpoint {"model", "config", "step", "image_size"} is written atomically to
    `out_path` (the image size is --tokenize's default crop), and
    only then: train.py uses out/tokenizer.pt whenever it exists, so a run stopped halfway must
    not leave a half-trained one behind. With `preview_path`, a reconstruction grid (real images
    above their reconstructions) is written there every 200 steps and at the end.
    """
    if max_steps is None and minutes is None:
        max_steps = DEFAULT_STEPS
    if (max_steps is not None and max_steps < 1) or (minutes is not None and minutes <= 0):
        raise ValueError(f"max_steps must be at least 1 and minutes positive, got {max_steps} and {minutes}")
    if precision not in ("fp32", "bf16") or batch_size < 1:
        raise ValueError(f"precision must be 'fp32' or 'bf16' and batch_size at least 1, got {precision!r} "
                         f"and {batch_size}")
    images_uint8 = np.asarray(images_uint8)
    if len(images_uint8) == 0:
        raise ValueError("no images to train the tokenizer on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vq = VQModel(config).to(device).train()
    vq.check_images(images_to_tensor(images_uint8[:1]))  # fail now, not after the first step

    def random_batch(n):
        return images_to_tensor(images_uint8[rng.integers(len(images_uint8), size=n)]).to(device)

    optimizers = make_tokenizer_optimizers(vq, lr, muon_lr)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    preview = images_uint8[:8]
    log_every, grid_every = 25, 200

    def save_grid():
        vq.eval()
        _save_reconstruction_grid(vq, preview, preview_path)
        vq.train()

    start = time.time()
    bar = tqdm(total=max_steps, desc="tokenizer", unit="step", dynamic_ncols=True)
    step, quantizing = 0, False
    while True:
        elapsed = time.time() - start
        progress = max(step / max_steps if max_steps else 0.0, elapsed / (60 * minutes) if minutes else 0.0)
        if progress >= 1.0 and step > 0:  # one step at least: a budget spent before it still ends in a checkpoint
            break
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(progress, group["peak_lr"])
        if not quantizing and progress >= AUTOENCODER_WARMUP:  # stage 1 -> stage 2
            quantizing = True
            with torch.no_grad():
                vq.quantize.init_from_latents(vq.encode_latents(random_batch(4 * batch_size)))

        batch = random_batch(batch_size)
        with autocast:
            recon, codes, codebook_loss, commitment_loss = vq(batch, quantize=quantizing)
        mse = F.mse_loss(recon.float(), batch)
        loss = mse + codebook_loss + COMMITMENT_BETA * commitment_loss
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        step += 1

        if quantizing and step % RESTART_EVERY == 0:
            with torch.no_grad():
                vq.quantize.restart_dead_codes(vq.encode_latents(batch))
        if step % log_every == 0 or step == 1:
            used = vq.quantize.codebook_used
            usage = len(torch.unique(used[used >= 0])) / config.codebook_size
            ms = 1000 * (time.time() - start) / step
            bar.set_postfix_str(f"{'vq' if quantizing else 'autoencoder'} loss {loss.item():.4f} "
                                f"psnr {psnr_from_mse(mse.item()):.1f} usage {usage:.0%} "
                                f"lr {optimizers[0].param_groups[0]['lr']:.1e} {ms:.0f} ms/step "
                                f"{1000 * batch_size / ms:.0f} img/s", refresh=False)
        if preview_path and step % grid_every == 0:
            save_grid()
        bar.update(1)
    bar.close()
    # A bar stopped at 589/900 by the time budget looks like a crash: say why it stopped.
    stopped_by = "its step count" if max_steps and step >= max_steps else f"its {minutes:g}-minute budget"
    print(f"tokenizer: {step} steps in {(time.time() - start) / 60:.1f} min, stopped by {stopped_by}; "
          f"PSNR {psnr_from_mse(mse.item()):.1f} dB on its last batch", flush=True)
    save_atomic({"model": vq.state_dict(), "config": asdict(config), "step": step,
                 "image_size": images_uint8.shape[1]}, out_path)
    if preview_path:
        save_grid()
    return vq.eval()


@torch.no_grad()
def evaluate_tokenizer(vq, images_uint8, batch_size=100):
    """Round-trip uint8 images (N, H, W, 3) through the tokenizer. Returns {"psnr": mean per-image
    PSNR in dB on the uint8 pixels, "code_usage": fraction of the codebook used by these images}."""
    was_training = vq.training
    vq.eval()
    psnrs, used = [], torch.zeros(vq.config.codebook_size, dtype=torch.bool)
    for i in range(0, len(images_uint8), batch_size):
        original = np.asarray(images_uint8[i:i + batch_size])
        codes = vq.encode(images_to_tensor(original))
        used[codes.flatten().cpu()] = True
        recon = tensor_to_images(vq.decode(codes))
        mse = ((recon.astype(np.float64) - original.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
        psnrs.extend(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))
    vq.train(was_training)
    return {"psnr": float(np.mean(psnrs)), "code_usage": float(used.float().mean())}


# -----------------------------------------------------------------------------
# Pre-tokenizing an image folder into ARPG's training format (SPEC 8)
#
# ARPG trains on codes, not pixels: `{out}/{class_id}/{index}.npy`, each an int64 array
# (n_aug, h*w) holding the raster-order codes of n_aug views of one image. Here n_aug = 2: the
# centre crop and its horizontal flip (the format RandAR released for ImageNet; the training
# loader picks one view per read, which is the flip augmentation for free).

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def centre_crop(image, size):
    """A PIL image -> its central size x size square after resizing the shorter side to `size`.

    Large images are first halved with a box filter while still at least twice the target, so
    the final bicubic resize never has to skip pixels (the ADM / LlamaGen preprocessing)."""
    from PIL import Image
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


CLASS_NAMES_FILE = "class_names.json"  # beside the code folders: the image folders' names, in class-id order


def class_folder_names(root):
    """The sorted names of root's subfolders, one per class; hidden ones (.ipynb_checkpoints) are
    not classes. (train.py lists code folders with it too.)"""
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def list_image_folder(image_dir):
    """[(path, class_id, index)] for `image_dir/<class>/<image>` (files directly in each class
    folder; deeper folders are not read): class ids follow the sorted subfolder names, index the
    sorted file names within a class. Raises a clear error when the folder is missing or holds no
    images."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    classes = class_folder_names(image_dir)
    items, empty = [], []
    for class_id, name in enumerate(classes):
        folder = os.path.join(image_dir, name)
        files = sorted(f for f in os.listdir(folder)  # hidden files (macOS ._x.jpg) skipped, and folders
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                       and os.path.isfile(os.path.join(folder, f)))
        items += [(os.path.join(image_dir, name, f), class_id, index) for index, f in enumerate(files)]
        if not files:
            empty.append(name)
    if not items:
        raise ValueError(f"no images in {image_dir}: expected one subfolder per class holding "
                         f"{'/'.join(IMAGE_EXTENSIONS)} files")
    if empty:  # a class that never appears; and its code folder would be missing, renumbering the ones after it
        raise ValueError(f"class folder(s) {', '.join(empty)} in {image_dir} hold no images: fill or remove them")
    return items


class ImageFolderCrops(torch.utils.data.Dataset):
    """The images of list_image_folder as (centre crop (3, S, S) in [-1, 1], class_id, index)."""

    def __init__(self, items, image_size):
        self.items, self.image_size = items, image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, class_id, index = self.items[i]
        crop = centre_crop(read_image(path), self.image_size)
        return images_to_tensor(np.asarray(crop)[None])[0], class_id, index


def check_code_folder(out_dir, batch_size):
    """Refuse a batch size under 1, or an `out_dir` that is an empty name or exists already (main checks
    before loading the tokenizer, tokenize_folder before encoding anything). An existing folder is
    refused rather than merged into: codes of another image size, tokenizer or image folder would be
    mixed in unnoticed (and a rename cannot merge anyway). An empty name would be the current folder."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    if not os.fspath(out_dir).strip():
        raise ValueError("--out is empty; give a folder name for the codes")
    if os.path.exists(out_dir):
        raise ValueError(f"--out {out_dir} already exists; remove it or choose another folder for the codes")


@torch.no_grad()
def encode_with_mirror(vq, crops):
    """Crops (B, 3, S, S) in [-1, 1] -> codes (B, 2, h*w) on the CPU: row 0 the crop as it is, row 1
    its mirror image (SPEC 8: two augmentations an image). tokenize_folder writes these, and
    train.py encodes an image folder with them too, so its codes equal tokenize_folder's."""
    codes = vq.encode(torch.cat([crops, crops.flip(-1)]))                 # (2B, h, w): crops, then mirrors
    return rearrange(codes, "(n b) h w -> b n (h w)", n=2).cpu()          # (B, 2, h*w)


@torch.no_grad()
def tokenize_folder(vq, image_dir, out_dir, image_size=256, batch_size=64, num_workers=0):
    """Encode every image of `image_dir/<class>/` into `out_dir/<class_id>/<index>.npy`, int64
    (2, h*w): row 0 the centre crop, row 1 its horizontal flip; the class folders' names go into
    `out_dir/class_names.json` (train.py labels its grids with them). Returns the number of images.
    Images are read upright (`data.read_image` applies a photo's EXIF rotation), where LlamaGen's
    loader ignores it: for a rotated photo the codes differ from LlamaGen's, for any other the same.

    `out_dir` appears only once every image is encoded: the codes are written into a hidden
    sibling folder, renamed to `out_dir` at the end and removed on any failure. A half-written
    code folder would look complete to train.py, which reads whatever .npy files it finds.
    """
    check_code_folder(out_dir, batch_size)
    vq.check_image_size(image_size)
    items = list_image_folder(image_dir)
    out_dir = os.path.abspath(out_dir)                                    # no trailing slash: a name to rename to
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    work_dir = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=f".{os.path.basename(out_dir)}-partial-")
    try:
        for class_id in sorted({class_id for _, class_id, _ in items}):
            os.makedirs(os.path.join(work_dir, str(class_id)))
        with open(os.path.join(work_dir, CLASS_NAMES_FILE), "w") as names:
            json.dump(class_folder_names(image_dir), names)              # list_image_folder's class ids
        loader = torch.utils.data.DataLoader(ImageFolderCrops(items, image_size), batch_size=batch_size,
                                             num_workers=num_workers)
        was_training = vq.training
        vq.eval()
        for crops, class_ids, indices in tqdm(loader, desc="tokenizing", unit="batch", dynamic_ncols=True):
            codes = encode_with_mirror(vq, crops.to(vq.device)).numpy()  # (B, 2, h*w)
            for views, class_id, index in zip(codes, class_ids.tolist(), indices.tolist()):
                np.save(os.path.join(work_dir, str(class_id), f"{index}.npy"), views.astype(np.int64))
        vq.train(was_training)
        os.chmod(work_dir, 0o755)  # mkdtemp makes an owner-only folder; a data set is shared
        os.rename(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return len(items)


def read_crops(items, image_size, num_workers=0):
    """The centre crops of list_image_folder's items as uint8 (n, S, S, 3), for train_tokenizer."""
    loader = torch.utils.data.DataLoader(ImageFolderCrops(items, image_size), batch_size=64, num_workers=num_workers)
    return np.concatenate([tensor_to_images(crops) for crops, _, _ in tqdm(loader, desc="reading images", unit="batch",
                                                                           dynamic_ncols=True)])


# -----------------------------------------------------------------------------
# Command line: train the small tokenizer on an image folder, or pre-tokenize one

def train_on_folder(args):
    """--train: the small tokenizer on (at most TRAINING_IMAGES of) the folder's images."""
    size = 64 if args.image_size is None else args.image_size             # 8 x 8 tokens of 8 x 8 pixels
    config = VQ_PRESETS["small"]
    VQModel(config).check_image_size(size)                                # before reading thousands of images
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    seed = 0 if args.seed is None else args.seed
    batch_size = 16 if args.batch_size is None else args.batch_size
    if steps < 1 or batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be at least 1, got {steps} and {batch_size}")
    items = list_image_folder(args.train)
    check_output_path(args.out)
    # In random order, not the folder's (class by class): the quality printed below and the
    # preview grid take the first images.
    chosen = np.random.default_rng(seed).permutation(len(items))[:TRAINING_IMAGES]
    images = read_crops([items[i] for i in chosen], size, args.num_workers)  # (n, S, S, 3)
    print(f"training the small tokenizer on {len(images)} of the {len(items)} images in {args.train} "
          f"({size}x{size} centre crops), {steps} steps")
    preview = beside(args.out, "_recon.png")
    vq = train_tokenizer(images, config, args.out, max_steps=steps, batch_size=batch_size, seed=seed,
                         device=args.device, preview_path=preview)
    quality = evaluate_tokenizer(vq, images[:500])
    print(f"wrote {args.out}: PSNR {quality['psnr']:.2f} dB on {min(500, len(images))} of the images it trained on, "
          f"{quality['code_usage']:.0%} of its {config.codebook_size} codes used by them; reconstructions in "
          f"{preview}")
    arpg_out = os.path.join(os.path.dirname(args.out), "my_arpg.pt")     # not train.py's default out/arpg.pt
    print(f"next: python train.py --data {args.train} --tokenizer {args.out} --out {arpg_out}"
          + (f" --image-size {size}" if size != 64 else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the small tokenizer on a folder of images, or pre-tokenize "
                                                 "one (one subfolder per class) into {out}/{class_id}/{index}.npy "
                                                 "code files for ARPG training.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tokenize", metavar="IMAGE_DIR",
                      help="folder with one subfolder per class; sorted subfolder names give class ids 0, 1, ...")
    mode.add_argument("--train", metavar="IMAGE_DIR",
                      help=f"train the small tokenizer (8x downsampling, 128 codes) on this folder's images (at most "
                           f"{TRAINING_IMAGES}, picked at random); reconstructions go beside the checkpoint, in "
                           f"<out without its extension>_recon.png")
    parser.add_argument("--out", required=True,
                        help="--tokenize: a new folder for the .npy code files (refused if it exists); --train: the "
                             "checkpoint file")
    parser.add_argument("--vq-ckpt", default=None,
                        help="--tokenize: the tokenizer checkpoint, LlamaGen's vq_ds16_c2i.pt or one from --train "
                             "or train.py")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the centre crop in pixels, a multiple of the downsampling factor (default for "
                             "--tokenize: the size the tokenizer was trained at, recorded by --train and train.py, "
                             "else 256, LlamaGen's ImageNet size; 64 for --train, the built-in shapes' size)")
    parser.add_argument("--steps", type=int, default=None, help=f"--train: training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=None,
                        help="--train: random seed (images picked, initialisation; default 0)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch: --tokenize (default 64) encodes each with its mirror image, so twice "
                             "as many go through the encoder at once; --train: per training step (default 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: cuda if available)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader processes decoding and cropping images (default: min(8, CPU count))")
    args = parser.parse_args(argv)
    check_device(args.device)
    if args.train is not None:
        if args.vq_ckpt is not None:
            raise ValueError("--vq-ckpt goes with --tokenize: --train trains a new tokenizer from scratch")
        return train_on_folder(args)
    if args.vq_ckpt is None:
        raise ValueError("--tokenize needs --vq-ckpt: the tokenizer checkpoint to encode with")
    if args.steps is not None or args.seed is not None:
        raise ValueError("--steps and --seed go with --train")
    batch_size = 64 if args.batch_size is None else args.batch_size
    check_code_folder(args.out, batch_size)                              # before minutes of loading
    vq = VQModel.from_checkpoint(args.vq_ckpt).to(args.device)
    print(f"tokenizer {args.vq_ckpt}: {asdict(vq.config)}")
    # By default, crops of the size the tokenizer was trained at (which train_tokenizer records),
    # else 256, LlamaGen's ImageNet size: a small tokenizer trained at 64 would otherwise get 256 x 256
    # crops (1024 tokens an image) without a word.
    size = read_checkpoint(args.vq_ckpt).get("image_size", 256) if args.image_size is None else args.image_size
    n = tokenize_folder(vq, args.tokenize, args.out, size, batch_size, args.num_workers)
    print(f"wrote the codes of {n} images to {args.out}")


if __name__ == "__main__":
    run_script(main)
