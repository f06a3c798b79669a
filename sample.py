"""
Sample from a trained ARPG: class grids, FID files, zero-shot edits, the decoding, a quality check.

Paper: randomized parallel decoding (Sec. 3.1, Alg. 1; SPEC 6) reveals the image tokens in a
random order, many per step; zero-shot editing (Sec. 3.2; SPEC 7) prefills Pass 1 with the
tokens that are known and decodes only the others. Both are `ARPG.generate` in arpg.py; this
script loads the checkpoints, turns images and masks into tokens and tokens into pictures.

After `python train.py` (built-in shapes, CPU; seconds each, --eval about two minutes):
    python sample.py --steps 32                        # out/sample_grid.png, one row per class
    python sample.py --edit inpaint --box 16 16 48 48  # out/edit_inpaint.png: input | mask | results
    python sample.py --edit class-edit --box 8 8 56 56 # a circle's centre redrawn as each other class
    python sample.py --edit outpaint --extend 0 0 0 4  # 4 more token columns on the right
    python sample.py --edit expand --grid 16 16        # 128x128 from a model trained on 64x64
    python sample.py --show-decoding                   # out/decoding.png: the canvas step by step
    python sample.py --eval 8 16 32                    # accuracy, Frechet distance, inpainting vs real
    python sample.py --fid 1000                        # out/fid_1000.npz, arr_0 uint8 (1000, 64, 64, 3)

Official weights (ImageNet 256x256; where to get them: README), one GPU:
    python sample.py --ckpt arpg_300m.pt --vq-ckpt vq_ds16_c2i.pt --steps 64 --cfg 5.0
    python sample.py --ckpt arpg_300m.pt --vq-ckpt vq_ds16_c2i.pt --steps 64 --cfg 5.0 \
        --fid 50000 --batch-size 250                   # then the ADM evaluator on out/fid_50000.npz
    python sample.py --ckpt arpg_300m.pt --vq-ckpt vq_ds16_c2i.pt --steps 64 --cfg 5.0 \
        --edit inpaint --image dog.png --mask hole.png --classes 207
"""

import argparse
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import evaluate
from arpg import ARPG, check_device, read_checkpoint
from data import (CLASS_NAMES, atomic_output, check_classes, check_image_path, check_output_path, default_classes,
                  make_builtin_dataset, read_image, run_script, save_image_grid)
from schedules import (CFG_SCHEDULES, MASK_SCHEDULES, SAMPLING_DEFAULTS, check_decoding, default_steps,
                       reveal_counts, sampling_settings)
from tokenizer import VQModel, tensor_to_images

EDIT_MODES = ["inpaint", "class-edit", "outpaint", "expand"]
EMPTY_GREY = 128  # what the input panel shows where nothing was given


# -----------------------------------------------------------------------------
# Arguments

def add_checkpoint_arguments(group):
    """--ckpt, --vq-ckpt and --no-ema, as load_models reads them (export.py takes the same ones)."""
    group.add_argument("--ckpt", default="out/arpg.pt",
                       help="ARPG checkpoint: ours (train.py) or an official file (arpg_300m.pt, ...)")
    group.add_argument("--vq-ckpt", default=None,
                       help="VQ tokenizer checkpoint (default: the one the ARPG checkpoint was trained with, as "
                            "train.py records it); LlamaGen's vq_ds16_c2i.pt for the official weights")
    group.add_argument("--no-ema", action="store_true",
                       help="use the trained weights even when the checkpoint also holds an EMA copy "
                            "(default: the EMA weights when present)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser.add_argument_group("checkpoints"))

    what = parser.add_argument_group("what to draw")
    what.add_argument("--classes", type=int, nargs="+", default=None,
                      help="class ids, one row each (default: every class of a model with up to 16, else 8 "
                           "ImageNet showcase classes for a 1000-class model, else 8 spread over the ids; --fid: "
                           "every class; inpaint/outpaint: the input image's class; class-edit: every other class)")
    what.add_argument("--per-class", type=int, default=None, help="samples per class (columns; default 8)")
    what.add_argument("--seed", type=int, default=0,
                      help="seeds the generation orders and the sampling: same seed, device and batch size, "
                           "same images")
    what.add_argument("--out", default=None,
                      help="output file (default: out/sample_grid.png, out/fid_N.npz, out/edit_MODE.png, "
                           "out/decoding.png, out/eval.md)")

    decoding = parser.add_argument_group("decoding (SPEC 6)")
    decoding.add_argument("--steps", type=int, default=None,
                          help="decoding steps for a whole canvas, 1..its tokens (default 32, or one per token on a "
                               "grid of fewer; paper: 64, and 32 is as good); an edit keeps the tokens per step that "
                               "--steps gives its whole canvas: fewer steps for fewer unknown tokens, more tokens per "
                               "step on a larger canvas")
    decoding.add_argument("--cfg", type=float, default=None,
                          help="classifier-free guidance scale (default: the checkpoint's, 2.5 for the tiny recipe, "
                               "else 4; 1: off; official ARPG-L: 5.0, XL: 6.0, XXL: 7.5)")
    decoding.add_argument("--cfg-schedule", default=None, choices=list(CFG_SCHEDULES),
                          help="linear: guidance grows from 1 to --cfg as the canvas fills (the paper's); constant: "
                               "always --cfg (default: the checkpoint's, constant for the tiny recipe, else linear)")
    decoding.add_argument("--schedule", default=None, choices=list(MASK_SCHEDULES),
                          help="how many tokens each step reveals (arccos: few early, many late, the paper's; cosine: "
                               "one at a time for longer, fewer at the end; default: the checkpoint's, cosine for the "
                               "tiny recipe, else arccos)")
    decoding.add_argument("--temperature", type=float, default=1.0,
                          help="sampling temperature (0: nearly greedy, 1e-5 as in the official code; --top-k 1 is "
                               "greedy)")
    decoding.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0: all)")
    decoding.add_argument("--top-p", type=float, default=None,
                          help="nucleus sampling threshold (default: the checkpoint's, 0.8 for the tiny recipe; "
                               "1: off, the paper's and official checkpoints')")
    decoding.add_argument("--sampler", default="fast", choices=["fast", "readable"],
                          help="fast: preallocated caches and flat code (arpg.StaticCachePasses), 0.9-1.3x "
                               "on a 2-core CPU (bench.py); readable: the reference loop. In float32 both give the "
                               "same tokens but for rare near ties")
    decoding.add_argument("--compile", action="store_true",
                          help="compile the fast sampler's steps (torch.compile): a few minutes of compiling for "
                               "fewer kernel launches per step, for long runs (--fid, --eval) on a GPU; no faster "
                               "on a 2-core CPU")

    modes = parser.add_argument_group("modes (default: an image grid)").add_mutually_exclusive_group()
    modes.add_argument("--fid", type=int, default=None, metavar="N",
                       help="write N samples, classes balanced, as the .npz the ADM FID evaluator reads")
    modes.add_argument("--edit", default=None, choices=EDIT_MODES,
                       help="zero-shot editing (SPEC 7): inpaint a masked region; class-edit: inpaint under "
                            "other labels; outpaint: a larger canvas around the image; expand: a larger "
                            "canvas from the class alone")
    modes.add_argument("--show-decoding", action="store_true",
                       help="a picture of the decoding itself: one row per class, the canvas after about 1/32, "
                            "1/16, ..., 1/2, 3/4 of --steps (grey: not decoded yet), the finished image last; "
                            "out/decoding.png")
    modes.add_argument("--eval", type=int, nargs="*", default=None, metavar="STEPS",
                       help="built-in shapes only: class accuracy, Frechet distance and inpainting class-keeping "
                            "of samples at these step counts (default: --steps), next to real images")

    editing = parser.add_argument_group("editing inputs")
    editing.add_argument("--image", default=None,
                         help="image to edit (PNG/JPEG; sides must be multiples of the tokenizer's factor); "
                              "default: a built-in shape image")
    editing.add_argument("--image-class", type=int, default=None,
                         help="class of the input image: picks the built-in image (default 0) and is the "
                              "label for inpaint/outpaint unless --classes is given")
    editing.add_argument("--image-index", type=int, default=None,
                         help="which built-in image of that class, when there is no --image (0-999, default 0; "
                              "drawn in sequence, so low ones are quickest)")
    editing.add_argument("--mask", default=None,
                         help="mask image of the input's size: white = regenerate, black = keep (inpaint, class-edit)")
    editing.add_argument("--box", type=int, nargs=4, default=None, metavar=("X0", "Y0", "X1", "Y1"),
                         help="pixel box to regenerate, x0 <= x < x1, y0 <= y < y1 (default: the centre, half "
                              "the width and height)")
    editing.add_argument("--extend", type=int, nargs=4, default=None, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                         help="outpaint: token rows/columns added on each side (default: a quarter of the "
                              "grid on every side)")
    editing.add_argument("--grid", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                         help="expand: the token grid to decode (default: twice the training grid's side)")

    run = parser.add_argument_group("how to run")
    run.add_argument("--batch-size", type=int, default=64, help="images per generate() call")
    run.add_argument("--eval-samples", type=int, default=None,
                     help="--eval: generated images per step count, and real images per reference set (default 1000)")
    run.add_argument("--classifier", default=None,
                     help="--eval: the cached evaluation classifier (trained on real built-in images if missing; "
                          f"default {evaluate.DEFAULT_CLASSIFIER})")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="ARPG's weights and activations (bfloat16: the paper's GPU setting); the tokenizer "
                          "always decodes in float32")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# Loading the two checkpoints, and checking that they belong together

