"""
Train ARPG: random-order teacher forcing with the paper's recipe, from a laptop CPU to many GPUs.

Paper: Sec. 3.1, training (every image gets its own random generation order; Pass 1 reads the
class token and the tokens revealed so far, Pass 2 asks one [MASK] query per target position;
the loss itself is `ARPG.forward` in arpg.py) and the recipe of Sec. 4.1 / SPEC 5: AdamW
(0.9, 0.95), weight decay 0.05 on matrices only, lr 1e-4 per 256 images of global batch, linear
warm-up then cosine decay to 1e-5 at the paper's batch of 1024 (scaled with the batch, as the lr
is), gradient clipping at 1.0, bf16 autocast, label dropout 0.1
(so classifier-free guidance works at sampling time), EMA weights. The `tiny` CPU recipe departs
from it where a few minutes of training need it (RECIPES below): Muon for the weight matrices,
a higher learning rate held at its peak before a linear decay, no dropout (label dropout stays,
for guidance), no EMA, a compiled step, and 5 blocks instead of 7 in a timed fp32 run
(FP32_CPU_TINY_LAYERS).

With no arguments it does everything on a CPU with no download, in about 9.5 minutes on 2 cores:
draws the built-in shapes dataset (data.py), trains the small VQ tokenizer (tokenizer.py) unless
out/tokenizer.pt exists, tokenizes the images, trains the `tiny` ARPG and writes out/arpg.pt
and out/arpg_samples.png (one row per class; a grid every --sample-every steps in
out/arpg_samples/). Pictures are named after their checkpoint (out/tokenizer_recon.png: the
tokenizer's reconstructions), so a run with another --out keeps its own.

    python train.py                                   # CPU: built-in shapes, about 9.5 minutes
    python train.py --total-minutes 5                 # a smaller budget: fewer ARPG steps
    python train.py --max-steps 300                   # a fixed step count (the schedule shrinks with it)
    python train.py --minutes 3                       # stop (and save) after 3 minutes; --resume continues
    python train.py --resume                          # continue out/arpg.pt exactly where it stopped
    python train.py --size L --data /data/imagenet_codes --tokenizer vq_ds16_c2i.pt     # one GPU
    torchrun --nproc_per_node 8 train.py --size L --data /data/imagenet_codes --tokenizer vq_ds16_c2i.pt
    # your own image folder (one subfolder per class): its tokenizer first, then the ARPG
    python tokenizer.py --train my_images --out out/my_tokenizer.pt
    python train.py --data my_images --tokenizer out/my_tokenizer.pt --out out/my_arpg.pt

Data (--data): a folder with one subfolder per class. Either pre-tokenized codes,
{class}/{index}.npy holding (n_aug, L) or LlamaGen's (1, n_aug, L) integer arrays, one
augmentation picked per read (RandAR's ImageNet codes, or `python tokenizer.py --tokenize`),
or images ({class}/{name}.png/.jpg/...), tokenized once at start by --tokenizer. Without
--data: the built-in shapes. Class ids follow the sorted subfolder names (for code folders
numerically when they are all numbers, so ImageNet's 0..999 keep their ids; image folders sort
as text, as torchvision's ImageFolder and LlamaGen do).

Checkpoints (--out, written to a temporary file, then renamed): model, EMA, optimizer, config
(a plain dict), step, the run's flags (the seed among them), the class names, the tokenizer's path
and sample.py's sampling defaults; loadable with torch.load(weights_only=True). The data order and
every random number of a step are a pure function of (seed, step), so that is all the state a
resume needs: Ctrl-C saves and exits, and --resume ends with the same weights, bit for bit, as
a run of the same step count that was never stopped (on a CPU, tested; on a GPU only up to its
non-deterministic kernels, such as the backward pass of fused attention, which this code does
not switch off). A timed run's count depends on the machine's pace; resumed, it keeps the count
it was saved with and re-plans no more.
"""

import argparse
import copy
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from arpg import (ARPG, ARPG_PRESETS, ARPGConfig, check_device, config_from_dict, load_strict, read_checkpoint,
                  save_atomic)
from data import (CLASS_NAMES, beside, check_output_path, default_classes, make_builtin_dataset, run_script,
                  save_image_grid)
from muon import Muon
from schedules import CFG_SCHEDULES, MASK_SCHEDULES, SAMPLING_DEFAULTS, check_decoding
from tokenizer import (CLASS_NAMES_FILE, IMAGE_EXTENSIONS, TRAINING_IMAGES, VQ_PRESETS, ImageFolderCrops, VQModel,
                       class_folder_names, encode_with_mirror, list_image_folder, tensor_to_images, train_tokenizer)

# -----------------------------------------------------------------------------
# Recipes: the defaults that depend on the model size. Each flag named by a key here takes its
# value from here when it is not given (`fill_in_defaults`). L / XL / XXL follow the paper
# (SPEC 5); `tiny` is tuned for the default CPU run, which has a time budget rather than a step
# count (--total-minutes 9.5): the tiny model is still learning when it stops (about a point of
# class accuracy per 100 more steps; EXPERIMENTS.md), so the run takes as many steps as the machine
# fits into 9.5 minutes, tokenizer included, and stays within the 10 minutes promised on a slow one
# (cold-cache default runs on 2-core AMD EPYCs end between 9:16 and 9:40). --max-steps fixes the
# count instead, for results that do not depend on the machine's speed.

RECIPES = {
    # tiny departs from the paper where a few minutes of CPU training call for it (each change with
    # its measured effect, and the settings tried around it: EXPERIMENTS.md):
    # - No dropout (label dropout stays: guidance needs it) and no EMA. A short run has little room
    #   to overfit (with 20,000 images the loss on training and on held-out images stayed together,
    #   0.773 against 0.786 after 2154 steps), and an EMA would mostly average the early, worse
    #   weights.
    # - The learning rate holds its peak until the last 30% of the steps, then falls linearly,
    #   instead of the cosine: fewer steps at a small learning rate (an early 600-step run: class
    #   accuracy 29.0% -> 36.2% and 29.8% -> 30.0%, seeds 0 and 1).
    # - Muon (muon.py) at 0.015 for the matrices of the two passes, AdamW at 6e-3 for the rest (the
    #   embeddings, the head, the norms, the query-position map; of these only the matrices see
    #   the weight decay, Muon having none). Muon took 600 steps' final loss from 1.203 to 1.085 and from
    #   1.188 to 1.104 (seeds 0, 1); 0.015 rather than 0.02: 77.4% -> 80.1% and 75.8% -> 77.0%;
    #   AdamW's 6e-3 rather than 3e-3: 74.1% -> 76.4% and 75.1% -> 79.4%.
    # - The step compiled (`compile_or_not`: on 2 cores 1.2x faster in fp32, ~1.1x in bf16, after
    #   30-80 s of compiling the first time) and, on a CPU with bf16 matrix instructions, run in
    #   bf16 (`default_precision`: 1.6-1.9x faster than fp32).
    # - Sampled with a constant guidance of 2.5 (the paper's ramps up from 1 as the canvas fills,
    #   so the first tokens, which settle where the shape lies and what it is, go almost unguided:
    #   65.2% -> 71.9%, 68.0% -> 73.7% and 63.9% -> 70.2% for three default-run models), top-p 0.8
    #   (42.8% -> 50.0%, an early model) and the cosine schedule (64 tokens in 32 steps: one a step
    #   for the first 13 steps, then 2-3, where arccos ends with steps of 3, 3, 3, 4 and 10 tokens,
    #   drawn independently of each other: 71.9% -> 79.4%, 73.7% -> 80.9%, 73.6% -> 80.1%,
    #   70.2% -> 78.8%). The checkpoint carries these as sample.py's defaults; one that names
    #   none gets schedules.SAMPLING_DEFAULTS.
    "tiny": dict(batch_size=64, lr=6e-3, min_lr=1e-5, muon_lr=0.015, warmup=0.05, decay=0.3, total_minutes=9.5,
                 ema=0.0, dropout=0.0, compile=True, sample_cfg=2.5, sample_cfg_schedule="constant",
                 sample_schedule="cosine", sample_top_p=0.8, log_every=25, sample_every=400, save_every=200),
    "paper": dict(batch_size=1024, lr=None, min_lr=None, muon_lr=0.0, warmup=0.25, decay=0.0, total_minutes=0.0,
                  ema=0.9999, dropout=0.1, compile=False, sample_cfg=SAMPLING_DEFAULTS["cfg_scale"],
                  sample_cfg_schedule=SAMPLING_DEFAULTS["cfg_schedule"], sample_schedule=SAMPLING_DEFAULTS["schedule"],
                  sample_top_p=SAMPLING_DEFAULTS["top_p"], log_every=100, sample_every=5000, save_every=5000),
}
PAPER_LR_PER_256 = 1e-4     # SPEC 5: lr scales with the global batch (ARPG-L: batch 1024 -> 4e-4)
# SPEC 5's cosine ends at 1e-5, given for the paper's global batch of 1024. We scale that floor
# with the batch as the peak is scaled (our choice; the paper trains at 1024 only): a fixed 1e-5
# would sit above the peak for batches under 26 (batch 16: peak 6.25e-6), and the "decay" would rise.
PAPER_MIN_LR_PER_256 = 2.5e-6
PAPER_EPOCHS = 400          # SPEC 5: the paper's training length; max_steps = epochs * images / batch
ADAM_BETAS = (0.9, 0.95)    # SPEC 5
BUILTIN_TOKENIZER = "out/tokenizer.pt"  # the small tokenizer the default run trains
# The built-in shapes the default run draws: 20,000 images rather than 5000. In ~2000 steps the tiny
# model memorises 5000 (eval-mode loss 0.707 on training images against 0.864 on held-out ones);
# with 20,000 the held-out loss fell to 0.786 and class accuracy rose 84.7% -> 89.5% (seed 0, same
# budget).
BUILTIN_IMAGES = 20000
# The small tokenizer trains on the first tokenizer.TRAINING_IMAGES (5000) of them,
# ... for 900 steps rather than tokenizer.py's 1200: ~40 s (~180 steps) more for the ARPG, which
# gained more than the tokenizer lost (held-out PSNR ~1 dB lower; class accuracy 89.5% -> 89.5% and
# 88.3% -> 90.5%, seeds 0 and 1, with an earlier 6-block recipe; EXPERIMENTS.md).
TOKENIZER_STEPS = 900
# ... or for 2.5 minutes, whichever ends first, when the run has a time budget. Where bf16 runs, 900
# steps take 1.4-1.9 minutes and the cap binds only in slow spells; on the AVX2 EPYC, without bf16
# matrix instructions, each step cost twice as much, and the budget's minutes did more for the ARPG
# than the tokenizer's last steps (fp32: 478 -> 597 ARPG steps, 69.1% -> 73.2% for seed 0; 386 -> 567
# steps, 72.7% -> 74.4% for seed 1; EXPERIMENTS.md). A smaller --total-minutes shrinks the cap in
# proportion (`tokenizer_minutes`), or --total-minutes 3 would leave the ARPG no time.
TOKENIZER_MINUTES = 2.5
# On such a CPU a timed run also trains a shallower tiny ARPG: 5 blocks (2 + 3) instead of 7, whose
# steps cost ~35% less, so the budget holds ~800 steps instead of ~500, and 5 blocks learn more
# from so few (default runs on an AVX2 EPYC: 77.8% class accuracy, the mean of thirteen seeds,
# against 73.4% for five 7-block runs; 4 and 6 blocks did worse: EXPERIMENTS.md). Where bf16 runs,
# the budget holds ~1500-1800 steps of the 7-block model, which beat 6 blocks there. A run with
# --max-steps keeps the preset on every CPU.
FP32_CPU_TINY_LAYERS = 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to train")
    what.add_argument("--size", default="tiny", choices=list(ARPG_PRESETS),
                      help="model preset; vocab_size, num_classes and block_size come from the data")
    what.add_argument("--data", default=None,
                      help="folder of {class}/{index}.npy codes or {class}/{image} images (default: built-in shapes)")
    what.add_argument("--tokenizer", default=None,
                      help="VQ checkpoint: tokenizes an image folder and decodes sample grids (built-in "
                           f"shapes: default {BUILTIN_TOKENIZER}, trained first if missing)")
    what.add_argument("--vocab-size", type=int, default=None,
                      help="codebook size of pre-tokenized codes (default: the tokenizer's when given, "
                           "else the preset's)")
    what.add_argument("--num-images", type=int, default=None,
                      help=f"built-in dataset size (default: {BUILTIN_IMAGES}, drawn and tokenized once at start, "
                           f"~20 s on 2 cores)")
    what.add_argument("--image-size", type=int, default=None,
                      help="image folders are resized and centre-cropped to this side (default: the preset's "
                           "grid x the tokenizer's downsampling: 256 = 16 tokens x 16 for L with VQ-16, "
                           "64 = 8 x 8 for tiny)")
    what.add_argument("--tokenizer-steps", type=int, default=None,
                      help=f"built-in shapes: steps to train the small tokenizer when it is missing (default: "
                           f"{TOKENIZER_STEPS}; "
                           f"in a run timed by --total-minutes, at most {TOKENIZER_MINUTES} minutes of them, less in a "
                           f"smaller budget)")
    what.add_argument("--layers", type=int, default=None,
                      help="ARPG blocks, Pass 1's and Pass 2's together (default: the preset's, 7 for tiny and 24 "
                           f"for L; a timed tiny run in fp32 on a CPU: {FP32_CPU_TINY_LAYERS}, FP32_CPU_TINY_LAYERS)")
    what.add_argument("--out", default="out/arpg.pt", help="checkpoint path; sample grids go beside it")
    what.add_argument("--resume", action="store_true",
                      help="continue from --out: same weights, optimizer, data order and random numbers")

    recipe = parser.add_argument_group("recipe (None: the paper's for L/XL/XXL, the tuned CPU one for tiny)")
    recipe.add_argument("--batch-size", type=int, default=None,
                        help="GLOBAL batch in images per optimizer step (all processes and accumulation steps)")
    recipe.add_argument("--grad-accum", type=int, default=1,
                        help="split each process's share of the batch into this many micro-batches")
    recipe.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (paper: 1e-4 per 256 images of global batch)")
    recipe.add_argument("--muon-lr", type=float, default=None,
                        help="peak learning rate of Muon for the matrices of the two passes (0: AdamW for every "
                             "weight, the paper's; tiny: 0.015); it follows the same schedule as --lr")
    recipe.add_argument("--min-lr", type=float, default=None,
                        help="learning rate the decay ends at, one step after the last (tiny: 1e-5; paper: 1e-5 "
                             "per 1024 images of global batch, scaled like --lr)")
    recipe.add_argument("--warmup", type=float, default=None, help="linear warm-up, as a fraction of --max-steps")
    recipe.add_argument("--decay", type=float, default=None,
                        help="hold the peak, then fall linearly to --min-lr over this final fraction of --max-steps "
                             "(0: cosine decay from the end of warm-up, the paper's)")
    recipe.add_argument("--max-steps", type=int, default=None,
                        help="optimizer steps; the learning-rate schedule spans them (default: --total-minutes, else "
                             "400 epochs of the data, the paper's; --resume: the checkpoint's)")
    recipe.add_argument("--total-minutes", type=float, default=None,
                        help="without --max-steps: as many steps as let the whole run, tokenizer and data included, "
                             "end within about this many minutes, timed on a few steps first (tiny: 9.5; 0: off)")
    recipe.add_argument("--weight-decay", type=float, default=0.05,
                        help="AdamW weight decay on the >= 2-dim tensors AdamW trains (never on norms; Muon's matrices "
                             "get none, with --muon-lr > 0 as in the tiny recipe)")
    recipe.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    recipe.add_argument("--ema", type=float, default=None, help="EMA decay of a weight copy saved as 'ema' (0: off)")
    recipe.add_argument("--dropout", type=float, default=None,
                        help="dropout on input embeddings, attention outputs and FFN outputs (paper: 0.1)")
    recipe.add_argument("--seed", type=int, default=0,
                        help="seeds everything random: the built-in images, the small tokenizer, the model init, the "
                             "data order, generation orders, label dropout and dropout, the grids' noise")

    run = parser.add_argument_group("how to run")
    run.add_argument("--minutes", type=float, default=None,
                     help="stop after this many minutes of training (saved; --resume continues)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cpu or cuda (under torchrun each process takes cuda:LOCAL_RANK)")
    run.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                     help="autocast dtype for forward passes (default: bf16 on CUDA and on CPUs with bf16 "
                          "instructions, AVX-512 BF16 or AMX; else fp32)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the training forward/backward (tiny: on, and off again with a one-line "
                          "warning where compiling fails; else off)")
    run.add_argument("--workers", type=int, default=None,
                     help="DataLoader processes reading --data files (default: 0 for the built-in data, which is in "
                          "memory; else 4 per process, at most the CPU count divided by the processes)")
    run.add_argument("--log-every", type=int, default=None, help="print a progress line every N steps")
    run.add_argument("--save-every", type=int, default=None, help="write the checkpoint every N steps (0: at the end)")
    run.add_argument("--sample-every", type=int, default=None,
                     help="write a sample grid every N steps (0: only at the end); needs the tokenizer")
    run.add_argument("--sample-steps", type=int, default=16, help="decoding steps of the sample grids")
    run.add_argument("--sample-columns", type=int, default=8, help="samples per class in a grid")
    tiny, paper = RECIPES["tiny"], RECIPES["paper"]                       # the grids' defaults, for the help
    run.add_argument("--sample-cfg", type=float, default=None,
                     help="classifier-free guidance scale of the grids, saved in the checkpoint as sample.py's "
                          f"default (tiny: {tiny['sample_cfg']:g}; else {paper['sample_cfg']:g})")
    run.add_argument("--sample-cfg-schedule", default=None, choices=list(CFG_SCHEDULES),
                     help="how the grids' guidance changes as the canvas fills, saved in the checkpoint as sample.py's "
                          f"default (tiny: {tiny['sample_cfg_schedule']}; else {paper['sample_cfg_schedule']}, the "
                          "paper's)")
    run.add_argument("--sample-schedule", default=None, choices=list(MASK_SCHEDULES),
                     help="how many tokens each step of the grids reveals, saved in the checkpoint as sample.py's "
                          f"default (tiny: {tiny['sample_schedule']}; else {paper['sample_schedule']}, the paper's)")
    run.add_argument("--sample-top-p", type=float, default=None,
                     help="nucleus sampling threshold of the grids, saved in the checkpoint as sample.py's default "
                          f"(tiny: {tiny['sample_top_p']:g}; 1: off, the paper's)")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# Data: token grids and labels, from code folders, image folders or the built-in shapes

class DataError(ValueError):
    """A code file that cannot be trained on (unreadable, misshapen, codes outside the vocabulary):
    a class of its own, so that compile_or_not tells it from a failure of the compiler."""


def read_codes(path):
    """One .npy code file, or a one-line DataError naming it (empty, truncated, not an .npy)."""
    try:
        return np.load(path)                                              # allow_pickle=False: data only
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"cannot read {path} as an .npy array of codes ({error})") from None


class TokenGrids(Dataset):
    """Token grids with their class labels. An item is (index, draw) -> (codes (L,) int64, label).

    grids[i] is a path to an .npy file (read on access, so ImageNet never sits in memory) or an
    array already in memory; either holds (n_aug, L) or LlamaGen's (1, n_aug, L) codes, and
    `draw` (a random integer from the sampler) picks one augmentation per read.
    """

    def __init__(self, grids, labels, class_names, vocab_size, length):
        self.grids, self.labels = grids, labels
        self.class_names, self.vocab_size, self.length = list(class_names), vocab_size, length

    def __len__(self):
        return len(self.grids)

    def __getitem__(self, item):
        index, draw = item
        grid = self.grids[index]
        codes = read_codes(grid) if isinstance(grid, str) else grid
        where = grid if isinstance(grid, str) else f"image {index}"
        if (codes.ndim not in (1, 2, 3) or codes.size == 0 or codes.shape[-1] != self.length
                or not np.issubdtype(codes.dtype, np.integer)):
            raise DataError(f"{where}: expected integer codes of shape (n_aug, {self.length}) or "
                             f"(1, n_aug, {self.length}), got {codes.dtype} {codes.shape}")
        codes = codes.reshape(-1, self.length)                            # (n_aug, L)
        codes = codes[draw % len(codes)]                                  # (L,): one augmentation per read
        if codes.min() < 0 or codes.max() >= self.vocab_size:
            raise DataError(f"{where}: codes outside the vocabulary [0, {self.vocab_size}) "
                             f"(min {codes.min()}, max {codes.max()}); pass the tokenizer that made "
                             f"them (--tokenizer) or its codebook size (--vocab-size)")
        return torch.from_numpy(codes.astype(np.int64)), self.labels[index]


def scan_class_folders(root):
    """{root}/{class}/{file} -> (class names in label order, files per class, "codes" or "images")."""
    if os.path.isfile(root):
        raise ValueError(f"--data {root} is a file; give the folder that holds one subfolder per class")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder not found: {root}")
    names = class_folder_names(root)
    # Hidden files are not data (macOS copies leave a ._0.npy beside each 0.npy), as for images.
    listing = {name: sorted(f for f in os.listdir(os.path.join(root, name)) if not f.startswith("."))
               for name in names}
    has_codes = any(f.endswith(".npy") for files in listing.values() for f in files)
    has_images = any(f.lower().endswith(IMAGE_EXTENSIONS) for files in listing.values() for f in files)
    if has_codes and has_images:  # which one was meant? Either choice would drop the other silently
        raise ValueError(f"{root} holds both .npy code files and images: give a folder of one kind (codes from "
                         f"tokenizer.py --tokenize, or images with --tokenizer)")
    if has_codes:
        empty = [name for name in names if not any(f.endswith(".npy") for f in listing[name])]
        if empty:  # each folder is a class: an empty one would be a class that never appears
            raise ValueError(f"class folder(s) {', '.join(empty)} in {root} hold no .npy code files: fill or "
                             f"remove them")
        # Code folders are named by class id (RandAR's ImageNet codes, tokenizer.py --tokenize):
        # sort them as numbers, so folder "10" is class 10, not class 2.
        if all(name.isdigit() for name in names):
            names.sort(key=int)
        files = [[os.path.join(root, name, f) for f in listing[name] if f.endswith(".npy")] for name in names]
        return read_class_names(root, names), files, "codes"
    if has_images:
        return names, None, "images"  # tokenizer.py lists and reads image folders
    raise ValueError(f"no training data in {root}: expected one subfolder per class holding .npy code "
                     f"files or images ({', '.join(IMAGE_EXTENSIONS)})")


def read_class_names(root, folders):
    """The classes' names that tokenizer.py --tokenize keeps beside its code folders (named by
    class id), else the folders' own names."""
    path = os.path.join(root, CLASS_NAMES_FILE)
    if not os.path.isfile(path):
        return folders
    with open(path) as file:
        try:
            names = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it") from None
    if not (isinstance(names, list) and len(names) == len(folders) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path} should list the names of the {len(folders)} class folders beside it; fix or "
                         f"remove it")
    return names


def build_dataset(args, vq, preset, device):
    """The training set as TokenGrids, from --data or the built-in shapes (SPEC 8 layouts)."""
    if args.data is None:
        images, labels = make_builtin_dataset(args.num_images, seed=args.seed)
        codes = vq.encode_images(images).flatten(1).numpy()               # (n, L)
        return TokenGrids(codes[:, None], labels, CLASS_NAMES, vq.config.codebook_size, codes.shape[1])

    names, files, kind = scan_class_folders(args.data)
    if args.image_size is not None and kind == "codes":
        raise ValueError(f"--image-size applies to a folder of images; {args.data} holds codes, cropped when they "
                         f"were tokenized: drop it")
    if kind == "images":
        if vq is None:
            raise ValueError(f"{args.data} holds images: pass the tokenizer checkpoint that turns them into "
                             f"codes with --tokenizer (to train a small one on them first: python tokenizer.py "
                             f"--train {args.data} --out out/my_tokenizer.pt"
                             + (f" --image-size {args.image_size})" if args.image_size else ")"))
        # Read and crop with tokenizer.py's loader, so the codes equal `tokenizer.py --tokenize`'s at
        # the same --image-size (the same class ids too), and keep them in memory: fine for small
        # folders; pre-tokenize large ones once with tokenizer.py instead of at every start.
        size = args.image_size or preset.grid_size * vq.downsample  # tiny: 8 x 8 tokens * 8 = 64 pixels
        vq.check_image_size(size)
        items = list_image_folder(args.data)                              # [(path, class_id, index)]
        codes = []
        for crops, _, _ in DataLoader(ImageFolderCrops(items, size), batch_size=64, num_workers=args.workers):
            codes.append(encode_with_mirror(vq, crops.to(device)))       # (b, 2, L)
        codes = torch.cat(codes).numpy()                                  # (n, 2, L): two augmentations
        labels = np.array([class_id for _, class_id, _ in items])
        return TokenGrids(codes, labels, names, vq.config.codebook_size, codes.shape[-1])

    labels = np.concatenate([np.full(len(class_files), c, dtype=np.int64) for c, class_files in enumerate(files)])
    paths = [path for class_files in files for path in class_files]
    first = read_codes(paths[0])
    vocab_size = args.vocab_size or (vq.config.codebook_size if vq is not None else preset.vocab_size)
    dataset = TokenGrids(paths, labels, names, vocab_size, first.shape[-1] if first.ndim else 0)
    first_of_class = np.cumsum([0] + [len(class_files) for class_files in files[:-1]])
    for index in first_of_class:  # check one file per class now, not hours into a run
        dataset[(int(index), 0)]
    return dataset


def derived_seed(*numbers):
    """A well-mixed seed from a tuple of integers: (seed, epoch) for the data order, (seed, step,
    rank) for one process's step (its generation orders, label dropout and dropout masks).
    numpy's SeedSequence pads short entropy with zeros, so epoch e's order and rank 0's step e
    start from one seed; they draw different things from it (a permutation of the whole data set;
    a batch's orders and dropout masks), so nothing repeats, and resumed runs of older checkpoints
    stay exact."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


class StepSampler(Sampler):
    """The data order as a pure function of (seed, step): nothing to save, nothing to drift.

    Global sample number g = step * batch + i walks through the data epoch by epoch; epoch e is a
    permutation drawn from (seed, e), and every sample also gets a random `draw` that picks its
    augmentation. So resuming at step s replays exactly the batches an uninterrupted run draws,
    and every process agrees on the global batch. This process yields its slice of each global
    batch as `accum` micro-batches of (index, draw) pairs, forever (the loop counts steps).
    """

    def __init__(self, n_items, batch_size, seed, start_step, rank=0, world_size=1, accum=1):
        self.n_items, self.batch_size, self.seed, self.start_step = n_items, batch_size, seed, start_step
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.epoch, self.order, self.draws = None, None, None

    def epoch_order(self, epoch):
        if epoch != self.epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self.epoch = epoch
            self.order = torch.randperm(self.n_items, generator=generator)               # (n,)
            self.draws = torch.randint(0, 2 ** 31, (self.n_items,), generator=generator)  # (n,)
        return self.order, self.draws

    def global_batch(self, step):
        """The (index, draw) pairs of the whole global batch of `step`."""
        items = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            order, draws = self.epoch_order(g // self.n_items)
            position = g % self.n_items
            items.append((order[position].item(), draws[position].item()))
        return items

    def __iter__(self):
        share = self.batch_size // self.world_size
        micro = share // self.accum
        step = self.start_step
        while True:
            mine = self.global_batch(step)[self.rank * share:(self.rank + 1) * share]
            for i in range(self.accum):
                yield mine[i * micro:(i + 1) * micro]
            step += 1


def worker_in_own_session(_worker_id):
    # Ctrl-C reaches every process of the terminal's process group, and torchrun and schedulers
    # send SIGTERM to a whole group. The main process handles both: it finishes the step and saves.
    # A DataLoader worker that died of the same signal would lose the batch that step waits for, so
    # each worker moves to a session (and process group) of its own. The DataLoader still ends its
    # workers itself, by process id, and a worker whose main process has died exits on its own.
    os.setsid()


# -----------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` is a world of one

def world_from_environment():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup_distributed(device_name):
    rank, world_size, local_rank = world_from_environment()
    device = torch.device(device_name)
    if device.type == "cuda":
        # Under torchrun each process takes the GPU of its local rank; alone, the one asked for.
        device = torch.device("cuda", local_rank if "LOCAL_RANK" in os.environ else device.index or 0)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def check_ranks_agree(model, device):
    """DDP keeps the replicas identical; check it (one float64 sum per tensor, gathered from every rank)."""
    fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)  # (tensors,)
    gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the processes' weights differ: distributed training went out of sync")


# -----------------------------------------------------------------------------
# Optimizer, learning rate, EMA (SPEC 5)

def make_optimizers(model, lr, weight_decay, device, muon_lr=0.0, precision="fp32"):
    """The optimizers of one training step: AdamW, plus Muon for the matrices of the two passes
    when muon_lr > 0 (orthogonalizing in bf16 when the training runs in bf16). Each parameter
    group keeps its peak learning rate as "peak_lr"."""
    muon = [p for p in model.layers.parameters() if p.dim() == 2] if muon_lr > 0 else []
    in_muon = {id(p) for p in muon}
    rest = [p for p in model.parameters() if id(p) not in in_muon]
    # AdamW's weight decay on matrices and embeddings (>= 2 dims) only, never on norm weights. The
    # matrices that Muon trains (the tiny recipe) get none: muon.py applies no weight decay.
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "peak_lr": lr},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": lr}]
    optimizers = [torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, fused=device.type == "cuda")]
    if muon:
        optimizers.append(Muon([{"params": muon, "peak_lr": muon_lr}], lr=muon_lr,
                               dtype=torch.bfloat16 if precision == "bf16" else torch.float32))
    return optimizers


def learning_rate(step, max_steps, peak, minimum, warmup_steps, decay_steps=0):
    """Linear warm-up to `peak`; then, with decay_steps = 0, cosine decay to `minimum` at max_steps
    (the paper's); else `peak` held until the last decay_steps steps, which fall linearly to `minimum`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if decay_steps:
        return minimum + (peak - minimum) * min(1.0, (max_steps - step) / decay_steps)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema, model, decay, step):
    # Early on, a fixed decay of 0.9999 would average mostly the random init: use (1 + t) / (10 + t)
    # until it catches up (0.9 at step 80, 0.99 at step 890, 0.999 at step 8990).
    decay = min(decay, (1 + step) / (10 + step))
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


# -----------------------------------------------------------------------------
# Checkpoints (plain types only, so torch.load(weights_only=True) reads them)

def save_checkpoint(path, model, ema, optimizers, step, loss, args, class_names, warmup_steps, decay_steps):
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": [optimizer.state_dict() for optimizer in optimizers],
        "config": asdict(model.config),
        "step": step,                 # with args["seed"], this is the whole data and RNG state
        "warmup_steps": warmup_steps,  # of the first plan: args["max_steps"] may be a re-planned count
        "decay_steps": decay_steps,    # a late re-plan can shorten it below args["decay"] of the count
        "loss": loss,                 # mean training loss of the last logged steps
        "args": vars(args),
        "class_names": list(class_names),
        "tokenizer": args.tokenizer,  # the decoder for sample.py
        "sampling": {"cfg_scale": args.sample_cfg, "cfg_schedule": args.sample_cfg_schedule,  # sample.py's
                     "schedule": args.sample_schedule, "top_p": args.sample_top_p},          # defaults for it
    }
    if ema is not None:
        checkpoint["ema"] = ema.state_dict()
    save_atomic(checkpoint, path)


def check_matches_data(config, dataset):
    problems = []
    if config.vocab_size != dataset.vocab_size:
        problems.append(f"vocabulary: the model has {config.vocab_size} codes, the tokenizer/data "
                        f"{dataset.vocab_size}")
    if config.num_classes != len(dataset.class_names):
        problems.append(f"classes: the model has {config.num_classes}, the data {len(dataset.class_names)}")
    if config.block_size != dataset.length:
        problems.append(f"tokens per image: the model has {config.block_size}, the data {dataset.length}")
    if problems:
        raise ValueError("the checkpoint does not match the data (" + "; ".join(problems) + "): use the "
                         "tokenizer and data it was trained with, or start afresh without --resume")


# -----------------------------------------------------------------------------
# Sample grids: one row per class, decoded by the tokenizer

