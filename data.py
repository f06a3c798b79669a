"""
The built-in dataset: ten classes of flat geometric shapes, drawn on the fly, no download.

ARPG is trained on ImageNet (SPEC 8), which nobody wants to fetch just to see the
method work. This file draws a class-conditional toy dataset instead: one flat-coloured shape
(circle, square, bar, a pair of dots, ...) per 64x64 image, on a flat background, at a random position,
size and rotation, in colours drawn from two small palettes. Every image is different, the
class is plain to the eye, and the images are clean enough that a tiny VQ tokenizer trained
for a few minutes on a laptop CPU reconstructs them well (tokenizer.py) and a tiny ARPG learns
them in a few more minutes.

Why so plain: a VQ tokenizer with an 8x8 token grid and 128 codes has to describe
every 8x8 patch with one code. Flat colours from small palettes and no textures keep the
number of distinct patches small, so the codebook spends its codes on shape edges.

Look at it:
    python data.py --out out/builtin_dataset.png        # 8 samples per class, one row per class

Use it:
    from data import CLASS_NAMES, make_builtin_dataset, save_image_grid
    images, labels = make_builtin_dataset(5000, seed=0)  # uint8 (5000, 64, 64, 3), int64 (5000,)

The end of the file holds what every script shares: atomic file writes, output-path checks,
reading image files, the labelled image grid and the one-line exit on bad input. They live
here, free of torch, so that onnx_sampler.py runs without PyTorch.
"""
import argparse
import contextlib
import math
import os
import re
import signal
import struct
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

# -----------------------------------------------------------------------------
# Classes and palettes

# Class id = index in this list. Each shape looks different from every other one at any
# rotation (a rotated square is still a square, not a cross), and the differences are coarse:
# the tokenizer sees the image as an 8 x 8 grid of patches, so a class must be recognisable
# from its silhouette at that scale. An earlier set had a hexagon and a heart: the tokenizer's
# reconstructions confused them with the circle and the square: the evaluation classifier (trained
# on real images) recognised only 89.4% of the reconstructions (97.8% with this set, the same
# tokenizer recipe; EXPERIMENTS.md).
CLASS_NAMES = [
    "circle", "square", "triangle", "star", "cross",
    "ring", "bar", "pair", "crescent", "arrow",
]

# Backgrounds: a few dark and a few light colours. Foregrounds: saturated colours. A pair is
# accepted only if its luminance contrast is large (see _pick_colours), so the shape always
# stands out. Small palettes are deliberate: they keep the number of distinct 8x8 patches, and
# so the codebook the tokenizer needs, small.
BACKGROUNDS = np.array([
    [20, 24, 38], [44, 44, 44], [24, 54, 40],              # dark navy, dark grey, dark green
    [236, 232, 220], [200, 214, 230], [245, 224, 200],     # cream, pale blue, pale peach
], dtype=np.float64)
FOREGROUNDS = np.array([
    [220, 40, 40], [250, 150, 20], [245, 215, 30], [40, 170, 70],   # red, orange, yellow, green
    [30, 110, 220], [140, 60, 200], [240, 240, 240], [30, 30, 30],  # blue, purple, white, black
], dtype=np.float64)
MIN_LUMA_CONTRAST = 70.0  # on the 0..255 scale; below this a shape blends into its background

SUPERSAMPLE = 4  # draw at 4x the size, then box-downscale: cheap anti-aliased edges


def _luma(rgb):
    """Perceived brightness (ITU-R BT.601 weights) of an RGB colour in 0..255."""
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _pick_colours(rng):
    """Draw a (background, foreground) pair from the palettes with enough luminance contrast."""
    while True:
        bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        fg = FOREGROUNDS[rng.integers(len(FOREGROUNDS))]
        if abs(_luma(bg) - _luma(fg)) >= MIN_LUMA_CONTRAST:
            return tuple(int(c) for c in bg), tuple(int(c) for c in fg)


# -----------------------------------------------------------------------------
# Shapes as polygons in unit coordinates (centre 0, about the unit circle's size: the triangle
# reaches 1.11 of its radius, the bar 1.04 and the arrow 1.03, so their tips can be clipped by up
# to ~3 pixels at the image edge)

def _regular_polygon(n_sides):
    angles = 2 * math.pi * np.arange(n_sides) / n_sides - math.pi / 2  # first vertex on top
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n_sides, 2)