def load_models(args):
    """(ARPG in eval mode, VQ tokenizer in eval mode, class names, a one-line description, and the
    sampling defaults the checkpoint names, over SAMPLING_DEFAULTS)."""
    if not os.path.exists(args.ckpt):  # a folder is refused by read_checkpoint
        raise FileNotFoundError(f"ARPG checkpoint not found: {args.ckpt} (train one with `python train.py`, "
                                f"or pass --ckpt)")
    checkpoint = read_checkpoint(args.ckpt)
    use_ema = isinstance(checkpoint.get("ema"), dict) and not args.no_ema
    # An EMA copy is loaded like any checkpoint: its weights, with the same config.
    model = ARPG.from_checkpoint({"model": checkpoint["ema"], "config": checkpoint.get("config")} if use_ema
                                 else checkpoint)
    config = model.config

    # The tokenizer the checkpoint names (train.py records it), never a guess: a model trained on
    # pre-tokenized codes, or an official release, names none, and out/tokenizer.pt (the default
    # run's) would decode its codes into noise without a word.
    vq_path = args.vq_ckpt or checkpoint.get("tokenizer")
    if vq_path is None:
        raise ValueError(f"{args.ckpt} does not name the tokenizer its codes come from (trained on pre-tokenized "
                         f"codes, or an official release): pass it with --vq-ckpt")
    if not os.path.exists(vq_path):
        raise FileNotFoundError(f"tokenizer checkpoint not found: {vq_path} (pass --vq-ckpt)")
    vq = VQModel.from_checkpoint(vq_path)
    if vq.config.codebook_size != config.vocab_size:
        raise ValueError(f"the ARPG checkpoint {args.ckpt} models {config.vocab_size} codes but the tokenizer "
                         f"{vq_path} has {vq.config.codebook_size}: pass the tokenizer it was trained with (--vq-ckpt)")

    names = checkpoint.get("class_names") or [str(c) for c in range(config.num_classes)]
    if len(names) != config.num_classes:
        raise ValueError(f"{args.ckpt} lists {len(names)} class names for {config.num_classes} classes")
    dtype = getattr(torch, args.dtype)
    model = model.to(args.device, dtype).eval()
    vq = vq.to(args.device).eval()
    side = config.grid_size * vq.downsample
    description = (f"ARPG {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
                   f"({'EMA' if use_ema else 'trained'} weights, {args.dtype}), {config.num_classes} classes, "
                   f"{config.grid_size}x{config.grid_size} tokens | tokenizer {vq.config.codebook_size} codes, "
                   f"{vq.downsample}x downsampling -> {side}x{side} images")
    return model, vq, names, description, {**SAMPLING_DEFAULTS, **checkpoint.get("sampling", {})}


def is_builtin(names):
    """Was this model trained on the built-in shapes (data.py)? Then real images can be drawn for it."""
    return list(names) == CLASS_NAMES


# -----------------------------------------------------------------------------
# Generating images in batches (one loop for grids, FID files, edits and evaluation)

@dataclass
class Canvas:
    """What to decode: a token grid, and the tokens that are given (zero-shot editing, SPEC 7)."""
    grid: tuple                       # (rows, cols) tokens
    known_tokens: torch.Tensor = None  # (1 or N, rows*cols) codes, read only where known_mask is True
    known_mask: torch.Tensor = None    # (rows*cols,) bool, True = given; one mask for the whole batch

    @property
    def n_unknown(self):
        rows, cols = self.grid
        return rows * cols - (0 if self.known_mask is None else int(self.known_mask.sum()))


def edit_steps(steps, canvas):
    """Steps for the canvas's unknown tokens at the parallelism of `steps` steps for a full canvas.

    `--steps 32` on 64 tokens reveals 2 per step on average; inpainting 16 of them then takes 8
    steps, not 32 (which would be more steps than tokens).
    """
    rows, cols = canvas.grid
    return min(canvas.n_unknown, max(1, round(steps * canvas.n_unknown / (rows * cols))))  # at least 1 token a step


def generate_batches(model, vq, labels, canvas, steps, settings, generator, batch_size):
    """Yield (tokens (b, rows*cols), uint8 images (b, H, W, 3)) for labels (N,), batch by batch."""
    rows, cols = canvas.grid
    device = model.embeddings.weight.device
    for start in range(0, len(labels), batch_size):
        batch = labels[start:start + batch_size].to(device)
        known = {}
        if canvas.known_mask is not None:
            known_tokens = canvas.known_tokens.expand(len(labels), -1)[start:start + batch_size]  # (b, L)
            known = dict(known_tokens=known_tokens.to(device), known_mask=canvas.known_mask.expand(len(batch), -1))
        tokens = model.generate(batch, steps=steps, generator=generator, grid=(rows, cols), **known, **settings)
        images = tensor_to_images(vq.decode(tokens.view(-1, rows, cols)))  # (b, rows*f, cols*f, 3)
        yield tokens, images