def save_sample_grid(model, vq, class_names, path, args, device):
    """One row per class (R rows), args.sample_columns samples (P) in each, written to path."""
    classes = default_classes(class_names)  # sample.py's rows: every class up to 16, else 8 of them
    labels = torch.tensor(classes, device=device).repeat_interleave(args.sample_columns)  # (R*P,)
    generator = torch.Generator(device).manual_seed(args.seed)  # the same noise every time: grids are comparable
    tokens = model.generate(labels, steps=args.sample_steps, cfg_scale=args.sample_cfg,  # (R*P, L)
                            cfg_schedule=args.sample_cfg_schedule, schedule=args.sample_schedule,
                            top_p=args.sample_top_p, generator=generator)
    grid = model.config.grid_size
    images = tensor_to_images(vq.decode(tokens.view(-1, grid, grid)))  # (R*P, H, W, 3)
    images = images.reshape(len(classes), args.sample_columns, *images.shape[1:])  # (R, P, H, W, 3)
    save_image_grid(images, [class_names[c] for c in classes], path)


# -----------------------------------------------------------------------------
# Stopping cleanly

class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (sent by torchrun and cluster schedulers) asks the loop to stop
    after the current step and save; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signum, self.previous[signum])
        # A signal sent to every process of the run ends the DataLoader's workers too, and PyTorch
        # reports a worker's death from a SIGCHLD handler, in whatever line runs then (the saving,
        # say). Once a stop is asked for, that handler goes: a batch that never comes is caught
        # where it is fetched instead (`train`), and a stop between steps needs no more batches.
        self.previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# The training loop

def step_loader(dataset, args, start_step, rank, world_size, device):
    """This process's micro-batches (tokens, labels) from step `start_step` on, forever."""
    sampler = StepSampler(len(dataset), args.batch_size, args.seed, start_step, rank, world_size, args.grad_accum)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda",
                           worker_init_fn=worker_in_own_session))


def optimizer_step(train_model, model, optimizers, loader, args, device, distributed=False):
    """One optimizer step over --grad-accum micro-batches; returns the sum of their losses (a tensor).
    train_model is `model` itself, or its DDP (distributed=True) or compiled wrapper."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    loss_sum = torch.zeros((), device=device)
    for micro in range(args.grad_accum):
        tokens, labels = next(loader)                                     # (B/world/accum, L), (B/world/accum,)
        tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        # DDP averages gradients across processes on the last micro-batch's backward only.
        sync = nullcontext() if not distributed or micro == args.grad_accum - 1 else train_model.no_sync()
        with sync:
            with autocast:
                _, loss = train_model(tokens, labels)
            (loss / args.grad_accum).backward()
        loss_sum += loss.detach()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_sum


def wait_for_device(device):
    """Wait until a GPU has finished the work queued on it (CPU work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throwaway_steps(train_model, model, dataset, args, rank, world_size, device, timed_steps):
    """Seconds per optimizer step of train_model, timed over `timed_steps` steps after one untimed
    step (which also compiles), with optimizers of their own; the weights are then put back, so
    the real run starts from the untouched ones."""
    weights = copy.deepcopy(model.state_dict())
    optimizers = make_optimizers(model, args.lr, args.weight_decay, device, args.muon_lr, args.precision)
    loader = step_loader(dataset, args, 0, rank, world_size, device)
    optimizer_step(train_model, model, optimizers, loader, args, device, world_size > 1)  # first calls are slower
    wait_for_device(device)
    started = time.perf_counter()
    for _ in range(timed_steps):
        optimizer_step(train_model, model, optimizers, loader, args, device, world_size > 1)
    wait_for_device(device)                                               # a GPU may still be running the steps
    seconds_per_step = (time.perf_counter() - started) / max(1, timed_steps)
    model.load_state_dict(weights)
    return seconds_per_step


def compile_or_not(train_model, model, dataset, args, rank, world_size, device, log):
    """torch.compile(train_model), tried on a throwaway step; train_model itself, with a one-line
    warning, where compiling fails (no C++ compiler for the CPU backend, an unsupported platform).

    On the 2-core CPU of the default run, compiling takes 30-80 s cold (51-77 s on the AMD EPYC)
    and makes a tiny step 1.2x faster (290 -> 241 ms in fp32): it fuses the chains of element-wise
    operations (RMSNorm, RoPE, SwiGLU and their gradients) that leave the matrix multiplies only
    60% of an eager step.
    """
    started = time.perf_counter()
    # The compiled step draws its random numbers (orders, label dropout) from torch's generator, as
    # eager does, not from the compiler's own: the same seed trains the same run either way.
    torch._inductor.config.fallback_random = True
    if device.type == "cpu":
        # Without it two compiled runs of one seed drift apart (loss 1.4299 against 1.4292 after 150
        # steps), and --resume would no longer end bit-exact. No slower here.
        torch.use_deterministic_algorithms(True)
    compiled = torch.compile(train_model)
    failure = None
    try:
        # Under torchrun every process compiles on its own, and one may fail where the others do
        # not. So the throwaway step runs without DDP's gradient all-reduce: a failed process is
        # not left out of a collective that the others wait in. They then agree, below.
        with compiled.no_sync() if world_size > 1 else nullcontext():
            throwaway_steps(compiled, model, dataset, args, rank, world_size, device, timed_steps=0)
    except DataError:  # a bad code file that the throwaway step read (a DataLoader worker keeps the class)
        raise
    except Exception as error:  # whatever the compiler stack raises; a real bug raises again in the eager steps
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        failure = f"{type(error).__name__}: {reason[:160]}"
        print(f"warning: torch.compile failed{f' on process {rank}' if world_size > 1 else ''} ({failure}); "
              f"training without it (--no-compile skips the attempt)")
    if world_size > 1:  # all processes compiled, or none: their steps must run the same collectives
        failed_somewhere = torch.tensor(float(failure is not None), device=device)
        dist.all_reduce(failed_somewhere, op=dist.ReduceOp.MAX)
        if failed_somewhere.item() and failure is None:
            failure = "on another process"
            log("warning: torch.compile failed on another process (its own warning says why); all train "
                "without it")
    if failure is not None:
        return train_model
    log(f"torch.compile: {time.perf_counter() - started:.0f} s")
    return compiled


def steps_that_fit(deadline, seconds_per_step, device, distributed):
    """How many more steps of `seconds_per_step` end by `deadline` (time.perf_counter's clock),
    with 5% of the time kept back, 0 if none; the smallest count over the processes, so all
    train the same."""
    steps = torch.tensor(max(0, int(0.95 * (deadline - time.perf_counter()) / seconds_per_step)), device=device)
    if distributed:
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    return steps.item()


def steps_within(minutes, run_started, train_model, model, dataset, args, rank, world_size, device, log,
                 probe_steps=8):
    """The step count that ends the whole run within `minutes` of `run_started` (--total-minutes).

    A few throwaway optimizer steps are timed (`throwaway_steps`: the weights are put back); the
    step count sets the learning-rate schedule, and `train` corrects it from the real steps' pace
    while the learning rate is still at its peak (the probe can be 20% off: 159 ms a step against
    180-199 ms in the loop, bf16 on a 2-core Xeon); the cosine decay (--decay 0) has no such
    plateau, so there the probe's count stands. The final count is saved in the checkpoint
    (--resume continues to it). 5% of the time left is kept back for the sample grids and
    checkpoints. Returns (steps, the deadline on time.perf_counter's clock).
    """
    seconds_per_step = throwaway_steps(train_model, model, dataset, args, rank, world_size, device, probe_steps)
    deadline = run_started + 60 * minutes
    steps = steps_that_fit(deadline, seconds_per_step, device, world_size > 1)  # the same on every process
    if steps == 0:
        raise ValueError(f"--total-minutes {minutes:g} leaves no time for the ARPG: the tokenizer, the data and "
                         f"compiling took {(time.perf_counter() - run_started) / 60:.1f} min; give more minutes, "
                         f"or --max-steps (a tokenizer trained on the way is kept, and a next run skips it)")
    log(f"--total-minutes {minutes:g}: {1000 * seconds_per_step:.0f} ms per step and "
        f"{(deadline - time.perf_counter()) / 60:.1f} min left: {steps} steps")
    return steps, deadline


def train(args, train_model, model, ema, optimizers, dataset, start_step, vq, rank, world_size, device,
          deadline=None, warmup_steps=None, decay_steps=None):
    """Optimizer steps from start_step to args.max_steps, or until stopped; the checkpoint is saved at
    the end. train_model runs the steps: `model` itself, or its DDP or compiled wrapper. With a
    deadline (--total-minutes), args.max_steps is re-planned at each log line while the learning
    rate holds its peak, so the decay still spans the last args.decay of the steps (with the
    cosine decay, --decay 0, never: the cosine falls from the end of the warm-up on, and a new
    step count would bend it mid-way). warmup_steps, decay_steps: a resumed run's, as its checkpoint
    saved them (a re-planned count would give others); else args.warmup and args.decay of
    args.max_steps. Returns (the last step, the last logged loss, whether Ctrl-C / SIGTERM stopped it)."""
    is_main, distributed = rank == 0, world_size > 1
    loader = step_loader(dataset, args, start_step, rank, world_size, device)
    warmup_steps = round(args.warmup * args.max_steps) if warmup_steps is None else warmup_steps
    decay_steps = round(args.decay * args.max_steps) if decay_steps is None else decay_steps
    sampling = vq is not None and is_main
    ema_or_model = ema if ema is not None else model

    stop = StopRequest()
    started = interval_start = time.perf_counter()
    loss_sum, loss_count, last_loss = torch.zeros((), device=device), 0, float("nan")
    step = start_step
    try:
        while step < args.max_steps:
            # Every random number of this step comes from (seed, step, rank), so a resumed run draws
            # the same ones as an uninterrupted run: no RNG state to save.
            torch.manual_seed(derived_seed(args.seed, step, rank))
            lr = learning_rate(step, args.max_steps, args.lr, args.min_lr, warmup_steps, decay_steps)
            for optimizer in optimizers:                                  # each group at its peak's fraction
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * lr / args.lr
            try:
                loss_sum += optimizer_step(train_model, model, optimizers, loader, args, device, distributed)
            except (RuntimeError, EOFError, OSError):  # how a dead worker's batch fails: its exit, a cut pipe
                if not stop.requested or distributed:
                    raise
                # A SIGTERM sent to every process of the run (a scheduler that signals a whole job)
                # also ended the DataLoader's workers, so the next batch never came: stop with the
                # weights of the last full step. (With other processes, this one cannot stop alone.)
                break
            loss_count += args.grad_accum
            if ema is not None:
                update_ema(ema, model, args.ema, step)
            step += 1

            # Stop together: every process must leave the loop at the same step.
            stopping = stop.requested or (args.minutes is not None and time.perf_counter() - started > 60 * args.minutes)
            if distributed:
                flag = torch.tensor(float(stopping), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())

            if step % args.log_every == 0 or step == args.max_steps or stopping:
                if distributed:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
                    loss_count *= world_size
                last_loss = loss_sum.item() / loss_count
                elapsed = time.perf_counter() - interval_start
                n_steps = loss_count / args.grad_accum / world_size
                ms_per_step = 1000 * elapsed / n_steps
                eta_minutes, eta_seconds = divmod(round((args.max_steps - step) * ms_per_step / 1000), 60)
                if is_main:
                    print(f"step {step}/{args.max_steps} | loss {last_loss:.4f} | lr {lr:.2e} | "
                          f"{ms_per_step:.0f} ms/step | {args.batch_size * n_steps / elapsed:.1f} img/s | "
                          f"ETA {eta_minutes}m{eta_seconds:02d}s", flush=True)
                loss_sum.zero_()
                loss_count, interval_start = 0, time.perf_counter()
                holding_peak = decay_steps and warmup_steps <= step < args.max_steps - decay_steps
                if deadline is not None and holding_peak:
                    pace = (time.perf_counter() - started) / (step - start_step)  # seconds a step, pauses included
                    replanned = step + max(1, steps_that_fit(deadline, pace, device, distributed))
                    if abs(replanned - args.max_steps) > 0.01 * args.max_steps:  # not for every flicker of the pace
                        if is_main:
                            print(f"re-planned at {1000 * pace:.0f} ms per step: {replanned} steps fit the time "
                                  f"left (not {args.max_steps})", flush=True)
                        # A decay that would have begun already begins now, from the peak, not half-way down.
                        args.max_steps, decay_steps = replanned, min(round(args.decay * replanned), replanned - step)
            if stopping:
                break
            pause_start = time.perf_counter()  # saving and sampling do not count in ms/step
            if is_main and args.save_every and step % args.save_every == 0 and step < args.max_steps:
                save_checkpoint(args.out, model, ema, optimizers, step, last_loss, args, dataset.class_names,
                                warmup_steps, decay_steps)
            if sampling and args.sample_every and step % args.sample_every == 0 and step < args.max_steps:
                save_sample_grid(ema_or_model, vq, dataset.class_names,
                                 os.path.join(beside(args.out, "_samples"), f"step_{step:06d}.png"), args, device)
            interval_start += time.perf_counter() - pause_start
        if distributed:
            check_ranks_agree(model, device)
        if is_main:  # still under StopRequest: a Ctrl-C now lets this save finish
            save_checkpoint(args.out, model, ema, optimizers, step, last_loss, args, dataset.class_names,
                            warmup_steps, decay_steps)
    finally:
        stop.restore()
    return step, last_loss, stop.requested


# -----------------------------------------------------------------------------
# Putting it together

def cpu_has(feature):
    """Whether this CPU has an instruction set torch checks for ("avx512_bf16", "amx_tile"); False
    where this torch build has no such check."""
    return getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)()


def default_precision(device):
    """bf16 autocast on CUDA (the paper's) and on a CPU with bf16 matrix instructions (AVX-512 BF16
    or AMX tiles); fp32 elsewhere. There bf16 matrix multiplies are much faster than fp32 ones:
    the compiled `tiny` step took 150 ms instead of 286 ms on a 2-core Xeon with AMX, 195-206 ms
    instead of 325-344 ms on a 2-core AMD EPYC with AVX-512 BF16 (the attention is spelled out for
    it: `arpg.attend`), for the same final loss after 1045 steps (0.8875 against 0.8899, Xeon) and
    the same class accuracy (76.3% against 76.9%)."""
    if device.startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has("avx512_bf16") or cpu_has("amx_tile") else "fp32"


def tokenizer_precision(args, device):
    """The ARPG's precision for the small tokenizer too, except on CPUs with AMX. Its convolutions
    in bf16 (quantizer in fp32, `train_tokenizer`) made its step 10-15% faster on a 2-core AMD EPYC
    with AVX-512 BF16 (1200 steps in 166 s instead of 185 s, seed 0) for the same held-out PSNR
    (27.92 / 28.07 dB against 27.77 / 28.01, seeds 0 / 1), but slower than fp32 on an earlier
    session's 2-core Xeon with AMX (EXPERIMENTS.md, *Tried and not kept*)."""
    return "fp32" if device.type == "cpu" and cpu_has("amx_tile") else args.precision


def tokenizer_minutes(total_minutes):
    """The tokenizer's share of a timed run: TOKENIZER_MINUTES of the tiny recipe's 9.5 minutes."""
    return TOKENIZER_MINUTES * min(1.0, total_minutes / RECIPES["tiny"]["total_minutes"])


def is_timed(args):
    """Whether the run has a time budget (--total-minutes) rather than a step count (--max-steps)."""
    return args.max_steps is None and args.total_minutes > 0


def model_layers(args, preset, device):
    """--layers, else the preset's depth, except for a timed tiny run in fp32 on a CPU, where
    steps are dear: FP32_CPU_TINY_LAYERS (see there)."""
    if args.layers is not None:
        return args.layers
    if args.size == "tiny" and args.precision == "fp32" and device.type == "cpu" and is_timed(args):
        return FP32_CPU_TINY_LAYERS
    return preset.n_layer


def check_vocab_size(args, codebook_size, tokenizer):
    if args.vocab_size is not None and args.vocab_size != codebook_size:
        raise ValueError(f"--vocab-size {args.vocab_size} does not match {tokenizer} ({codebook_size} codes)")


def check_sample_steps(args, tokens_per_image):
    if args.sample_steps > tokens_per_image:  # refused before training, not at the first grid
        raise ValueError(f"--sample-steps {args.sample_steps} is more than the {tokens_per_image} tokens of an image")


def check_layers(layers, size):
    """Refuse a --layers that the preset cannot split into its two passes: Pass 1 keeps the preset's
    share (tiny: 2 blocks; L, XL, XXL: half of them), and Pass 2 needs at least one block."""
    pass1 = ARPG_PRESETS[size].pass1_layers
    if pass1 is None and layers % 2:
        raise ValueError(f"--layers {layers}: {size} splits its blocks half and half between the two passes, "
                         f"so give an even number")
    least = (pass1 or 1) + 1
    if layers < least:
        raise ValueError(f"--layers must be at least {least} for {size} ({pass1 or 1} for Pass 1, at least one "
                         f"for Pass 2), got {layers}")


def fill_in_defaults(args, world_size):
    """Resolve the None flags from the recipe of --size (all but --max-steps, which needs the data
    and the model, and --layers, which needs the device: main), then check them: before any
    process group or file exists."""
    recipe = RECIPES["tiny" if args.size == "tiny" else "paper"]
    for key, value in recipe.items():
        if key not in ("lr", "min_lr") and getattr(args, key) is None:  # those two scale with the batch: below
            setattr(args, key, value)
    if args.lr is None:
        args.lr = recipe["lr"] or PAPER_LR_PER_256 * args.batch_size / 256
    if args.min_lr is None:
        args.min_lr = recipe["min_lr"] if recipe["min_lr"] is not None else PAPER_MIN_LR_PER_256 * args.batch_size / 256
    check_device(args.device)
    args.precision = args.precision or default_precision(args.device)
    if args.workers is None:  # processes that read files in the background; the built-in data is in memory
        args.workers = 0 if args.data is None else min(4, max(1, (os.cpu_count() or 1) // world_size))
    for key, value in vars(args).items():  # nan fails every comparison below, so it would pass them all
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
    at_least = {"batch_size": 1, "grad_accum": 1, "max_steps": 1, "num_images": 1, "tokenizer_steps": 1,
                "vocab_size": 1, "image_size": 1, "sample_steps": 1, "sample_columns": 1, "log_every": 1,
                "save_every": 0, "sample_every": 0, "workers": 0, "total_minutes": 0, "muon_lr": 0,
                "min_lr": 0, "weight_decay": 0, "grad_clip": 0, "seed": 0}
    for key, least in at_least.items():
        if getattr(args, key) is not None and getattr(args, key) < least:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {least}, got {getattr(args, key)}")
    if args.seed >= 2 ** 64:                                              # what torch.manual_seed takes
        raise ValueError(f"--seed must fit in 64 bits, got {args.seed}")
    if args.data is None:  # the built-in shapes' own flags: their defaults
        args.num_images = BUILTIN_IMAGES if args.num_images is None else args.num_images
        args.tokenizer_steps = TOKENIZER_STEPS if args.tokenizer_steps is None else args.tokenizer_steps
        if args.num_images < len(CLASS_NAMES):  # labels cycle through the classes
            raise ValueError(f"--num-images {args.num_images} leaves classes of the built-in shapes without an "
                             f"image: give at least {len(CLASS_NAMES)}")
    elif args.num_images is not None:  # with --data: refused, not silently ignored
        raise ValueError(f"--num-images sizes the built-in shapes dataset, and --data {args.data} brings its own "
                         f"images: drop --num-images")
    elif args.tokenizer_steps is not None:
        raise ValueError(f"--tokenizer-steps trains the built-in shapes' tokenizer; for --data {args.data}, train "
                         f"one with tokenizer.py --train and pass it with --tokenizer")
    if args.layers is not None:
        check_layers(args.layers, args.size)
    for key in ("minutes", "lr"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ValueError(f"--{key} must be positive, got {getattr(args, key)}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr:g} is above the peak learning rate {args.lr:g}: the decay would "
                         f"rise; pick a --min-lr of at most {args.lr:g}")
    if not (0 <= args.ema < 1 and 0 <= args.dropout < 1):
        raise ValueError(f"--ema {args.ema} and --dropout {args.dropout} must be in [0, 1)")
    if args.batch_size % (world_size * args.grad_accum):
        raise ValueError(f"global batch {args.batch_size} does not split evenly over {world_size} processes x "
                         f"{args.grad_accum} accumulation steps: pick a multiple of {world_size * args.grad_accum}")
    if not (0 <= args.warmup < 1 and 0 <= args.decay < 1 and args.warmup + args.decay <= 1):
        raise ValueError(f"--warmup {args.warmup} and --decay {args.decay} must be fractions of the run in [0, 1) "
                         f"that add up to at most 1")
    try:  # the grids' sampling settings, refused now rather than at the first grid
        check_decoding(args.sample_schedule, args.sample_cfg_schedule, 1.0, 0, args.sample_top_p, args.sample_cfg)
    except ValueError as error:
        raise ValueError(f"--sample-cfg / --sample-top-p: {error}") from None
    if args.resume and not os.path.isfile(args.out):
        raise FileNotFoundError(f"nothing to resume: {args.out} not found (drop --resume to start afresh)")
    check_output_path(args.out)                                           # before the work, not after it
    if args.data is None:
        if args.image_size is not None:
            raise ValueError("--image-size applies to a folder of images; the built-in shapes are 64 x 64: drop it")
        args.tokenizer = args.tokenizer or BUILTIN_TOKENIZER
        if not os.path.isfile(args.tokenizer) and not args.resume:       # (a resumed run's must exist: main)
            check_output_path(args.tokenizer, "--tokenizer")             # a tokenizer will be trained there
            # It will be the small preset, so flags that clash with it are refused now, not after
            # minutes of training it: its codes, and its tokens on the 64 x 64 built-in shapes.
            small = VQ_PRESETS["small"]
            check_vocab_size(args, small.codebook_size, f"the small tokenizer to be trained at {args.tokenizer}")
            check_sample_steps(args, (64 // small.downsample) ** 2)
    if args.tokenizer and os.path.realpath(args.tokenizer) == os.path.realpath(args.out):
        raise ValueError(f"--out {args.out} is the tokenizer's file, which the ARPG checkpoint would overwrite: "
                         f"give --out another name")


def read_run_checkpoint(path):
    """The checkpoint of a train.py run and its model's config, to resume: refused in one line when
    it is another kind (a tokenizer, an official release, a file saved by hand), which holds no run
    to continue, or when its config has settings this version of arpg.py does not know."""
    checkpoint = read_checkpoint(path)
    missing = [key for key in ("model", "config", "optimizer", "step", "args") if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of train.py (no {', '.join(missing)} in it), so there is "
                         f"no run to resume: drop --resume, or give the --out of a train.py run")
    return checkpoint, config_from_dict(ARPGConfig, checkpoint["config"], path)


# What a resumed run must keep to continue the same run bit for bit: the data and the order it is
# read in (with the step, the seed sets every random draw), and the optimization. Free to change:
# --max-steps (to train longer), and how the run is executed and logged (device, workers, compile,
# logging, sampling, saving); the model's shape is checked against the checkpoint's config.
RESUME_KEEPS = ("size", "data", "tokenizer", "vocab_size", "image_size", "num_images", "seed", "batch_size",
                "grad_accum", "lr", "min_lr", "muon_lr", "warmup", "decay", "weight_decay", "grad_clip", "ema",
                "dropout", "precision")


def check_same_run(args, saved_args):
    """Refuse a --resume whose run-defining flags differ from those the checkpoint was trained with."""
    def same(key):
        now, then = getattr(args, key), saved_args[key]
        if key in ("data", "tokenizer") and now is not None and then is not None:  # one path, however written
            return os.path.realpath(now) == os.path.realpath(then)
        if key == "num_images" and args.data is not None:  # it sizes the built-in data only; older
            return True                                     # train.py saved its default, 20000, for --data too
        return now == then
    if args.max_steps is None and "max_steps" not in saved_args:
        raise ValueError(f"{args.out} does not say how many steps its run planned (an older train.py wrote it): "
                         f"give --resume the --max-steps to train to")
    changed = [key for key in RESUME_KEEPS if key in saved_args and not same(key)]
    if changed:
        raise ValueError(f"--resume continues {args.out} with the settings it was trained with, but "
                         + ", ".join(f"--{key.replace('_', '-')} is {getattr(args, key)} (was {saved_args[key]})"
                                     for key in changed)
                         + ": give the flags of the run you resume")


def main(argv=None):
    run_started = time.perf_counter()                                     # --total-minutes counts from here
    args = parse_args(argv)
    fill_in_defaults(args, world_from_environment()[1])
    rank, world_size, device = setup_distributed(args.device)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    if args.precision == "bf16" and device.type == "cpu" and default_precision("cpu") == "fp32":
        log("warning: --precision bf16 on a CPU without bf16 matrix instructions (AVX-512 BF16, AMX): emulated, "
            "and many times slower than fp32, the default here (3.5 s against 0.14 s a batch-8 step on an AVX2 EPYC)")
    # The recipe, said before minutes of tokenizer, data and compiling (the model and its step count
    # follow them).
    log(f"{args.size} on {world_size} process(es) ({device.type}): " + ", ".join(
        f"{k}={getattr(args, k)}" for k in ("batch_size", "grad_accum", "lr", "muon_lr", "min_lr", "warmup", "decay",
                                            "weight_decay", "grad_clip", "ema", "dropout", "precision", "compile",
                                            "seed")))
    preset = ARPG_PRESETS[args.size]
    checkpoint, saved_config = read_run_checkpoint(args.out) if args.resume else (None, None)  # before the data
    if checkpoint is not None:
        check_same_run(args, checkpoint["args"])
        if args.tokenizer and not os.path.isfile(args.tokenizer):  # a new one's codes would mean nothing to the model
            raise FileNotFoundError(f"the tokenizer {args.tokenizer} that {args.out} was trained with is missing: "
                                    f"put it back there (a new one would give other codes)")
        planned = checkpoint["args"]["max_steps"] if args.max_steps is None else args.max_steps
        if checkpoint["step"] >= planned:  # refused before any work, and nothing rewritten
            raise ValueError(f"{args.out} is already trained for {checkpoint['step']} steps, and --resume would "
                             f"stop at {planned}: raise --max-steps above {checkpoint['step']} to train longer")

    # 1. The tokenizer: trained on the built-in shapes when there is none (by one process).
    if args.data is None:
        if not os.path.isfile(args.tokenizer):
            if is_main:
                images, _ = make_builtin_dataset(min(args.num_images, TRAINING_IMAGES), seed=args.seed)
                minutes = tokenizer_minutes(args.total_minutes) if is_timed(args) else None  # the ARPG gets the rest
                budget = f" or {minutes:.2g} minutes, whichever ends first" if minutes else ""
                log(f"no tokenizer at {args.tokenizer}: training the small one on {len(images)} built-in images "
                    f"({args.tokenizer_steps} steps{budget})")
                train_tokenizer(images, VQ_PRESETS["small"], args.tokenizer, max_steps=args.tokenizer_steps,
                                minutes=minutes, seed=args.seed, device=device.type,
                                precision=tokenizer_precision(args, device),
                                preview_path=beside(args.tokenizer, "_recon.png"))
        elif not args.resume:  # said, so that --tokenizer-steps is not silently ignored
            log(f"tokenizer: {args.tokenizer}, trained before (delete it, or give another --tokenizer, to train a "
                f"new one with --tokenizer-steps {args.tokenizer_steps})")
        if world_size > 1:  # every process, whatever it saw: the others wait for rank 0's file
            dist.barrier()
    vq = VQModel.from_checkpoint(args.tokenizer).to(device).eval() if args.tokenizer else None
    if vq is not None:
        check_vocab_size(args, vq.config.codebook_size, f"the tokenizer {args.tokenizer}")

    # 2. The data, as token grids.
    started = time.perf_counter()
    dataset = build_dataset(args, vq, preset, device)
    log(f"data: {len(dataset)} images of {dataset.length} tokens, {len(dataset.class_names)} classes, "
        f"codes < {dataset.vocab_size} ({time.perf_counter() - started:.1f}s)")
    if vq is None:
        log("no --tokenizer: no sample grids while training (sample.py --vq-ckpt draws them from the checkpoint)")
    else:
        check_sample_steps(args, dataset.length)

    # 3. The model: the preset with the data's vocabulary, classes and grid, or the checkpoint's.
    if args.resume:
        config = saved_config
        check_matches_data(config, dataset)
        if args.layers not in (None, config.n_layer):
            raise ValueError(f"--layers {args.layers}, but {args.out} has {config.n_layer} blocks: drop --layers "
                             f"to resume it, or start afresh without --resume")
    else:
        if os.path.isfile(args.out):
            log(f"{args.out} exists: this run will replace it (--resume continues it instead)")
        n_layer = model_layers(args, preset, device)
        if n_layer != preset.n_layer:
            log(f"{args.size} with {n_layer} blocks instead of the preset's {preset.n_layer}"
                + ("" if args.layers else " (fp32 on a CPU: train.FP32_CPU_TINY_LAYERS)"))
        config = replace(preset, n_layer=n_layer, vocab_size=dataset.vocab_size, num_classes=len(dataset.class_names),
                         block_size=dataset.length, token_dropout_p=args.dropout, resid_dropout_p=args.dropout,
                         ffn_dropout_p=args.dropout)
    torch.manual_seed(args.seed)
    model = ARPG(config).to(device)
    ema = ARPG(config).to(device).requires_grad_(False) if args.ema > 0 else None
    optimizers = make_optimizers(model, args.lr, args.weight_decay, device, args.muon_lr, args.precision)
    start_step, resumed_warmup_steps, resumed_decay_steps = 0, None, None
    if args.resume:
        load_strict(model, checkpoint["model"], f"model in {args.out}")
        saved = checkpoint["optimizer"]
        saved = [saved] if isinstance(saved, dict) else saved             # checkpoints from before Muon: AdamW only
        if len(saved) != len(optimizers):
            raise ValueError(f"{args.out} was trained with {'AdamW alone' if len(saved) == 1 else 'Muon and AdamW'}; "
                             f"resume it with the --muon-lr it started with (0 means AdamW alone)")
        for optimizer, state in zip(optimizers, saved):
            optimizer.load_state_dict(state)
        start_step = checkpoint["step"]
        if ema is not None:
            load_strict(ema, checkpoint.get("ema", checkpoint["model"]), f"EMA in {args.out}")
        saved_max_steps = checkpoint["args"].get("max_steps")             # older files lack one or both
        resumed_warmup_steps = checkpoint.get("warmup_steps")
        resumed_decay_steps = checkpoint.get("decay_steps")
        del checkpoint  # its weights and optimizer state are loaded: free the host memory for the run
    elif ema is not None:
        ema.load_state_dict(model.state_dict())
    # The model's one buffer, its RoPE table, is computed alike by every process and never changes:
    # no broadcast of it before each forward (and no collective a failed compile could skip).
    train_model = DistributedDataParallel(model, broadcast_buffers=False) if world_size > 1 else model
    if args.compile:
        train_model = compile_or_not(train_model, model, dataset, args, rank, world_size, device, log)
    deadline = None                                                       # set by --total-minutes
    if args.max_steps is None:                                            # the length of the schedule
        if args.resume:
            args.max_steps = saved_max_steps                              # the one it was saved with
        elif is_timed(args):
            args.max_steps, deadline = steps_within(args.total_minutes, run_started, train_model, model, dataset,
                                                    args, rank, world_size, device, log)
        else:
            args.max_steps = math.ceil(PAPER_EPOCHS * len(dataset) / args.batch_size)
    if args.resume and args.max_steps != saved_max_steps:                 # trained longer: --decay of the new count
        resumed_decay_steps = None
    log(f"model: {config}")
    log(f"{sum(p.numel() for p in model.parameters()):,} parameters, {args.max_steps} steps")
    if start_step:
        log(f"resuming {args.out} at step {start_step}")

    # 4. Train, save, and show samples.
    started = time.perf_counter()
    step, loss, interrupted = train(args, train_model, model, ema, optimizers, dataset, start_step, vq, rank,
                                    world_size, device, deadline=deadline, warmup_steps=resumed_warmup_steps,
                                    decay_steps=resumed_decay_steps)
    if world_size > 1:
        log(f"weights identical on all {world_size} processes")
        dist.destroy_process_group()
    minutes = (time.perf_counter() - started) / 60
    if step < args.max_steps:
        log(f"stopped at step {step}/{args.max_steps} after {minutes:.1f} min; saved {args.out} "
            f"(continue with --resume)")
        return 130 if interrupted else 0
    log(f"done: {step} steps, {minutes:.1f} min of training, final loss {loss:.4f}; saved {args.out}")
    if vq is not None and is_main:
        path = beside(args.out, "_samples.png")
        save_sample_grid(ema if ema is not None else model, vq, dataset.class_names, path, args, device)
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_script(main)
