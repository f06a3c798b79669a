"""sample.py on tiny random models: grids, determinism, FID files, zero-shot editing, bad input."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import arpg
import evaluate
import sample
import schedules
from arpg import ARPG, ARPG_PRESETS, save_atomic
from data import CLASS_NAMES, IMAGENET_SHOWCASE, make_builtin_dataset
from tokenizer import VQConfig, VQModel, tensor_to_images

ROOT = Path(__file__).resolve().parent.parent
# A tokenizer small enough to decode in milliseconds: 8x downsampling (64x64 -> 8x8 tokens), 64 codes.
VQ_CONFIG = VQConfig(codebook_size=64, codebook_embed_dim=8, z_channels=16, ch=16, ch_mult=(1, 1, 1, 1),
                     encoder_num_res_blocks=1, decoder_num_res_blocks=1, norm_groups=8)
ARPG_CONFIG = replace(ARPG_PRESETS["tiny"], vocab_size=64, dim=64)  # 10 classes, 8x8 tokens


def random_arpg(config, seed=0):
    torch.manual_seed(seed)
    model = ARPG(config)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would sample uniformly: no structure to test
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Paths of a tiny ARPG trained "on the built-in shapes" (train.py's layout), its tokenizer and misfits."""
    folder = tmp_path_factory.mktemp("ckpts")
    paths = {name: str(folder / f"{name}.pt") for name in ("arpg", "vq", "vq_other", "official", "ema", "few_names",
                                                                   "one_class")}
    model = random_arpg(ARPG_CONFIG)
    save_atomic({"model": model.state_dict(), "config": asdict(ARPG_CONFIG), "class_names": CLASS_NAMES,
                 "step": 0}, paths["arpg"])
    save_atomic({"model": model.state_dict(), "config": asdict(ARPG_CONFIG), "class_names": CLASS_NAMES[:3]},
                paths["few_names"])                                       # 3 names for 10 classes
    one_class = replace(ARPG_CONFIG, num_classes=1)
    save_atomic({"model": random_arpg(one_class).state_dict(), "config": asdict(one_class),
                 "class_names": CLASS_NAMES[:1]}, paths["one_class"])
    save_atomic({"model": model.state_dict(), "ema": random_arpg(ARPG_CONFIG, seed=1).state_dict(),
                 "config": asdict(ARPG_CONFIG), "class_names": CLASS_NAMES}, paths["ema"])
    torch.manual_seed(0)
    save_atomic({"model": VQModel(VQ_CONFIG).state_dict(), "config": asdict(VQ_CONFIG)}, paths["vq"])
    other = replace(VQ_CONFIG, codebook_size=128)
    save_atomic({"model": VQModel(other).state_dict(), "config": asdict(other)}, paths["vq_other"])
    # The released files' layout: weights under "state_dict", no config (sizes come from the shapes),
    # 1000 ImageNet classes and a 16x16 grid. Width 128 is the tiny preset's, so its heads are known.
    official = random_arpg(replace(ARPG_PRESETS["L"], dim=128, n_layer=2, n_head=4, vocab_size=64))
    save_atomic({"state_dict": official.state_dict()}, paths["official"])
    return paths


def run(ckpts, tmp_path, *argv, out="out.png"):
    """sample.main with the tiny checkpoints; returns the output path."""
    path = str(tmp_path / out)
    sample.main(["--ckpt", ckpts["arpg"], "--vq-ckpt", ckpts["vq"], "--out", path, *argv])
    return path


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


# --- grids and determinism ---

def spy_on_generate(monkeypatch):
    """Record the labels and the `fast` flag of every ARPG.generate call; the calls still run."""
    calls = []
    real_generate = ARPG.generate

    def generate(self, labels, **kwargs):
        calls.append((labels.tolist(), kwargs.get("fast")))
        return real_generate(self, labels, **kwargs)
    monkeypatch.setattr(ARPG, "generate", generate)
    return calls


def test_grid_has_one_labelled_row_per_class(ckpts, tmp_path, monkeypatch):
    """A grid has one row per requested class and --per-class columns of 64x64 samples, with a label
    column, and row r shows the samples of the r-th class (labels 0, 0, 3, 3, 7, 7 fill it row by
    row): each tile is, pixel for pixel, the sample generated for its row's class."""
    calls = spy_on_generate(monkeypatch)
    sampled = []
    real_generate_images = sample.generate_images

    def generate_images(model, vq, labels, *args):
        tokens, images = real_generate_images(model, vq, labels, *args)
        sampled.append((labels.tolist(), images))
        return tokens, images
    monkeypatch.setattr(sample, "generate_images", generate_images)
    grid = read_png(run(ckpts, tmp_path, "--classes", "0", "3", "7", "--per-class", "2", "--steps", "4"))
    assert [labels for labels, _ in calls] == [[0, 0, 3, 3, 7, 7]], f"generate was asked for {calls}"
    [(labels, images)] = sampled
    pad = 2
    assert grid.shape[0] == 3 * (64 + pad) + pad, f"height {grid.shape[0]}: expected 3 rows of 64 px"
    label_width = grid.shape[1] - (2 * (64 + pad) + pad)
    assert label_width > 20, f"label column only {label_width} px wide: are the rows labelled?"
    for row, class_id in enumerate([0, 3, 7]):
        top = pad + row * (64 + pad)
        label = grid[top:top + 64, :label_width]
        assert (label < 128).any(), f"row {row} has no label text"
        for col in range(2):
            left = label_width + pad + col * (64 + pad)
            i = row * 2 + col
            assert labels[i] == class_id and np.array_equal(grid[top:top + 64, left:left + 64], images[i]), \
                f"tile ({row}, {col}) is not the sample of class {class_id}"