def generate_images(model, vq, labels, canvas, steps, settings, generator, batch_size):
    """(tokens (N, L), uint8 images (N, H, W, 3)) for labels (N,)."""
    tokens, images = zip(*generate_batches(model, vq, labels, canvas, steps, settings, generator, batch_size))
    return torch.cat(tokens), np.concatenate(images)


# -----------------------------------------------------------------------------
# FID sample files: the .npz of the ADM evaluator (SPEC 8), streamed to disk

def write_fid_npz(path, batches, n, image_shape, labels):
    """Write uint8 batches to `path` (an .npz) as arr_0 (n, H, W, 3) and labels (n,), one batch at a time.

    50,000 ImageNet samples are 9.8 GB: instead of stacking them in memory for np.savez, the
    array is written straight into the zip entry that np.load reads (an .npy header, then the
    raw bytes). The ADM evaluator only reads arr_0; the labels are for evaluate.py.
    """
    with atomic_output(path, ".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (n, *image_shape)}
            np.lib.format.write_array_header_1_0(entry, header)
            for images in batches:
                entry.write(np.ascontiguousarray(images).tobytes())
        with archive.open("labels.npy", "w") as entry:
            np.lib.format.write_array(entry, np.asarray(labels, dtype=np.int64))


# -----------------------------------------------------------------------------
# Zero-shot editing (paper Sec. 3.2, SPEC 7): images and masks -> a canvas of known tokens
#
# A pixel mask says which pixels to regenerate; the model works on tokens, one per f x f patch.
# A token is KEPT only if all its pixels are kept: a token that covers any masked pixel is
# regenerated. A token's code describes its whole patch, so keeping a half-masked token would
# keep (a blurred version of) exactly what the user asked to remove. The mask panel of the
# output shows these token-level regions, i.e. what was really regenerated.

def load_image(path, mode="RGB", what="image"):
    """An image file -> uint8 (H, W, 3), or (H, W) with mode "L"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return np.asarray(read_image(path, mode, what))


def check_image_size(image, factor):
    height, width = image.shape[:2]
    if height % factor or width % factor:
        raise ValueError(f"the image is {width}x{height} pixels, not a multiple of the tokenizer's downsampling factor "
                         f"{factor}: crop or resize it (e.g. to {width // factor * factor or factor}x"
                         f"{height // factor * factor or factor})")


def regenerate_pixels(shape, mask_path=None, box=None):
    """The pixels to regenerate, bool (H, W): white pixels of a mask image, or a box (default: the centre)."""
    height, width = shape
    if mask_path is not None:
        mask = load_image(mask_path, "L", "mask") >= 128
        if mask.shape != (height, width):
            raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                             f"{width}x{height}: they must have the same size")
        return mask
    x0, y0, x1, y1 = box if box is not None else (width // 4, height // 4, width - width // 4, height - height // 4)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"--box {x0} {y0} {x1} {y1} must satisfy 0 <= x0 < x1 <= {width} and "
                         f"0 <= y0 < y1 <= {height} (the image is {width}x{height})")
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def token_mask(pixel_mask, factor):
    """bool (H, W) pixels to regenerate -> bool (H/f, W/f) tokens to regenerate (any pixel of the patch)."""
    height, width = pixel_mask.shape
    patches = pixel_mask.reshape(height // factor, factor, width // factor, factor)  # (h, f, w, f)
    return patches.any(axis=(1, 3))                                                   # (h, w)


def patch_pixels(tokens, factor):
    """bool (h, w) tokens -> bool (h*f, w*f) pixels: each token's whole f x f patch (token_mask's inverse)."""
    return np.kron(tokens, np.ones((factor, factor), dtype=bool))


def inpaint_canvas(codes, regenerate):
    """Keep the tokens outside the region: codes (N, h, w), regenerate bool (h, w) -> Canvas."""
    _, h, w = codes.shape
    return Canvas((h, w), codes.flatten(1), torch.from_numpy(~regenerate).flatten())  # (N, L), (L,)


def outpaint_canvas(codes, extend):
    """Place codes (N, h, w) in a larger grid, `extend` = (top, bottom, left, right) tokens more -> Canvas."""
    top, bottom, left, right = extend
    n, h, w = codes.shape
    rows, cols = top + h + bottom, left + w + right
    known_tokens = torch.zeros(n, rows, cols, dtype=torch.long)
    known_tokens[:, top:top + h, left:left + w] = codes
    known_mask = torch.zeros(rows, cols, dtype=torch.bool)
    known_mask[top:top + h, left:left + w] = True
    return Canvas((rows, cols), known_tokens.flatten(1), known_mask.flatten())  # (N, L), (L,)


def edit_panels(image, canvas, factor, offset=(0, 0)):
    """The first two panels of an edit row at the canvas's pixel size: input (grey where nothing was
    given; the image at `offset` tokens) and mask (white = regenerated, black = kept)."""
    rows, cols = canvas.grid
    input_panel = np.full((rows * factor, cols * factor, 3), EMPTY_GREY, dtype=np.uint8)
    if image is not None:
        top, left = offset[0] * factor, offset[1] * factor
        input_panel[top:top + image.shape[0], left:left + image.shape[1]] = image
    known = np.zeros(rows * cols, dtype=bool) if canvas.known_mask is None else canvas.known_mask.numpy()
    regenerated = patch_pixels(~known.reshape(rows, cols), factor)       # (H, W)
    mask_panel = np.repeat(regenerated[:, :, None] * np.uint8(255), 3, axis=2)  # (H, W, 3)
    # A grey frame: white regions at the border would otherwise merge with the white page.
    mask_panel[[0, -1], :] = mask_panel[:, [0, -1]] = EMPTY_GREY
    return input_panel, mask_panel


def edit_input(args, model, vq, names):
    """The image to edit, uint8 (H, W, 3), and its class (None when unknown)."""
    if args.image_class is not None:
        check_classes([args.image_class], model.config.num_classes, "--image-class")
    side = model.config.grid_size * vq.downsample                        # the model's images
    if args.image is not None:
        image = load_image(args.image)
        check_image_size(image, vq.downsample)
        if image.shape[:2] != (side, side):
            print(f"note: the image is {image.shape[1]}x{image.shape[0]} pixels and the model was trained on "
                  f"{side}x{side}: its tokens make a grid the model never saw (as --edit expand does)")
        return image, args.image_class
    if not is_builtin(names):
        raise ValueError(f"--edit {args.edit} needs --image for a model not trained on the built-in shapes")
    image_class = 0 if args.image_class is None else args.image_class
    # Labels cycle through the classes, so image i * n_classes + c has class c. The seed of --eval's
    # inpainting sources (evaluate.INPAINT_SEED), not a training seed: never an image ARPG trained on.
    images, _ = make_builtin_dataset((args.image_index + 1) * len(names), seed=evaluate.INPAINT_SEED, image_size=side)
    return images[args.image_index * len(names) + image_class], image_class


def plan_edit(args, model, vq, names):
    """-> (canvas, input panel, mask panel, labels to generate under)."""
    f = vq.downsample
    if args.edit == "expand":
        rows, cols = args.grid or (2 * model.config.grid_size,) * 2
        canvas = Canvas((rows, cols))
        input_panel, mask_panel = edit_panels(None, canvas, f)
        return canvas, input_panel, mask_panel, args.classes or default_classes(names)

    image, image_class = edit_input(args, model, vq, names)
    codes = vq.encode_images(image[None])                                 # (1, h, w)
    if args.edit == "outpaint":
        extend = args.extend or (max(1, model.config.grid_size // 4),) * 4
        canvas = outpaint_canvas(codes, extend)
        input_panel, mask_panel = edit_panels(image, canvas, f, offset=(extend[0], extend[2]))
    else:  # inpaint, class-edit
        regenerate = token_mask(regenerate_pixels(image.shape[:2], args.mask, args.box), f)
        if not regenerate.any():
            raise ValueError("the mask selects no pixel to regenerate: paint the region white")
        canvas = inpaint_canvas(codes, regenerate)
        input_panel, mask_panel = edit_panels(image, canvas, f)

    if args.classes is not None:
        labels = args.classes
    elif image_class is None and args.edit == "class-edit":
        raise ValueError("--edit class-edit on your own image needs --classes (the classes to redraw the region "
                         "as), or --image-class (its own class: every other class is drawn)")
    elif image_class is None:
        raise ValueError(f"--edit {args.edit} on your own image needs the class to generate under: "
                         f"--classes C (or --image-class C)")
    elif args.edit == "class-edit":
        if model.config.num_classes > 16:
            raise ValueError("--edit class-edit needs --classes: the classes to redraw the region as")
        if model.config.num_classes == 1:
            raise ValueError("--edit class-edit redraws the region under the other classes, and this model has one")
        labels = [c for c in range(model.config.num_classes) if c != image_class]
    else:
        labels = [image_class]
    return canvas, input_panel, mask_panel, labels


# -----------------------------------------------------------------------------
# A picture of the decoding itself (--show-decoding)
#
# Once drawn, a token never changes: after step s the canvas holds exactly the final tokens at
# the first n_1 + ... + n_s positions of the order. So each frame is the finished image with the
# patches of the tokens not yet drawn painted grey. (Their pixels come from decoding the finished
# canvas: the tokenizer's decoder needs every token, so a half-drawn canvas has no picture of
# its own.)

def frame_steps(steps):
    """The steps after which the canvas is shown: about 1/32, 1/16, 1/8, 1/4, 1/2, 3/4 and all of them."""
    return sorted({max(1, round(steps * fraction)) for fraction in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)})


def decoding_frames(images, order, drawn_counts, factor):
    """images (N, H, W, 3) decoded in `order` (L,) -> frames (N, F, H, W, 3): frame f shows the
    patches of the first drawn_counts[f] tokens of the order, grey elsewhere."""
    rows, cols = images.shape[1] // factor, images.shape[2] // factor
    frames = []
    for n_drawn in drawn_counts:
        drawn = np.zeros(rows * cols, dtype=bool)
        drawn[order[:n_drawn]] = True
        pixels = patch_pixels(drawn.reshape(rows, cols), factor)          # (H, W)
        frames.append(np.where(pixels[None, :, :, None], images, np.uint8(EMPTY_GREY)))  # (N, H, W, 3)
    return np.stack(frames, axis=1)


# -----------------------------------------------------------------------------
# Evaluation on the built-in shapes (evaluate.py holds the classifier and the metrics)

def write_text_atomic(path, text):
    """`text` to `path`, all or nothing (the evaluation's markdown table)."""
    with atomic_output(path, ".md") as tmp, open(tmp, "w") as f:
        f.write(text)


def run_evaluation(args, model, vq, settings, step_counts):
    """The results (markdown): a table of real images, tokenizer reconstructions and samples at each
    step count, then how many real images ARPG itself assigns to their class."""
    n = args.eval_samples
    side = model.config.grid_size * vq.downsample
    classifier, heldout_accuracy = evaluate.load_classifier(args.classifier, side)
    print(f"evaluation classifier: {heldout_accuracy:.1%} accuracy on {evaluate.HELDOUT_IMAGES} held-out real images")
    reference_features, rows = evaluate.real_image_rows(classifier, n, side)

    # The tokenizer's round trip bounds what ARPG can reach: its samples are decoded by the same decoder.
    real_images, real_labels = make_builtin_dataset(n, seed=evaluate.SECOND_REAL_SEED, image_size=side)
    codes = vq.encode_images(real_images)                                 # (n, h, w)
    reconstructions = np.concatenate([tensor_to_images(vq.decode(codes[i:i + args.batch_size].to(vq.device)))
                                      for i in range(0, n, args.batch_size)])  # (n, H, W, 3)
    rows.append(("tokenizer reconstructions", evaluate.score_images(classifier, reconstructions, real_labels,
                                                                     reference_features)))
    # Does ARPG know the classes, whatever its samples show? Score those real images under every label.
    knows = evaluate.likelihood_classification(model, codes.flatten(1), real_labels)
    print(f"ARPG as a classifier of {n} real images: {knows:.1%} (the label with the lowest loss)")

    # Inpainting: the centre (half the width and height) of real images regenerated under their label.
    sources, source_labels = make_builtin_dataset(n, seed=evaluate.INPAINT_SEED, image_size=side)
    regenerate = token_mask(regenerate_pixels((side, side)), vq.downsample)
    inpaint = inpaint_canvas(vq.encode_images(sources), regenerate)
    labels = torch.arange(n) % model.config.num_classes
    full = Canvas((model.config.grid_size,) * 2)
    for steps in step_counts:
        generator = torch.Generator(args.device).manual_seed(args.seed)
        _, images = generate_images(model, vq, labels, full, steps, settings, generator, args.batch_size)
        scores = evaluate.score_images(classifier, images, labels.numpy(), reference_features)
        _, completed = generate_images(model, vq, torch.from_numpy(source_labels), inpaint, edit_steps(steps, inpaint),
                                       settings, generator, args.batch_size)
        scores["inpaint_keeps_class"] = evaluate.class_accuracy(evaluate.classify(classifier, completed)[0],
                                                                source_labels)
        rows.append((f"ARPG, {steps} steps", scores))
        print(f"{steps} steps: accuracy {scores['accuracy']:.1%}, Frechet distance {scores['frechet']:.2f}, "
              f"inpainting keeps class {scores['inpaint_keeps_class']:.1%}")
    return (evaluate.format_table(rows) + f"\n\nARPG as a classifier of the {n} real images of the first two rows (the "
            f"label under which their tokens are likeliest, 4 random orders; `evaluate.likelihood_classification`): "
            f"{knows:.1%}")


# -----------------------------------------------------------------------------
# Checks and the command line

def check_flags(args):
    """Refuse flag values and combinations that cannot work, before loading anything; then fill in
    the defaults of the flags that apply to one mode only."""
    for flag, value, least in (("--per-class", args.per_class, 1), ("--batch-size", args.batch_size, 1),
                               ("--fid", args.fid, 1), ("--eval-samples", args.eval_samples, 2)):  # 2: a covariance
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    check_device(args.device)
    for flag in ("--ckpt", "--vq-ckpt", "--out", "--classifier", "--image", "--mask"):
        if getattr(args, flag[2:].replace("-", "_")) == "":                # would fall back to a default file
            raise ValueError(f"{flag} is empty: give a file name, or leave the flag out")
    if not -2 ** 63 <= args.seed < 2 ** 64:                               # what torch.Generator takes
        raise ValueError(f"--seed must fit in 64 bits, got {args.seed}")
    if args.eval and args.steps is not None:
        raise ValueError("--eval with step counts evaluates those: drop --steps (or give --eval alone to "
                         "evaluate --steps)")
    if args.compile and args.sampler != "fast":
        raise ValueError("--compile compiles the fast sampler's steps; it does not go with --sampler readable")
    applies = {"--eval-samples": args.eval is not None, "--classifier": args.eval is not None,
               "--per-class": args.eval is None and args.fid is None and not args.show_decoding,  # their own counts
               "--classes": args.eval is None}                                # --eval samples every class
    for flag, applies_here in applies.items():
        if getattr(args, flag[2:].replace("-", "_")) is not None and not applies_here:
            raise ValueError(f"{flag} does not apply to this mode (--eval-samples and --classifier go with --eval; "
                             f"--per-class with grids and edits; --classes with all but --eval)")
    args.per_class = args.per_class or 8
    args.eval_samples = args.eval_samples or 1000
    args.classifier = args.classifier or evaluate.DEFAULT_CLASSIFIER
    if args.image_index is not None and args.image is not None:
        raise ValueError("--image-index picks a built-in image to edit; it does not go with --image")
    used_by = {"--image": ("inpaint", "class-edit", "outpaint"), "--image-class": ("inpaint", "class-edit", "outpaint"),
               "--image-index": ("inpaint", "class-edit", "outpaint"),
               "--mask": ("inpaint", "class-edit"), "--box": ("inpaint", "class-edit"),
               "--extend": ("outpaint",), "--grid": ("expand",)}
    for flag, modes in used_by.items():
        if getattr(args, flag[2:].replace("-", "_")) is not None and args.edit not in modes:
            raise ValueError(f"{flag} only applies to --edit {' / '.join(modes)}")
    if args.mask is not None and args.box is not None:
        raise ValueError("give --mask or --box, not both")
    if args.grid is not None and min(args.grid) < 1:
        raise ValueError(f"--grid must be positive, got {' '.join(map(str, args.grid))}")
    if args.extend is not None and (min(args.extend) < 0 or sum(args.extend) == 0):
        raise ValueError(f"--extend needs non-negative token counts, at least one positive, got "
                         f"{' '.join(map(str, args.extend))}")
    if args.fid is not None and args.classes is not None and len(set(args.classes)) < len(args.classes):
        raise ValueError("--fid balances the classes given: list each once in --classes")
    args.image_index = 0 if args.image_index is None else args.image_index
    if not 0 <= args.image_index < 1000:  # image i of a class needs the 10 * i images before it drawn first
        raise ValueError(f"--image-index must be in 0..999, got {args.image_index}")


def check_steps(steps, tokens, what):
    """Refuse a step count outside 1..tokens: at least one step, at least one token a step."""
    if not 1 <= steps <= tokens:
        raise ValueError(f"steps must be between 1 and {tokens} (the tokens of {what}), got {steps}")


def check_against_model(args, config):
    """Refuse step counts and class ids the loaded model cannot take, after filling in --steps'
    default (`default_steps` of the model's grid). An edit's --steps, and its default, go by its
    canvas instead (main), which can be larger or smaller than the model's grid."""
    if args.steps is None and not args.edit:
        args.steps = default_steps(config.block_size)
    for steps in ([] if args.edit else [args.steps]) + (args.eval or []):
        check_steps(steps, config.block_size, "an image")
    if args.classes is not None:
        check_classes(args.classes, config.num_classes)


def decoding_settings(args, defaults=SAMPLING_DEFAULTS):
    """The keyword arguments of ARPG.generate that come from the command line (all but steps);
    --cfg, --cfg-schedule, --schedule and --top-p fall back to `defaults` (the checkpoint's, from
    load_models)."""
    return dict(sampling_settings(args, defaults), temperature=args.temperature, top_k=args.top_k,
                fast=args.sampler == "fast", compile=args.compile)


def output_path(args):
    """The file this run writes: --out, else its mode's default in out/."""
    if args.eval is not None:
        return args.out or "out/eval.md"
    if args.fid is not None:
        return args.out or f"out/fid_{args.fid}.npz"
    if args.edit is not None:
        return args.out or f"out/edit_{args.edit}.png"
    if args.show_decoding:
        return args.out or "out/decoding.png"
    return args.out or "out/sample_grid.png"


def with_progress(batches, total):
    """Pass the image batches of generate_batches through, counting images on a progress bar."""
    with tqdm(total=total, unit="img", desc="sampling") as progress:
        for _, images in batches:
            yield images
            progress.update(len(images))


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    out = output_path(args)
    # Checked before the sampling, which can take hours (--fid)
    if args.eval is None and args.fid is None:
        check_image_path(out)                                             # a picture: .png, .jpg...
    else:
        check_output_path(out)
        if args.fid is not None and not out.endswith(".npz"):
            raise ValueError(f"--out {out}: --fid writes an .npz archive (what the ADM evaluator reads); end the "
                             f"name with .npz")
        if args.eval is not None and not out.endswith(".md"):
            raise ValueError(f"--out {out}: --eval writes a markdown table; end the name with .md")
    model, vq, names, description, sampling = load_models(args)
    config = model.config
    settings = decoding_settings(args, sampling)
    check_decoding(settings["schedule"], settings["cfg_schedule"], args.temperature, args.top_k, settings["top_p"],
                   settings["cfg_scale"])                                 # before --eval's minutes of scoring
    print(f"{description} | guidance {settings['cfg_scale']} ({settings['cfg_schedule']}), {settings['schedule']} "
          f"schedule, top-p {settings['top_p']}")
    check_against_model(args, config)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    full = Canvas((config.grid_size, config.grid_size))
    side = config.grid_size * vq.downsample

    if args.eval is not None:
        if not is_builtin(names):
            raise ValueError("--eval measures models trained on the built-in shapes (its classifier knows only "
                             "those); for ImageNet use --fid 50000 and the ADM evaluator")
        table = run_evaluation(args, model, vq, settings, args.eval or [args.steps])
        write_text_atomic(out, f"{description}\n\n{table}\n")
        print(table)
        print(f"wrote {out}")

    elif args.fid is not None:
        classes = args.classes or list(range(config.num_classes))
        labels = torch.tensor(classes)[torch.arange(args.fid) % len(classes)]  # (N,) each class N/C times
        batches = generate_batches(model, vq, labels, full, args.steps, settings, generator, args.batch_size)
        write_fid_npz(out, with_progress(batches, args.fid), args.fid, (side, side, 3), labels.numpy())
        drawn = min(args.fid, len(classes))                               # classes that got an image
        each, left_over = divmod(args.fid, drawn)                         # the first left_over classes get one more
        print(f"wrote {out}: arr_0 uint8 ({args.fid}, {side}, {side}, 3), {drawn} classes, {each}"
              f"{f'-{each + 1}' if left_over else ''} image{'s' if left_over or each > 1 else ''} each")

    elif args.edit is not None:
        canvas, input_panel, mask_panel, classes = plan_edit(args, model, vq, names)
        check_classes(classes, config.num_classes)
        rows, cols = canvas.grid
        if args.steps is None:
            args.steps = default_steps(rows * cols)
        check_steps(args.steps, rows * cols, f"the {rows}x{cols} canvas")
        labels = torch.tensor(classes).repeat_interleave(args.per_class)  # (R*P,)
        steps = edit_steps(args.steps, canvas)
        print(f"{args.edit}: decoding {canvas.n_unknown} of {rows * cols} tokens "
              f"in {steps} steps, {len(classes)} class(es) x {args.per_class}")
        _, images = generate_images(model, vq, labels, canvas, steps, settings, generator, args.batch_size)
        results = images.reshape(len(classes), args.per_class, *images.shape[1:])     # (R, P, H, W, 3)
        given = np.broadcast_to(np.stack([input_panel, mask_panel]), (len(classes), 2, *input_panel.shape))
        save_image_grid(np.concatenate([given, results], axis=1), [names[c] for c in classes], out)  # (R, 2+P, ...)
        print(f"wrote {out}: each row input | mask (white = regenerated) | {args.per_class} result(s)")

    elif args.show_decoding:
        classes = args.classes or default_classes(names)
        L = config.block_size
        order = torch.randperm(L, generator=generator, device=args.device)  # one order for every row
        _, images = generate_images(model, vq, torch.tensor(classes), full, args.steps, dict(settings, order=order),
                                    generator, args.batch_size)
        shown = frame_steps(args.steps)
        drawn_by = np.cumsum(reveal_counts(L, args.steps, settings["schedule"]))  # tokens drawn after each step
        drawn = [int(drawn_by[s - 1]) for s in shown]
        frames = decoding_frames(images, order.cpu().numpy(), drawn, vq.downsample)  # (R, F, H, W, 3)
        headers = [f"step {s}\n{n}/{L} tokens" for s, n in zip(shown, drawn)]
        save_image_grid(frames, [names[c] for c in classes], out, column_labels=headers)
        print(f"wrote {out}: {len(classes)} classes, the canvas after steps {', '.join(map(str, shown))} of "
              f"{args.steps} ({settings['schedule']} schedule; grey: not decoded yet)")

    else:
        classes = args.classes or default_classes(names)
        labels = torch.tensor(classes).repeat_interleave(args.per_class)  # (R*P,)
        _, images = generate_images(model, vq, labels, full, args.steps, settings, generator, args.batch_size)
        save_image_grid(images.reshape(len(classes), args.per_class, *images.shape[1:]),  # (R, P, H, W, 3)
                        [names[c] for c in classes], out)
        print(f"wrote {out}: {len(classes)} classes x {args.per_class} samples of {side}x{side}, "
              f"{args.steps} steps ({settings['schedule']}), cfg {settings['cfg_scale']} ({settings['cfg_schedule']})")


if __name__ == "__main__":
    run_script(main)