def _star(n_points=5, inner=0.45):
    angles = 2 * math.pi * np.arange(2 * n_points) / (2 * n_points) - math.pi / 2
    radii = np.where(np.arange(2 * n_points) % 2 == 0, 1.0, inner)  # alternate tip / notch
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)  # (2n, 2)


def _cross(arm=0.33):
    a = arm  # half the arm width; arms reach 0.95 of the way to the unit square's edge (corners at radius 1.0)
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
                     [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]) * 0.95


def _arrow():
    # Pointing right: a shaft and a triangular head.
    return np.array([[-1, -0.25], [0.1, -0.25], [0.1, -0.65], [1, 0],
                     [0.1, 0.65], [0.1, 0.25], [-1, 0.25]])


_CIRCLE = _regular_polygon(96)
# Each class is a list of (polygon, colour role) layers drawn in order: "fg" fills with the
# shape colour, "bg" cuts a hole by painting the background colour back.
_SHAPES = {
    "circle": [(_CIRCLE, "fg")],
    "square": [(_regular_polygon(4), "fg")],
    "triangle": [(_regular_polygon(3) + [0, 0.2], "fg")],  # roughly centres its bounding box
    "star": [(_star(), "fg")],
    "cross": [(_cross(), "fg")],
    "ring": [(_CIRCLE, "fg"), (_CIRCLE * 0.55, "bg")],
    "bar": [(np.array([[-1, -0.3], [1, -0.3], [1, 0.3], [-1, 0.3]]), "fg")],    # 3.3 : 1
    "pair": [(_CIRCLE * 0.42 + [-0.56, 0], "fg"), (_CIRCLE * 0.42 + [0.56, 0], "fg")],  # two dots
    "crescent": [(_CIRCLE, "fg"), (_CIRCLE * 0.85 + [0.45, -0.2], "bg")],
    "arrow": [(_arrow(), "fg")],
}
assert list(_SHAPES) == CLASS_NAMES


# -----------------------------------------------------------------------------
# Drawing one image, then many

def _draw(class_id, rng, image_size):
    """Draw one image of class `class_id` with random pose and colours; returns uint8 (H, W, 3)."""
    big = image_size * SUPERSAMPLE
    bg, fg = _pick_colours(rng)
    # Pose: radius 0.30-0.46 of the image side (the bounding circle spans 60-92% of it, most
    # shapes a little less), centre anywhere that keeps that circle inside, any rotation.
    radius = rng.uniform(0.30, 0.46) * big
    cx, cy = rng.uniform(radius, big - radius, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    canvas = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(canvas)
    for polygon, role in _SHAPES[CLASS_NAMES[class_id]]:
        points = polygon @ rot.T * radius + [cx, cy]  # (n, 2) in supersampled pixels
        draw.polygon([tuple(p) for p in points], fill=fg if role == "fg" else bg)
    # Box filter = mean of each SUPERSAMPLE x SUPERSAMPLE block: exact area anti-aliasing.
    return np.asarray(canvas.resize((image_size, image_size), Image.BOX))


def make_builtin_dataset(n, seed=0, image_size=64):
    """
    Draw `n` labelled shape images.

    Returns (images uint8 (n, image_size, image_size, 3), labels int64 (n,)). Labels cycle
    through the classes (0, 1, ..., 9, 0, 1, ...), so every class has n // 10 or n // 10 + 1
    images. The same (n, seed, image_size) always gives the same arrays; different seeds give
    different images. Use a different seed for held-out evaluation than for training.
    """
    if n < 0 or image_size < 8:
        raise ValueError(f"need n >= 0 and image_size >= 8, got n={n}, image_size={image_size}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(CLASS_NAMES)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i, class_id in enumerate(labels):
        images[i] = _draw(int(class_id), rng, image_size)
    return images, labels


# -----------------------------------------------------------------------------
# Shared by the scripts: files written atomically and named after their checkpoint, class ids
# checked, image files read, a labelled image grid, and the bad-input exit

@contextlib.contextmanager
def atomic_output(path, suffix=""):
    """A temporary file name in `path`'s folder (made if missing) to write to; it becomes `path`
    (os.replace) when the block ends and is removed if the block fails, so a reader never sees
    half a file and a failed or interrupted write leaves nothing behind. The file gets the
    permissions an ordinary new file would get, under the umask (mkstemp makes owner-only ones), and its
    bytes are flushed to the disk before the rename: otherwise a power cut soon after could leave
    the new name on an empty file, the old one already gone."""
    check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)                                               # os.umask sets and returns the old
        os.umask(umask)                                                   # one: read it, then put it back
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def beside(path, suffix):
    """A file named after `path`, in its folder: beside("out/arpg.pt", "_samples.png") is
    "out/arpg_samples.png". Each checkpoint's pictures carry its name, so runs that share a folder
    keep their own."""
    return os.path.splitext(path)[0] + suffix


def check_output_path(path, flag="--out"):
    """Refuse an output file that cannot be written, in one line: scripts call this before their
    work, so that a typo in --out does not cost a training run. Makes the folder if missing."""
    if not os.fspath(path).strip():
        raise ValueError(f"{flag} is empty; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or os.fspath(path).endswith(("/", os.sep)):  # "new_folder/" is no file name either
        raise ValueError(f"{flag} {path} is a folder; give a file name in it")
    if os.path.exists(path) and not os.path.isfile(path):  # os.replace would put a file in its place
        raise ValueError(f"{flag} {path} is not a regular file (a device, a pipe); give a file name")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot write {flag} {path}: cannot make its folder {folder} ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {flag} {path}: its folder {folder} is not writable; choose another path")


def check_image_path(path, flag="--out"):
    """check_output_path for a picture, whose format its extension names (.png, .jpg, .webp...;
    a name without one gets a PNG): an extension PIL cannot write as an image (grid.txt) is refused."""
    check_output_path(path, flag)
    extension = os.path.splitext(path)[1].lower()
    if extension and Image.registered_extensions().get(extension) not in Image.SAVE:
        raise ValueError(f"{flag} {path}: {extension} is no image format PIL can write; end the name with .png "
                         f"or .jpg")


# LlamaGen's and ARPG's demo classes: golden retriever, otter, lesser panda, geyser, macaw,
# valley, balloon, arctic fox. The default rows for a 1000-class (ImageNet) model.
IMAGENET_SHOWCASE = [207, 360, 387, 974, 88, 979, 417, 279]


def default_classes(names):
    """A grid's rows when no --classes are given (sample.py's, train.py's and export.py's): every
    class of a model with up to 16, the ImageNet showcase for 1000 (a thousand rows is no
    picture), else 8 spread over the range."""
    if len(names) <= 16:
        return list(range(len(names)))
    if len(names) == 1000:
        return IMAGENET_SHOWCASE
    return [round(i * (len(names) - 1) / 7) for i in range(8)]  # 8 spread over the range


def check_classes(classes, num_classes, flag="--classes"):
    """Refuse class ids outside the model's 0..num_classes-1, naming each bad one once."""
    bad = list(dict.fromkeys(c for c in classes if not 0 <= c < num_classes))
    if bad:
        raise ValueError(f"{flag} {' '.join(map(str, bad))} out of range: this model has {num_classes} classes "
                         f"(0..{num_classes - 1})")


def read_image(path, mode="RGB", what="image"):
    """An image file as a PIL image in `mode` ("RGB", or "L" for a mask), read whole and upright: a
    photo whose EXIF data says the camera was turned is turned back, as image viewers show it (a
    mask drawn on what the viewer showed then fits it). Files of 16 bits per channel are brought
    down to 8 first: PIL's convert would clip their values at 255, turning nearly every pixel of a
    16-bit greyscale PNG white. An alpha channel is dropped."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I"):                               # 16-bit greyscale ("I;16", "I")
                image = Image.fromarray((np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
            return image.convert(mode)
    # Not an image, one too large to open, or a damaged one: PIL reports damage in many ways (OSError,
    # SyntaxError for a broken PNG chunk, ValueError for an oversized one, struct.error, EOFError).
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read {what} {path}: {error}") from None


def save_image_grid(images, row_labels, path, pad=2, column_labels=None):
    """
    Save a grid of uint8 images as one picture, in the format its extension names (`check_image_path`):
    images (R, C, H, W, 3), row r labelled row_labels[r], column c headed column_labels[c].

    Either labels may be None (no label column, no header; a column label may have several
    lines). Written atomically (`atomic_output`).
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (rows, cols, H, W, 3), "
                         f"got {images.dtype} {images.shape}")
    rows, cols, h, w, _ = images.shape
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if column_labels is not None and len(column_labels) != cols:
        raise ValueError(f"{len(column_labels)} column labels for {cols} columns")
    check_image_path(path, "grid")                                        # before the drawing

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [str(s) for s in row_labels] if row_labels is not None else []
    headers = [str(s) for s in column_labels] if column_labels is not None else []
    # Label column just wide enough for the longest label (plus a margin); none without labels.
    # Likewise the header band: as tall as the tallest column label; and columns as wide as their
    # tiles, or as the widest column label where that is wider (tiles centred in them).
    label_w = max(int(font.getlength(s)) for s in labels) + 2 * pad if labels else 0
    header_boxes = [measure.multiline_textbbox((0, 0), s, font=font) for s in headers]  # (left, top, right, bottom)
    header_h = max(box[3] for box in header_boxes) + pad if headers else 0
    column_w = max([w] + [box[2] - box[0] + pad for box in header_boxes])
    grid = Image.new("RGB", (label_w + cols * (column_w + pad) + pad, header_h + rows * (h + pad) + pad), (255,) * 3)
    draw = ImageDraw.Draw(grid)
    for c, header in enumerate(headers):
        draw.multiline_text((label_w + pad + c * (column_w + pad) + column_w // 2, pad), header, fill=(0, 0, 0),
                            font=font, anchor="ma", align="center")
    for r in range(rows):
        top = header_h + pad + r * (h + pad)
        if labels:
            draw.text((pad, top + h // 2), labels[r], fill=(0, 0, 0), font=font, anchor="lm")
        for c in range(cols):
            grid.paste(Image.fromarray(images[r, c]), (label_w + pad + c * (column_w + pad) + (column_w - w) // 2, top))

    extension = os.path.splitext(path)[1]
    with atomic_output(path, extension) as tmp:
        grid.save(tmp, format=Image.registered_extensions().get(extension.lower(), "PNG"))  # .jpg: JPEG


def run_script(main):
    """Run a script's main() and exit with its return value; bad input (ValueError) and files
    that cannot be read or written (OSError: not found, a folder, no permission, not an image,
    a full disk) become one `error: ...` line on stderr and exit code 2, not a traceback; running
    out of memory is one line too, with exit code 1.
    Ctrl-C and SIGTERM (kill, timeout, a cluster's pre-emption) stop it through its cleanup, so
    no half-written file stays behind (`atomic_output`), and exit with code 130."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)            # SIGTERM: as Ctrl-C
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as error:
        # A DataLoader worker's error arrives wrapped in its traceback: its last line is the message,
        # after the exception's name ("ValueError: cannot read image ...").
        message = (str(error).strip().splitlines() or [""])[-1]
        if "Original Traceback" in str(error):
            message = re.sub(r"^\w+: ", "", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as error:
        # Too much asked at once: numpy raises MemoryError, PyTorch a RuntimeError (CPU: "can't
        # allocate memory", CUDA: "out of memory"). Any other RuntimeError is a bug: its traceback stays.
        if not isinstance(error, MemoryError) and not re.search("out of memory|can't allocate memory", str(error)):
            raise
        size = re.search(r"(?:tried to|unable to) allocate ([\d.]+ \w+)", str(error), re.IGNORECASE)
        print(f"error: out of memory{f' (tried to allocate {size[1]})' if size else ''}: ask for less at once "
              f"(a smaller batch, grid or image count)", file=sys.stderr)
        sys.exit(1)


# -----------------------------------------------------------------------------
# Preview: python data.py --out out/builtin_dataset.png

def preview():
    parser = argparse.ArgumentParser(description="Save a preview grid of the built-in dataset.")
    parser.add_argument("--out", default="out/builtin_dataset.png",
                        help="picture to write; its extension names the format (.png, .jpg, ...)")
    parser.add_argument("--per-class", type=int, default=8, help="images shown per class (columns)")
    parser.add_argument("--image-size", type=int, default=64, help="side of each image in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the dataset")
    args = parser.parse_args()
    if args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}")
    check_image_path(args.out)

    n_classes = len(CLASS_NAMES)
    images, labels = make_builtin_dataset(n_classes * args.per_class, args.seed, args.image_size)
    # Labels cycle through the classes, so image i * n_classes + c has class c.
    grid = images.reshape(args.per_class, n_classes, *images.shape[1:]).swapaxes(0, 1)  # (R, C, H, W, 3)
    save_image_grid(grid, CLASS_NAMES, args.out)
    print(f"wrote {args.out}: {n_classes} classes x {args.per_class} images")


if __name__ == "__main__":
    run_script(preview)