def test_same_seed_gives_the_same_images_and_another_seed_others(ckpts, tmp_path):
    """The same seed on the same device reproduces a grid pixel for pixel; another seed changes it."""
    args = ("--classes", "1", "2", "--per-class", "3", "--steps", "8")
    first = read_png(run(ckpts, tmp_path, *args, "--seed", "5", out="a.png"))
    again = read_png(run(ckpts, tmp_path, *args, "--seed", "5", out="b.png"))
    other = read_png(run(ckpts, tmp_path, *args, "--seed", "6", out="c.png"))
    assert np.array_equal(first, again), "same seed, different images"
    assert not np.array_equal(first, other), "different seeds, same images"


def test_readable_and_fast_samplers_draw_the_same_images(ckpts, tmp_path, monkeypatch):
    """--sampler readable and --sampler fast reach generate as fast=False / True and give identical
    images for the same seed."""
    calls = spy_on_generate(monkeypatch)
    args = ("--classes", "4", "--per-class", "4", "--steps", "8")
    fast = read_png(run(ckpts, tmp_path, *args, "--sampler", "fast", out="fast.png"))
    readable = read_png(run(ckpts, tmp_path, *args, "--sampler", "readable", out="readable.png"))
    assert [flag for _, flag in calls] == [True, False], f"generate's fast flags: {calls}"
    assert np.array_equal(fast, readable), "the two samplers disagree"


# --- the decoding, step by step ---

def test_frame_steps_are_fractions_of_the_steps():
    """--show-decoding shows the canvas after about 1/32, 1/16, ..., 1/2, 3/4 and all of the steps."""
    assert sample.frame_steps(32) == [1, 2, 4, 8, 16, 24, 32], f"got {sample.frame_steps(32)} for 32 steps"
    assert sample.frame_steps(64) == [2, 4, 8, 16, 32, 48, 64], f"got {sample.frame_steps(64)} for 64 steps"
    assert sample.frame_steps(8) == [1, 2, 4, 6, 8], "steps under 1 become step 1, once"
    assert sample.frame_steps(1) == [1], f"expected [1] for 1 step, got {sample.frame_steps(1)}"


def test_show_decoding_reveals_the_final_tokens_in_generation_order(ckpts, tmp_path, monkeypatch):
    """--show-decoding: row r is class r's sample; frame f shows exactly the patches of the tokens
    drawn by its step (the first n_1 + ... + n_s positions of the order generate was given), each
    as in the finished image, and grey elsewhere; the last frame is the finished image; every
    column is headed."""
    calls = []
    real_generate = ARPG.generate

    def generate(self, labels, **kwargs):
        tokens = real_generate(self, labels, **kwargs)
        calls.append((labels.tolist(), kwargs, tokens))
        return tokens
    monkeypatch.setattr(ARPG, "generate", generate)
    grid = read_png(run(ckpts, tmp_path, "--show-decoding", "--classes", "2", "5", "--steps", "8"))
    [(labels, kwargs, tokens)] = calls
    assert labels == [2, 5], f"generate was asked for {labels}"
    order = kwargs["order"].numpy()
    drawn_by = np.cumsum(schedules.reveal_counts(64, 8, kwargs["schedule"]))
    finished = tensor_to_images(VQModel.from_checkpoint(ckpts["vq"]).decode(tokens.view(-1, 8, 8)))  # (2, 64, 64, 3)

    pad, shown = 2, [1, 2, 4, 6, 8]
    header = grid.shape[0] - (2 * (64 + pad) + pad)
    label_width = grid.shape[1] - (len(shown) * (64 + pad) + pad)
    assert header > 20 and label_width > 20, f"header {header} px, label column {label_width} px"
    for f, step in enumerate(shown):
        left = label_width + pad + f * (64 + pad)
        assert (grid[:header, left:left + 64] < 128).any(), f"frame {f} has no header"
        drawn = np.zeros(64, dtype=bool)
        drawn[order[:drawn_by[step - 1]]] = True
        for r in range(2):
            top = header + pad + r * (64 + pad)
            patches = grid[top:top + 64, left:left + 64].reshape(8, 8, 8, 8, 3).swapaxes(1, 2).reshape(64, 8, 8, 3)
            expected = finished[r].reshape(8, 8, 8, 8, 3).swapaxes(1, 2).reshape(64, 8, 8, 3)
            assert np.array_equal(patches[drawn], expected[drawn]), f"row {r}, step {step}: a drawn patch differs"
            assert (patches[~drawn] == sample.EMPTY_GREY).all(), f"row {r}, step {step}: an undrawn patch shows"
    assert drawn.all(), "the last frame is not the finished image"


# --- FID files ---

@pytest.mark.parametrize("n, summary", [(25, "10 classes, 2-3 images each"), (3, "3 classes, 1 image each")])
def test_fid_says_how_many_images_each_class_got(ckpts, tmp_path, capsys, n, summary):
    """The --fid summary counts the classes that got an image: with fewer images than classes, only those."""
    run(ckpts, tmp_path, "--fid", str(n), "--steps", "2", out="samples.npz")
    assert summary in capsys.readouterr().out, f"the --fid {n} output lacks {summary!r}"


def test_fid_npz_has_the_adm_layout_and_balanced_classes(ckpts, tmp_path, monkeypatch):
    """--fid N writes arr_0 uint8 (N, H, W, 3) (what the ADM evaluator reads) and balanced labels, in
    batches: image i is the sample generated for labels[i]."""
    sampled = []
    real_generate_batches = sample.generate_batches

    def generate_batches(model, vq, labels, *args):
        start = 0
        for tokens, images in real_generate_batches(model, vq, labels, *args):
            sampled.append((labels[start:start + len(images)].numpy(), images))
            start += len(images)
            yield tokens, images
    monkeypatch.setattr(sample, "generate_batches", generate_batches)
    path = run(ckpts, tmp_path, "--fid", "25", "--batch-size", "10", "--steps", "4", out="samples.npz")
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["arr_0.npy", "labels.npy"], f"entries {archive.namelist()}"
    with np.load(path) as npz:
        images, labels = npz["arr_0"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (25, 64, 64, 3), f"arr_0 {images.dtype} {images.shape}"
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3, f"classes not balanced: {counts}"
    assert [len(batch) for _, batch in sampled] == [10, 10, 5], "not sampled in batches of 10"
    assert np.array_equal(labels, np.concatenate([batch_labels for batch_labels, _ in sampled])), \
        "the labels are not those the images were sampled for"
    assert np.array_equal(images, np.concatenate([batch for _, batch in sampled])), \
        "arr_0 is not the sampled images, in order"


def test_a_killed_fid_run_leaves_no_partial_file(ckpts, tmp_path):
    """SIGTERM (kill, timeout, a cluster's pre-emption) while --fid streams its .npz stops sample.py
    with exit code 130 and one line, and removes the half-written file."""
    folder = tmp_path / "fid"
    process = subprocess.Popen([sys.executable, "sample.py", "--ckpt", ckpts["arpg"], "--vq-ckpt", ckpts["vq"],
                                "--fid", "100000", "--steps", "4", "--out", str(folder / "samples.npz")],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(folder.glob(".tmp-*")) and time.monotonic() < deadline:  # the stream has started
        time.sleep(0.1)
    assert list(folder.glob(".tmp-*")), "the .npz stream never started"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr[-500:]
    assert list(folder.iterdir()) == [], f"left behind: {list(folder.iterdir())}"


# --- zero-shot editing ---

def test_a_token_is_kept_only_if_all_its_pixels_are_kept():
    """A masked pixel marks its whole token for regeneration; boxes on token borders mark only their tokens."""
    one_pixel = np.zeros((64, 64), dtype=bool)
    one_pixel[9, 17] = True                                               # row 9 -> token row 1, col 17 -> token col 2
    tokens = sample.token_mask(one_pixel, 8)
    assert tokens.sum() == 1 and tokens[1, 2], f"one pixel regenerated tokens {np.argwhere(tokens).tolist()}"
    aligned = sample.token_mask(sample.regenerate_pixels((64, 64), box=(16, 16, 48, 48)), 8)
    assert aligned.sum() == 16 and aligned[2:6, 2:6].all(), "an aligned 32x32 box is 4x4 tokens"
    shifted = sample.token_mask(sample.regenerate_pixels((64, 64), box=(15, 16, 48, 48)), 8)
    assert shifted.sum() == 20, "a box one pixel wider reaches into a fifth token column"


@pytest.mark.parametrize("mode, extra, grid, offset, n_known, expected_classes", [
    ("inpaint", ["--box", "16", "16", "48", "48"], (8, 8), (0, 0), 48, [0]),
    ("class-edit", ["--image-class", "2", "--classes", "5", "6"], (8, 8), (0, 0), 48, [5, 6]),
    # no --classes: every class but the image's own; default box: the centre 4x4 tokens
    ("class-edit", ["--image-class", "2"], (8, 8), (0, 0), 48, [0, 1, 3, 4, 5, 6, 7, 8, 9]),
    ("outpaint", ["--extend", "1", "0", "2", "3"], (9, 13), (1, 2), 64, [0]),
    ("outpaint", ["--image-class", "3"], (12, 12), (2, 2), 64, [3]),  # default --extend: 8 // 4 on every side
    ("expand", ["--grid", "12", "10"], (12, 10), None, 0, list(range(10))),
    ("expand", ["--classes", "1"], (16, 16), None, 0, [1]),               # default --grid: twice the 8x8 side
])
def test_edits_keep_the_known_tokens_and_fill_the_rest(ckpts, mode, extra, grid, offset, n_known, expected_classes):
    """Every edit puts the input's tokens on the canvas and returns them unchanged, and samples
    every other position: a position left unsampled would keep generate's starting 0 in every row,
    and (inpaint, class-edit) the canvas's old code is redrawn somewhere, so neither stays in all
    rows (the seed is fixed: a pass is no accident of sampling). (That generate decodes each
    position exactly once is tests/test_arpg.py's.) Each edit generates under the classes it should: --classes when
    given, else inpaint / outpaint the image's class (--image-class, default 0), class-edit every
    class but the image's own, expand the default rows; outpaint's default --extend and expand's
    default --grid give the canvases their help texts name."""
    args = sample.parse_args(["--ckpt", ckpts["arpg"], "--vq-ckpt", ckpts["vq"], "--edit", mode, "--per-class", "3",
                              "--steps", "16", *extra])
    sample.check_flags(args)                                              # as main does: fills in mode defaults
    model, vq, names, _, _ = sample.load_models(args)
    canvas, input_panel, mask_panel, classes = sample.plan_edit(args, model, vq, names)
    assert canvas.grid == grid, f"canvas {canvas.grid}, expected {grid}"
    labels = torch.tensor(classes).repeat_interleave(3)
    tokens, images = sample.generate_images(model, vq, labels, canvas, sample.edit_steps(16, canvas),
                                            sample.decoding_settings(args), torch.Generator().manual_seed(0), 4)
    rows, cols = grid
    assert images.shape == (len(labels), rows * 8, cols * 8, 3), f"images {images.shape}"
    assert input_panel.shape == mask_panel.shape == images.shape[1:], "panels and results differ in size"
    assert tokens.min() >= 0 and tokens.max() < VQ_CONFIG.codebook_size, "tokens outside the codebook"
    assert classes == expected_classes, f"{mode} {extra}: generated under {classes}, expected {expected_classes}"
    if n_known == 0:
        assert canvas.known_mask is None, "expand from the class alone has no known tokens"
    known = canvas.known_mask if n_known else torch.zeros(rows * cols, dtype=torch.bool)  # (L,)
    assert (tokens[:, ~known] != 0).any(0).all(), "some positions kept generate's starting 0 in every sample"
    if n_known == 0:
        return
    given = canvas.known_tokens.expand(len(labels), -1)                   # (N, L)
    assert int(known.sum()) == n_known, f"{int(known.sum())} known tokens, expected {n_known}"
    assert torch.equal(tokens[:, known], given[:, known]), "known tokens changed"
    sampled = (tokens[:, ~known] != given[:, ~known]).any(0)              # per unknown position
    assert sampled.all(), f"{int((~sampled).sum())} unknown positions kept the canvas's token in every sample"
    image, _ = sample.edit_input(args, model, vq, names)
    codes = vq.encode_images(image[None])[0]                             # (8, 8) the input's tokens
    top, left = offset
    placed = given[0].view(rows, cols)[top:top + 8, left:left + 8]
    placed_known = known.view(rows, cols)[top:top + 8, left:left + 8]
    assert torch.equal(placed[placed_known], codes[placed_known]), "the canvas does not hold the input's tokens"


def test_inpainting_your_own_image_redraws_the_white_of_its_mask(ckpts, tmp_path):
    """--image with --mask (the README's command): the tokens under the mask's white pixels (grey
    128 and up) are redrawn and every other token is the image's own code; the mask panel is
    white exactly over the redrawn tokens; the command writes its grid."""
    image = make_builtin_dataset(1, seed=5)[0][0]                         # (64, 64, 3)
    Image.fromarray(image).save(tmp_path / "mine.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[0:16, 0:24] = 255                                                # token rows 0-1, columns 0-2
    mask[40, 40] = 128                                                    # one pixel at the threshold: token (5, 5)
    mask[56, 8] = 127                                                     # one just below it: token (7, 1) kept
    Image.fromarray(mask).save(tmp_path / "hole.png")
    flags = ["--edit", "inpaint", "--image", str(tmp_path / "mine.png"), "--mask", str(tmp_path / "hole.png"),
             "--classes", "1"]
    args = sample.parse_args(["--ckpt", ckpts["arpg"], "--vq-ckpt", ckpts["vq"], *flags])
    sample.check_flags(args)
    model, vq, names, _, _ = sample.load_models(args)
    canvas, input_panel, mask_panel, _ = sample.plan_edit(args, model, vq, names)
    redrawn = np.zeros((8, 8), dtype=bool)
    redrawn[0:2, 0:3] = redrawn[5, 5] = True
    assert torch.equal(canvas.known_mask, torch.from_numpy(~redrawn).flatten()), "not the mask's tokens"
    kept = canvas.known_mask
    assert torch.equal(canvas.known_tokens[0, kept], vq.encode_images(image[None])[0].flatten()[kept]), \
        "the kept tokens are not the image's codes"
    assert np.array_equal(input_panel, image), "the input panel is not the image"
    white = (mask_panel == 255).all(-1)                                   # (64, 64); its 1-pixel frame is grey
    assert np.array_equal(white[1:-1, 1:-1], np.kron(redrawn, np.ones((8, 8), dtype=bool))[1:-1, 1:-1]), \
        "the mask panel is not white exactly over the redrawn tokens"
    assert os.path.isfile(run(ckpts, tmp_path, *flags, "--per-class", "2", "--steps", "4")), \
        "the edit with --per-class 2 wrote no image"


def test_an_edit_s_default_steps_fit_its_canvas(ckpts, tmp_path, capsys):
    """Without --steps, an edit decodes its canvas in 32 steps, or one per token on a canvas of
    fewer (a 4 x 4 expand: 16), as a grid does on the model's own canvas; not refused for 32."""
    run(ckpts, tmp_path, "--edit", "expand", "--grid", "4", "4", "--per-class", "1", "--classes", "0")
    assert "expand: decoding 16 of 16 tokens in 16 steps" in capsys.readouterr().out, \
        "expected a 4 x 4 expand to decode its 16 tokens in 16 steps"


def test_edit_png_shows_input_mask_and_results(ckpts, tmp_path):
    """An edit PNG row is input | mask | results: the input panel is the default built-in image (class
    0's first, drawn with evaluate.INPAINT_SEED), the mask panel is white where tokens were regenerated."""
    grid = read_png(run(ckpts, tmp_path, "--edit", "inpaint", "--box", "16", "16", "48", "48", "--per-class", "2",
                        "--steps", "8"))
    pad = 2
    assert grid.shape[0] == 64 + 2 * pad, f"height {grid.shape[0]}: one row expected"
    input_left = grid.shape[1] - 4 * (64 + pad)                         # after the label column
    source = make_builtin_dataset(10, seed=evaluate.INPAINT_SEED)[0][0]  # images cycle through the classes
    assert np.array_equal(grid[pad:pad + 64, input_left:input_left + 64], source), "the input panel is not the input"
    left = grid.shape[1] - 4 * (64 + pad) - pad + pad + (64 + pad)     # x of the mask panel
    mask = grid[pad:pad + 64, left:left + 64]
    assert (mask[20:44, 20:44] == 255).all(), "the regenerated centre is not white in the mask panel"
    assert (mask[4:12, 4:60] == 0).all(), "a kept region is not black in the mask panel"


def test_edit_steps_keep_the_tokens_per_step_of_a_full_canvas():
    """--steps counts steps for a whole canvas: 16 unknown of 64 tokens at 32 steps take 8 steps."""
    regenerate = np.zeros((8, 8), dtype=bool)
    regenerate[:2] = True                                                 # the top two token rows: 16 tokens
    canvas = sample.inpaint_canvas(torch.zeros(1, 8, 8, dtype=torch.long), regenerate)
    assert canvas.n_unknown == 16 and sample.edit_steps(32, canvas) == 8, f"{canvas.n_unknown} unknown"
    assert sample.edit_steps(1, canvas) == 1, "at least one step"
    small = sample.Canvas((3, 5))                                         # --edit expand --grid 3 5: 15 tokens
    assert sample.edit_steps(32, small) == 15, "more steps than tokens to decode"


# --- official checkpoints and EMA ---

def test_official_layout_is_recognised_with_imagenet_class_ids(ckpts, tmp_path):
    """A released-layout file (state_dict, no config) loads by its shapes: 1000 classes, 16x16 tokens."""
    grid = read_png(run(dict(ckpts, arpg=ckpts["official"]), tmp_path, "--classes", "207", "999",
                        "--per-class", "1", "--steps", "4", "--cfg", "5.0"))
    assert grid.shape[0] == 2 * (128 + 2) + 2, f"height {grid.shape[0]}: expected two rows of 128 px"
    assert sample.default_classes([str(c) for c in range(1000)]) == IMAGENET_SHOWCASE, "ImageNet defaults"


def test_guidance_and_top_p_default_to_the_checkpoints_and_the_flags_win(ckpts, tmp_path):
    """train.py's checkpoints name the guidance, its schedule, the decoding schedule and the top-p
    their recipe samples with; sample.py uses them unless --cfg / --cfg-schedule / --schedule /
    --top-p are given, and the paper's linear guidance to 4, arccos schedule and top-p off for
    checkpoints naming none."""
    named = str(tmp_path / "arpg.pt")
    save_atomic({**torch.load(ckpts["arpg"], weights_only=True),
                 "sampling": {"cfg_scale": 2.5, "cfg_schedule": "constant", "schedule": "cosine", "top_p": 0.7}},
                named)
    flags = ["--cfg", "5", "--cfg-schedule", "linear", "--schedule", "arccos", "--top-p", "0.9"]
    for path, flags, expected in [(named, [], (2.5, "constant", "cosine", 0.7)),
                                  (named, flags, (5.0, "linear", "arccos", 0.9)),
                                  (ckpts["arpg"], [], (4.0, "linear", "arccos", 1.0))]:
        args = sample.parse_args(["--ckpt", path, "--vq-ckpt", ckpts["vq"], *flags])
        settings = sample.decoding_settings(args, sample.load_models(args)[4])
        assert tuple(settings[key] for key in ("cfg_scale", "cfg_schedule", "schedule", "top_p")) == expected, \
            f"{path} {flags}: {settings}"


def test_ema_weights_are_used_when_present_unless_no_ema(ckpts):
    """A checkpoint with an EMA copy samples from it; --no-ema takes the trained weights."""
    base = ["--ckpt", ckpts["ema"], "--vq-ckpt", ckpts["vq"]]
    ema_model = sample.load_models(sample.parse_args(base))[0]
    raw_model = sample.load_models(sample.parse_args(base + ["--no-ema"]))[0]
    expected_ema, expected_raw = random_arpg(ARPG_CONFIG, seed=1), random_arpg(ARPG_CONFIG, seed=0)
    assert torch.equal(ema_model.head.weight, expected_ema.head.weight), "EMA weights not used"
    assert torch.equal(raw_model.head.weight, expected_raw.head.weight), "--no-ema did not load the trained weights"


# --- evaluation ---

def test_eval_writes_a_table_with_real_and_generated_rows(ckpts, tmp_path, monkeypatch):
    """--eval scores real images, tokenizer reconstructions and samples at each step count, into one
    table, followed by ARPG's own classification of the real images. "inpainting keeps class" is
    the classifier's accuracy on the inpainted images against their sources' labels: the stand-in
    classifier's predictions for those images are set to be right for 7 of 20 after 2 steps and 13
    of 20 after 4, so the table must say 35.0% and 65.0% (a score of the untouched sources would
    be the same at both). The closing line is likelihood_classification's answer for the tokens
    and labels of the real images (evaluate.SECOND_REAL_SEED) the tokenizer encoded."""
    classifier = str(tmp_path / "classifier.pt")
    evaluate.load_classifier(classifier, n_train=100, train_steps=5, log=lambda line: None)  # cheap stand-in
    inpainted = []                                                        # (images, labels) per step count
    real_generate_images = sample.generate_images

    def generate_images(model, vq, labels, canvas, *args):
        tokens, images = real_generate_images(model, vq, labels, canvas, *args)
        if canvas.known_mask is not None:                                 # the inpainting call
            inpainted.append((images, labels.numpy()))
        return tokens, images
    real_classify = evaluate.classify

    def classify(network, images, *args, **kwargs):
        predictions, features = real_classify(network, images, *args, **kwargs)
        for n_right, (done, labels) in zip((7, 13), inpainted):
            if images is done:
                predictions = np.where(np.arange(len(labels)) < n_right, labels, (labels + 1) % 10)
        return predictions, features
    asked = []
    real_likelihood = evaluate.likelihood_classification

    def likelihood_classification(model, codes, labels, **kwargs):
        asked.append((codes, labels, real_likelihood(model, codes, labels, **kwargs)))
        return asked[-1][2]
    monkeypatch.setattr(sample, "generate_images", generate_images)
    monkeypatch.setattr(evaluate, "classify", classify)
    monkeypatch.setattr(evaluate, "likelihood_classification", likelihood_classification)
    path = run(ckpts, tmp_path, "--eval", "2", "4", "--eval-samples", "20", "--classifier", classifier, out="eval.md")
    table = Path(path).read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for row, keeps in (("real images", "-"), ("tokenizer reconstructions", "-"), ("ARPG, 2 steps", "35.0%"),
                       ("ARPG, 4 steps", "65.0%")):
        assert row in rows and rows[row].startswith(f"| {row} | 20 |"), f"row {row!r} missing from\n{table}"
        assert rows[row].endswith(f" | {keeps} |"), f"row {row!r}: inpainting keeps class should be {keeps}\n{table}"
    _, source_labels = make_builtin_dataset(20, seed=evaluate.INPAINT_SEED)
    assert [labels.tolist() for _, labels in inpainted] == [source_labels.tolist()] * 2, \
        "the inpainted images were not generated under their sources' labels"
    real_images, real_labels = make_builtin_dataset(20, seed=evaluate.SECOND_REAL_SEED)
    [(codes, labels, knows)] = asked
    expected_codes = VQModel.from_checkpoint(ckpts["vq"]).encode_images(real_images).flatten(1)  # (20, 64)
    assert torch.equal(codes, expected_codes) and np.array_equal(labels, real_labels), \
        "ARPG classified other images than the real ones of the first two rows"
    assert re.search(rf"ARPG as a classifier of the 20 real images .*: {re.escape(f'{knows:.1%}')}$", table.strip()), \
        f"the closing line does not give likelihood_classification's {knows:.1%}:\n{table}"


# --- bad input: one clear error, nothing written ---

def write_png(path, height, width, value=255):
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)
    return str(path)


def test_an_edit_on_a_larger_canvas_takes_more_steps_than_the_model_s_grid_has_tokens(ckpts, tmp_path, capsys):
    """--steps counts steps for the whole canvas: expanding to 10 x 10 tokens (100, the model's grid
    has 64) decodes one token per step at --steps 100, not at most 64."""
    run(ckpts, tmp_path, "--edit", "expand", "--grid", "10", "10", "--steps", "100", "--classes", "1",
        "--per-class", "1")
    assert "expand: decoding 100 of 100 tokens in 100 steps" in capsys.readouterr().out, \
        "expected a 10 x 10 expand to decode its 100 tokens in 100 steps"


def test_the_default_steps_fit_a_grid_of_fewer_tokens(ckpts, tmp_path, capsys):
    """A model of a 4 x 4 grid (16 tokens) samples with no --steps: one step per token, not a
    refused 32."""
    path = tmp_path / "small.pt"
    config = replace(ARPG_CONFIG, block_size=16)
    save_atomic({"model": random_arpg(config).state_dict(), "config": asdict(config),
                 "class_names": CLASS_NAMES}, str(path))
    sample.main(["--ckpt", str(path), "--vq-ckpt", ckpts["vq"], "--classes", "1", "--per-class", "1", "--out",
                 str(tmp_path / "grid.png")])
    assert "16 steps" in capsys.readouterr().out, "expected 16 steps, one per token of the 4 x 4 grid"


def test_decoding_settings_are_refused_before_the_evaluation_scores_anything(ckpts, tmp_path, monkeypatch):
    """--eval --top-p 0 is refused before the classifier is loaded or trained (about 20 s) and the real
    images are scored."""
    monkeypatch.setattr(evaluate, "load_classifier", lambda *args, **kwargs: pytest.fail("scored first"))
    with pytest.raises(ValueError, match=re.escape("top-p must be in (0, 1], got 0.0")):
        run(ckpts, tmp_path, "--eval", "4", "--top-p", "0", out="eval.md")


@pytest.mark.parametrize("case, message", [
    (["--classes", "10"], "--classes 10 out of range"),
    (["--steps", "0"], "steps must be between 1 and 64"),
    (["--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
    (["--cfg", "nan"], "temperature and guidance must be finite numbers, got 1.0 and nan"),
    (["--temperature", "inf"], "temperature and guidance must be finite numbers, got inf and"),
    (["--temperature", "-1"], "temperature (0: nearly greedy) and top-k (0: off) must be 0 or more"),
    (["--top-k", "-3"], "temperature (0: nearly greedy) and top-k (0: off) must be 0 or more"),
    (["--edit", "inpaint", "--image-index", "1000"], "--image-index must be in 0..999, got 1000"),
    (["--steps", "65"], "steps must be between 1 and 64"),
    (["--edit", "inpaint", "--mask", "MASK_40x64"], "same size"),
    (["--edit", "inpaint", "--mask", "NOT_AN_IMAGE"], "cannot read mask"),
    (["--edit", "inpaint", "--image", "NOT_AN_IMAGE"], "cannot read image"),
    (["--edit", "inpaint", "--image", "IMAGE_64x64", "--image-class", "12"], "--image-class 12 out of range"),
    (["--out", "FOLDER"], "is a folder; give a file name"),
    (["--device", "gpu0"], "--device gpu0: not a device name"),
    (["--eval", "4", "--eval-samples", "1"], "--eval-samples must be at least 2"),
    (["--eval-samples", "50"], "--eval-samples does not apply to this mode"),
    (["--fid", "10", "--per-class", "2"], "--per-class does not apply to this mode"),
    (["--show-decoding", "--per-class", "2"], "--per-class does not apply to this mode"),
    (["--show-decoding", "--classes", "10"], "--classes 10 out of range"),
    (["--eval", "4", "--classes", "1"], "--classes does not apply to this mode"),
    (["--edit", "inpaint", "--image", "IMAGE_64x64", "--image-index", "3"], "--image-index picks a built-in image"),
    (["--image-index", "3"], "--image-index only applies to --edit inpaint / class-edit / outpaint"),
    (["--classes", "12", "3", "12"], "--classes 12 out of range"),
    (["--compile", "--sampler", "readable"], "--compile compiles the fast sampler's steps; it does not go with"),
    (["--out", "UNDER_A_FILE"], "cannot make its folder"),
    (["--out", "GRID_TXT"], ".txt is no image format PIL can write"),
    (["--fid", "10", "--out", "FID_PNG"], "--fid writes an .npz archive (what the ADM evaluator reads)"),
    (["--edit", "inpaint", "--out", "GRID_TXT"], ".txt is no image format PIL can write"),
    (["--edit", "inpaint", "--image", "IMAGE_60x64"], "not a multiple of the tokenizer's downsampling factor 8"),
    (["--edit", "inpaint", "--box", "0", "0", "80", "10"], "--box 0 0 80 10 must satisfy"),
    (["--edit", "outpaint", "--box", "0", "0", "8", "8"], "--box only applies to --edit inpaint / class-edit"),
    (["--ckpt", "MISSING"], "ARPG checkpoint not found"),
    (["--ckpt", "FOLDER"], "is a folder; give the checkpoint file in it"),
    (["--ckpt", "NOT_AN_IMAGE"], "is it a PyTorch checkpoint?"),
    (["--ckpt", "VQ"], "no ARPG weights"),
    (["--vq-ckpt", "ARPG"], "is an ARPG checkpoint, not a tokenizer"),
    (["--vq-ckpt", "VQ_OTHER"], "models 64 codes but the tokenizer"),
    (["--edit", "expand", "--grid", "0", "5"], "--grid must be positive, got 0 5"),
    (["--edit", "outpaint", "--extend", "-1", "0", "2", "0"], "--extend needs non-negative token counts"),
    (["--fid", "10", "--classes", "1", "1", "2"], "--fid balances the classes given: list each once"),
    (["--edit", "expand", "--grid", "4", "4", "--steps", "17"], "between 1 and 16 (the tokens of the 4x4 canvas)"),
    (["--edit", "class-edit", "--image", "IMAGE_64x64"], "--edit class-edit on your own image needs --classes"),
    (["--ckpt", "ONE_CLASS", "--edit", "class-edit", "--image", "IMAGE_64x64", "--image-class", "0"],
     "--edit class-edit redraws the region under the other classes, and this model has one"),
    (["--vq-ckpt", "MISSING"], "tokenizer checkpoint not found: "),
    (["--ckpt", "FEW_NAMES"], "lists 3 class names for 10 classes"),
    (["--ckpt", "OFFICIAL", "--edit", "inpaint"], "--edit inpaint needs --image for a model not trained on the"),
    (["--edit", "inpaint", "--mask", "BLACK_64x64"], "the mask selects no pixel to regenerate: paint the region white"),
    (["--edit", "inpaint", "--image", "IMAGE_64x64"], "--edit inpaint on your own image needs the class to generate "
                                                      "under: --classes C (or --image-class C)"),
    (["--ckpt", "OFFICIAL", "--edit", "class-edit", "--image", "IMAGE_64x64", "--image-class", "207", "--per-class",
      "1", "--steps", "1"], "--edit class-edit needs --classes: the classes to redraw the region as"),  # 999 rows
    (["--per-class", "0"], "--per-class must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--fid", "0", "--out", "FID_NPZ"], "--fid must be at least 1, got 0"),
    (["--out", ""], "--out is empty: give a file name, or leave the flag out"),            # not out/sample_grid.png
    (["--vq-ckpt", ""], "--vq-ckpt is empty"),                                           # not the checkpoint's
    (["--eval", "4", "--classifier", "", "--out", "EVAL_MD"], "--classifier is empty"),  # not out/classifier.pt
    (["--seed", str(2 ** 64)], "--seed must fit in 64 bits, got 18446744073709551616"),
    (["--eval", "4", "--steps", "8", "--out", "EVAL_MD"], "--eval with step counts evaluates those: drop --steps"),
    (["--eval", "4", "--eval-samples", "2"], "--eval writes a markdown table; end the name with .md"),  # never.png
    (["--edit", "inpaint", "--mask", "MASK_64x64", "--box", "0", "0", "8", "8"], "give --mask or --box, not both"),
    # (--eval-samples and --classifier: a broken check would fail at once, not score 1000 images for minutes)
    (["--ckpt", "OFFICIAL", "--eval", "4", "--eval-samples", "2", "--classifier", "NOT_AN_IMAGE", "--out", "EVAL_MD"],
     "--eval measures models trained on the built-in shapes"),
])
def test_bad_input_is_refused_with_a_clear_message(ckpts, tmp_path, case, message):
    """Each bad input raises ValueError/FileNotFoundError (one 'error:' line from the CLI) and writes nothing."""
    files = {"MASK_40x64": write_png(tmp_path / "mask.png", 40, 64),
             "IMAGE_60x64": write_png(tmp_path / "image.png", 60, 64),
             "IMAGE_64x64": write_png(tmp_path / "square.png", 64, 64),
             "MISSING": str(tmp_path / "missing.pt"), "VQ": ckpts["vq"], "ARPG": ckpts["arpg"],
             "VQ_OTHER": ckpts["vq_other"], "NOT_AN_IMAGE": str(tmp_path / "notes.png"), "FOLDER": str(tmp_path),
             "UNDER_A_FILE": str(tmp_path / "notes.png" / "grid.png"), "GRID_TXT": str(tmp_path / "grid.txt"),
             "FID_PNG": str(tmp_path / "fid.png"), "FID_NPZ": str(tmp_path / "fid.npz"),
             "EVAL_MD": str(tmp_path / "eval.md"), "MASK_64x64": write_png(tmp_path / "white.png", 64, 64),
             "BLACK_64x64": write_png(tmp_path / "black.png", 64, 64, value=0),
             "FEW_NAMES": ckpts["few_names"], "OFFICIAL": ckpts["official"],
             "ONE_CLASS": ckpts["one_class"]}
    (tmp_path / "notes.png").write_text("not a picture")
    argv = [files.get(arg, arg) for arg in case]
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        run(ckpts, tmp_path, *argv, out="never.png")
    assert not any((tmp_path / name).exists() for name in ("never.png", "grid.txt", "fid.png", "fid.npz", "eval.md")), \
        "a refused command wrote its output"


def test_compile_reaches_the_fast_sampler(ckpts, tmp_path, monkeypatch):
    """--compile hands the fast path's two step functions to the compiler (here a stand-in that
    records them, since compiling takes minutes on a CPU; tests/test_arpg.py has dynamo trace the
    compiled fast path through a backend that only counts its graphs, and checks it samples the
    readable path's tokens: no CPU test builds inductor kernels for these steps)."""
    compiled = []
    monkeypatch.setattr(arpg, "compile_for_any_size", lambda step: compiled.append(step.__name__) or step)
    run(ckpts, tmp_path, "--steps", "4", "--per-class", "1", "--classes", "0")
    assert compiled == [], "compiled without --compile"
    run(ckpts, tmp_path, "--steps", "4", "--per-class", "1", "--classes", "0", "--compile")
    assert compiled == ["_context_step", "_guided"], compiled


def test_a_checkpoint_that_names_no_tokenizer_needs_vq_ckpt(ckpts, tmp_path, monkeypatch):
    """A checkpoint that names no tokenizer (trained on codes, or an official release) is refused
    without --vq-ckpt, even where the default run's out/tokenizer.pt exists and would decode its
    codes into something; a checkpoint that names its tokenizer finds it."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("out")
    shutil.copy(ckpts["vq"], "out/tokenizer.pt")                          # the default run's, codes of the same count
    with pytest.raises(ValueError, match="does not name the tokenizer its codes come from .* pass it with --vq-ckpt"):
        sample.main(["--ckpt", ckpts["arpg"], "--out", "never.png"])
    assert not os.path.exists("never.png"), "a refused run wrote its grid"
    shutil.copy(ckpts["vq_other"], "out/tokenizer.pt")                    # 128 codes: refused if it were read
    named = {**torch.load(ckpts["arpg"], weights_only=True), "tokenizer": ckpts["vq"]}
    save_atomic(named, "named.pt")
    sample.main(["--ckpt", "named.pt", "--steps", "4", "--per-class", "1", "--classes", "0", "--out", "grid.png"])
    assert os.path.isfile("grid.png"), "the named tokenizer was not used"


def test_cli_prints_one_error_line_and_exits_2(ckpts, tmp_path):
    """From the command line, a bad class id is one 'error: ...' line on stderr and exit code 2."""
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpts["arpg"], "--vq-ckpt", ckpts["vq"],
                             "--classes", "12", "--out", str(tmp_path / "x.png")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit code {result.returncode}, stderr {result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: --classes 12 out of range"), f"stderr {result.stderr!r}"
