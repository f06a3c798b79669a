"""Tests of the built-in shape dataset and the image-grid helper (data.py)."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from data import CLASS_NAMES, atomic_output, check_output_path, make_builtin_dataset, read_image, save_image_grid


def test_same_seed_gives_identical_dataset():
    """Determinism: the same (n, seed, image_size) always gives the same images and labels."""
    a_img, a_lab = make_builtin_dataset(40, seed=3)
    b_img, b_lab = make_builtin_dataset(40, seed=3)
    assert np.array_equal(a_img, b_img), "same seed gave different images"
    assert np.array_equal(a_lab, b_lab), "same seed gave different labels"


def test_different_seeds_give_different_images():
    """Different seeds draw different images (labels cycle, so only the images differ)."""
    a, _ = make_builtin_dataset(20, seed=0)
    b, _ = make_builtin_dataset(20, seed=1)
    differing = sum(not np.array_equal(x, y) for x, y in zip(a, b))
    assert differing == 20, f"only {differing}/20 images differ between seeds 0 and 1"


@pytest.mark.parametrize("image_size", [64, 32])
def test_shapes_and_dtypes(image_size):
    """Images are uint8 (n, S, S, 3), labels int64 (n,) with values in [0, n_classes)."""
    images, labels = make_builtin_dataset(13, seed=0, image_size=image_size)
    assert images.shape == (13, image_size, image_size, 3), f"images shape {images.shape}"
    assert images.dtype == np.uint8, f"images dtype {images.dtype}"
    assert labels.shape == (13,) and labels.dtype == np.int64, f"labels {labels.dtype} {labels.shape}"
    assert labels.min() >= 0 and labels.max() < len(CLASS_NAMES), "label out of range"


def test_all_classes_present_and_balanced():
    """At least 10 classes; every class appears, and counts differ by at most one."""
    assert len(CLASS_NAMES) >= 10, f"only {len(CLASS_NAMES)} classes"
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES), "duplicate class names"
    _, labels = make_builtin_dataset(3 * len(CLASS_NAMES) + 4, seed=0)
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    assert counts.min() >= 3, f"some class is missing or rare: {counts}"
    assert counts.max() - counts.min() <= 1, f"classes not balanced: {counts}"


def test_no_two_images_identical_in_1000():
    """Random pose and colours make every image unique (checked on a sample of 1000)."""
    images, _ = make_builtin_dataset(1000, seed=0)
    distinct = len({img.tobytes() for img in images})
    assert distinct == 1000, f"{1000 - distinct} duplicate images among 1000"


def test_shape_contrasts_with_background():
    """Each image holds a visible shape: its pixels are far from all one colour."""
    images, _ = make_builtin_dataset(50, seed=0)
    for i, img in enumerate(images):
        spread = int(img.astype(int).max(axis=(0, 1)).sum() - img.astype(int).min(axis=(0, 1)).sum())
        assert spread > 60, f"image {i} is nearly flat (colour spread {spread})"


def test_save_image_grid_writes_png_of_the_right_size(tmp_path):
    """save_image_grid writes a readable PNG holding every tile at its place, 2-pixel gaps around
    them, after a label column when there are labels and below a header band when there are column
    labels (text over each column), and leaves no temp file behind."""
    images, _ = make_builtin_dataset(6, seed=0, image_size=32)
    grid = images.reshape(2, 3, 32, 32, 3)
    cases = ((["first", "second"], None, "grid.png"), (None, None, "nolabels.png"),
             (["first", "second"], ["a", "two\nlines", "c"], "headers.png"))
    for labels, headers, name in cases:
        path = tmp_path / name
        save_image_grid(grid, labels, str(path), column_labels=headers)
        with Image.open(path) as im:
            assert im.format == "PNG", f"wrote {im.format}"
            picture = np.asarray(im.convert("RGB"))
        h, w = picture.shape[:2]
        label_w = w - (3 * (32 + 2) + 2)                                  # what is left of the tiles' width
        header_h = h - (2 * (32 + 2) + 2)                                 # what is left of the tiles' height
        assert label_w > 20 if labels else label_w == 0, f"label column {label_w} px wide"
        assert header_h > 20 if headers else header_h == 0, f"header band {header_h} px high"
        for c in range(3 if headers else 0):
            left = label_w + 2 + c * (32 + 2)
            assert (picture[:header_h, left:left + 32] < 128).any(), f"{name}: column {c} has no header text"
        for r in range(2):
            for c in range(3):
                top, left = header_h + 2 + r * (32 + 2), label_w + 2 + c * (32 + 2)
                assert np.array_equal(picture[top:top + 32, left:left + 32], grid[r, c]), f"{name}: tile {r}, {c}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "headers.png", "nolabels.png"], \
        "temporary file left behind"


def test_save_image_grid_widens_columns_for_headers_wider_than_their_tiles(tmp_path):
    """Column labels wider than the tiles widen every column (no label overprints its neighbour),
    with each tile centred in its column."""
    images, _ = make_builtin_dataset(3, seed=0, image_size=16)
    headers = ["a header much wider", "than a tile of", "sixteen pixels"]
    save_image_grid(images.reshape(1, 3, 16, 16, 3), None, str(tmp_path / "wide.png"), column_labels=headers)
    picture = np.asarray(Image.open(tmp_path / "wide.png").convert("RGB"))
    widest = max(ImageFont.load_default().getlength(s) for s in headers)
    pitch = (picture.shape[1] - 2) / 3                                    # column width + gap
    assert pitch >= widest, f"columns {pitch} px apart, headers up to {widest} px wide"
    top = picture.shape[0] - 2 - 16
    for c in range(3):
        left = int(2 + c * pitch + (pitch - 2 - 16) // 2)
        assert np.array_equal(picture[top:top + 16, left:left + 16], images[c]), f"tile {c} not centred in its column"


def test_save_image_grid_writes_the_format_its_name_asks_for(tmp_path):
    """A .jpg name gets a JPEG, a .png name or no extension a PNG."""
    images, _ = make_builtin_dataset(4, seed=0, image_size=16)
    for name, image_format in (("grid.jpg", "JPEG"), ("grid.png", "PNG"), ("grid", "PNG")):
        save_image_grid(images.reshape(2, 2, 16, 16, 3), None, str(tmp_path / name))
        with Image.open(tmp_path / name) as image:
            assert image.format == image_format, f"{name}: {image.format}"


def test_read_image_brings_16_bit_files_down_to_8_bits(tmp_path, monkeypatch):
    """A 16-bit greyscale PNG reads as its top 8 bits (PIL's convert alone clips it to white), in
    RGB and as a mask; RGBA loses its alpha; a file too large to open safely, or no image at all,
    is one ValueError naming the file. tokenizer.ImageFolderCrops reads its files with it."""
    ramp16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    Image.fromarray(ramp16).save(tmp_path / "grey16.png")
    expected = (ramp16 >> 8).astype(np.uint8)                            # (64, 64)
    assert np.array_equal(np.asarray(read_image(tmp_path / "grey16.png", "L")), expected), \
        "a 16-bit grey image read as L is not its top 8 bits"
    assert np.array_equal(np.asarray(read_image(tmp_path / "grey16.png")), np.repeat(expected[..., None], 3, -1)), \
        "a 16-bit grey image read as RGB is not its top 8 bits in all three channels"
    from tokenizer import ImageFolderCrops, images_to_tensor
    crop, _, _ = ImageFolderCrops([(tmp_path / "grey16.png", 0, 0)], 64)[0]
    assert torch.equal(crop, images_to_tensor(np.repeat(expected[None, ..., None], 3, -1))[0]), "crop is not the 8-bit image"

    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "rgba.png")), rgba[..., :3]), \
        "an RGBA image read as RGB is not its first three channels"

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)               # PIL refuses over twice this
    with pytest.raises(ValueError, match="cannot read image .*grey16.png: Image size .* exceeds limit"):
        read_image(tmp_path / "grey16.png")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="cannot read mask .*notes.png: cannot identify image file"):
        read_image(tmp_path / "notes.png", "L", "mask")


def test_read_image_turns_a_photo_upright_as_its_exif_orientation_says(tmp_path):
    """A camera's portrait shot is stored landscape with EXIF orientation 6 ("turn 90 degrees
    clockwise to view"): it reads as the viewer shows it, 2 wide and 3 tall, pixel for pixel."""
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # (H 2, W 3, RGB)
    exif = Image.Exif()
    exif[0x0112] = 6                                                      # the Orientation tag
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    upright = np.asarray(read_image(tmp_path / "photo.png"))
    assert np.array_equal(upright, np.rot90(stored, k=-1)), f"read as {upright.shape[1]}x{upright.shape[0]}"


def test_read_image_names_the_file_whatever_way_pil_reports_the_damage(tmp_path):
    """A PNG cut in the middle of its data (PIL: SyntaxError "broken PNG file") and one whose
    colour profile inflates past PIL's limit (PIL: a ValueError that names no file) are each one
    ValueError naming the file, as a file that is no image at all is."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.png")                  # several IDAT chunks
    damaged = bytearray((tmp_path / "cut.png").read_bytes())
    second = damaged.index(b"IDAT", damaged.index(b"IDAT") + 4)
    damaged[second:second + 4] = bytes(4)                                 # the second chunk's type zeroed
    (tmp_path / "cut.png").write_bytes(bytes(damaged))
    Image.fromarray(noise[:8, :8]).save(tmp_path / "profile.png", icc_profile=bytes(2 << 20))
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("cut.png", "profile.png", "notes.png"):
        with pytest.raises(ValueError, match=f"cannot read image .*{name}: "):
            read_image(tmp_path / name)


def test_save_image_grid_rejects_bad_input(tmp_path):
    """A clear ValueError for a wrong layout, a wrong number of row or column labels, or a name
    whose extension is no image format."""
    images, _ = make_builtin_dataset(4, seed=0, image_size=16)
    with pytest.raises(ValueError, match="rows, cols"):
        save_image_grid(images, None, str(tmp_path / "x.png"))  # (N, H, W, 3): missing a grid axis
    with pytest.raises(ValueError, match="row labels"):
        save_image_grid(images.reshape(2, 2, 16, 16, 3), ["only one"], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="column labels"):
        save_image_grid(images.reshape(2, 2, 16, 16, 3), None, str(tmp_path / "x.png"), column_labels=["a"])
    with pytest.raises(ValueError, match=r"grid\.txt: \.txt is no image format PIL can write"):
        save_image_grid(images.reshape(2, 2, 16, 16, 3), None, str(tmp_path / "grid.txt"))
    assert not (tmp_path / "grid.txt").exists(), "a refused grid.txt was written anyway"


def test_atomic_output_leaves_the_old_file_or_the_new_one_and_nothing_else(tmp_path):
    """A write that fails midway leaves the previous file untouched and no temporary file; one that
    succeeds replaces it with a file everyone can read (mkstemp's own are owner-only)."""
    path = tmp_path / "table.md"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_output(str(path), ".md") as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old", "a failed write changed the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"], "a failed write left a file behind"
    with atomic_output(str(path), ".md") as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert path.read_text() == "new", "the write did not replace the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"], "the temporary file stayed"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, f"mode {oct(path.stat().st_mode)}"
    umask = os.umask(0o077)                                               # a user who keeps files private
    try:
        with atomic_output(str(path), ".md") as tmp:
            open(tmp, "w").close()
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"the umask was ignored: mode {oct(path.stat().st_mode)}"


def test_atomic_output_flushes_the_file_to_disk_before_renaming_it(tmp_path, monkeypatch):
    """os.fsync on the finished temporary file comes before os.replace gives it its name."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: calls.append("replace") or real_replace(src, dst))
    with atomic_output(str(tmp_path / "table.md"), ".md") as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert calls == ["fsync", "replace"] and (tmp_path / "table.md").read_text() == "new", calls


def test_an_output_path_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    """A folder (also a new one, named with a trailing slash), a path under a file, or an empty name is a
    ValueError naming the problem, and nothing is made; a missing folder is made."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    for folder in (str(tmp_path), str(tmp_path / "new_folder") + "/"):
        with pytest.raises(ValueError, match="is a folder; give a file name"):
            check_output_path(folder)
    assert not (tmp_path / "new_folder").exists(), "a refused path made a folder"
    with pytest.raises(ValueError, match="is not a regular file"):
        check_output_path("/dev/null")
    for empty in ("", " "):  # would train for minutes, then fail to rename the result
        with pytest.raises(ValueError, match="--out is empty; give a file name"):
            check_output_path(empty)
    with pytest.raises(ValueError, match="cannot make its folder"):
        check_output_path(str(tmp_path / "notes.txt" / "grid.png"))
    check_output_path(str(tmp_path / "new" / "grid.png"))  # a missing folder is made
    assert (tmp_path / "new").is_dir(), "the missing folder was not made"


def test_a_dataloader_worker_s_error_is_one_line_without_its_type():
    """A ValueError raised in a DataLoader worker (a broken image) reaches run_script wrapped in
    the worker's traceback; the user sees its message alone, as from the main process."""
    script = """import torch
from data import run_script
class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 1
    def __getitem__(self, i):
        raise ValueError("cannot read image x.png: broken data stream")
def main():
    list(torch.utils.data.DataLoader(Broken(), num_workers=1))
run_script(main)"""
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "error: cannot read image x.png: broken data stream", \
        result.stderr


@pytest.mark.parametrize("failure, message", [
    ("torch.empty(10 ** 14)", "error: out of memory (tried to allocate 400000000000000 bytes): ask for less"),
    ("np.empty(10 ** 15)", "error: out of memory (tried to allocate 7.11 PiB): ask for less"),
])
def test_running_out_of_memory_is_one_line_and_other_runtime_errors_keep_their_traceback(failure, message):
    """run_script turns PyTorch's and numpy's out-of-memory errors into one line and exit code 1;
    any other RuntimeError is a bug and keeps its traceback."""
    def run(body):
        script = f"import numpy as np, torch\nfrom data import run_script\ndef main():\n    {body}\nrun_script(main)"
        return subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, timeout=120)
    result = run(failure)
    assert result.returncode == 1 and result.stderr.startswith(message) and result.stderr.count("\n") == 1, \
        result.stderr
    result = run("raise RuntimeError('a bug')")
    assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr
