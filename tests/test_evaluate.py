"""evaluate.py: the Frechet distance, the cached classifier, ARPG as a classifier, and the command line."""

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from arpg import ARPG, ARPG_PRESETS
from data import make_builtin_dataset

ROOT = Path(__file__).resolve().parent.parent


def correlated_features(seed, n, dim=6):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim))                                  # a random full covariance
    return rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim)


# --- the Frechet distance ---

def test_symmetric_sqrt_squares_back_to_the_matrix():
    """symmetric_sqrt(M) @ symmetric_sqrt(M) == M for a covariance matrix."""
    cov = np.cov(correlated_features(0, 200), rowvar=False)
    root = evaluate.symmetric_sqrt(cov)
    assert np.allclose(root @ root, cov, atol=1e-9), f"max error {np.abs(root @ root - cov).max():.2e}"


def test_frechet_distance_matches_the_textbook_formula():
    """The symmetric form equals |mu_a - mu_b|^2 + Tr(S_a + S_b) - 2 Tr((S_a S_b)^1/2), computed from the
    eigenvalues of the non-symmetric product S_a S_b."""
    a, b = correlated_features(1, 500), correlated_features(2, 400)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(0)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    got = evaluate.frechet_distance(a, b)
    assert abs(got - expected) <= 1e-8 * max(1.0, expected), f"{got} vs {expected}"


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    """d(x, x) = 0 and a mean shift of s in every one of F dimensions adds F s^2."""
    a = correlated_features(3, 300)
    assert 0 <= evaluate.frechet_distance(a, a) < 1e-7, "distance of a set to itself is not 0 (or below it)"
    few = correlated_features(4, 3)                                       # fewer samples than features
    assert evaluate.frechet_distance(few, few) >= 0, "rounding made a distance negative"
    shifted = evaluate.frechet_distance(a, a + 0.5)
    assert abs(shifted - 6 * 0.25) < 1e-6, f"shift by 0.5 in 6 dims gave {shifted}, expected 1.5"


# --- the classifier ---

def test_classifier_learns_the_shapes():
    """A short training run already sorts held-out shapes far better than chance (10%)."""
    images, labels = make_builtin_dataset(600, seed=evaluate.CLASSIFIER_TRAIN_SEED)
    classifier = evaluate.train_classifier(images, labels, steps=120)
    test_images, test_labels = make_builtin_dataset(200, seed=evaluate.HELDOUT_SEED)
    accuracy = evaluate.class_accuracy(evaluate.classify(classifier, test_images)[0], test_labels)
    assert accuracy > 0.4, f"held-out accuracy {accuracy:.1%} after 120 steps"


@pytest.fixture(scope="module")
def cached_classifier(tmp_path_factory):
    """A classifier trained for a few steps and cached on disk (the real one takes ~half a minute)."""
    path = str(tmp_path_factory.mktemp("classifier") / "classifier.pt")
    log = []
    classifier, accuracy = evaluate.load_classifier(path, n_train=100, train_steps=5, log=log.append)
    assert any("training" in line for line in log), "no classifier was trained for an empty cache"
    return path, classifier, accuracy


def test_classifier_is_cached_and_reused(cached_classifier, monkeypatch):
    """The second load reads the cache (no training) and predicts exactly as the first."""
    path, first, accuracy = cached_classifier

    def refuse(*args, **kwargs):
        raise AssertionError("retrained although the cache holds a classifier for this size")

    monkeypatch.setattr(evaluate, "train_classifier", refuse)
    second, cached_accuracy = evaluate.load_classifier(path, log=lambda line: None)
    images, _ = make_builtin_dataset(20, seed=7)
    assert cached_accuracy == accuracy, "the cached held-out accuracy changed"
    assert np.array_equal(evaluate.classify(first, images)[1], evaluate.classify(second, images)[1]), \
        "the cached classifier gives other features"


def test_another_checkpoint_given_as_the_classifier_is_refused_and_left_alone(tmp_path):
    """A model checkpoint passed as --classifier by mistake is not overwritten by a new classifier."""
    path = tmp_path / "arpg.pt"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "config": {}}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="is not an evaluation classifier"):
        evaluate.load_classifier(str(path), n_train=10, train_steps=1, log=lambda line: None)
    assert path.read_bytes() == before, "the checkpoint was changed"


def test_a_classifier_path_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch):
    """A folder as --classifier is refused, naming the flag, before minutes of training."""
    monkeypatch.setattr(evaluate, "train_classifier", lambda *args, **kwargs: pytest.fail("trained first"))
    with pytest.raises(ValueError, match=f"--classifier {tmp_path} is a folder; give a file name in it"):
        evaluate.load_classifier(str(tmp_path), n_train=10, train_steps=1, log=lambda line: None)


# --- the command line ---

def test_cli_scores_a_sample_file_and_refuses_one_without_labels(cached_classifier, tmp_path):
    """`evaluate.py --npz` adds a row for the file next to as many real images as it holds, scored
    against the file's own labels: labelled with the classifier's predictions the images score
    100.0%, labelled one class off 0.0%, with the Frechet distance of those images; a file without
    labels is one error line."""
    path, classifier, _ = cached_classifier
    images, _ = make_builtin_dataset(30, seed=9)
    predictions, _ = evaluate.classify(classifier, images)
    reference, _ = evaluate.real_image_rows(classifier, 30)
    frechet = evaluate.score_images(classifier, images, predictions, reference)["frechet"]
    command = [sys.executable, "evaluate.py", "--classifier", path, "--npz"]  # --n: the file's 30 images
    for name, labels, accuracy in (("agreed.npz", predictions, "100.0%"), ("off.npz", (predictions + 1) % 10, "0.0%")):
        np.savez(tmp_path / name, arr_0=images, labels=labels)
        result = subprocess.run(command + [str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr}"
        assert "| real images | 30 |" in result.stdout, result.stdout
        assert f"| {name} | 30 | {accuracy} | {frechet:.2f} |" in result.stdout, result.stdout
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=images)
    result = subprocess.run(command + [str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "needs arr_0 (images) and labels" in lines[0], result.stderr


def frechet_in_table(output, name):
    """The Frechet distance of row `name` in evaluate.py's printed table."""
    [row] = [line for line in output.splitlines() if line.startswith(f"| {name} |")]
    return float(row.split(" | ")[3])


def test_cli_frechet_is_zero_for_the_reference_images_themselves_and_positive_for_others(cached_classifier,
                                                                                         tmp_path, capsys):
    """The Frechet distance of a sample file is measured against the real reference set: a file that
    holds exactly the n reference images (REFERENCE_SEED, as many as the file) scores 0.00, and n
    real images of another seed score more, as the real-vs-real row does. An independent check of
    the number the CLI prints: a score that compared the file's features with themselves, or with
    another set than the reference, fails one of the two."""
    path, _, _ = cached_classifier
    scores = {}
    for name, seed in (("reference.npz", evaluate.REFERENCE_SEED), ("other.npz", 9)):
        images, labels = make_builtin_dataset(30, seed=seed)
        np.savez(tmp_path / name, arr_0=images, labels=labels)
        evaluate.main(["--classifier", path, "--npz", str(tmp_path / name)])
        output = capsys.readouterr().out
        scores[name], scores["real images"] = frechet_in_table(output, name), frechet_in_table(output, "real images")
    assert abs(scores["reference.npz"]) < 0.005, f"the reference images are {scores['reference.npz']} from themselves"
    assert scores["other.npz"] > 0.05 and scores["real images"] > 0.05, f"other real images score {scores}"


def test_arpg_as_a_classifier_names_the_classes_it_learnt_and_not_swapped_labels():
    """A tiny ARPG trained briefly on images whose codes give the class away (class c draws its
    tokens from 4c..4c+3) assigns fresh images to their own class, and none to a wrong label."""
    torch.manual_seed(0)
    # 4 layers, not the preset's 7: this toy model must learn the code ranges in 40 steps
    model = ARPG(replace(ARPG_PRESETS["tiny"], n_layer=4, vocab_size=16, num_classes=4, block_size=16))

    def draw(n):
        labels = torch.randint(0, 4, (n,))
        return labels[:, None] * 4 + torch.randint(0, 4, (n, 16)), labels

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        _, loss = model(*draw(32))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    codes, labels = draw(40)
    assert evaluate.likelihood_classification(model, codes, labels, n_orders=2, batch_size=16) == 1.0, "true labels"
    assert evaluate.likelihood_classification(model, codes, (labels + 1) % 4, n_orders=2) == 0.0, "shifted labels"


def test_cli_refuses_a_damaged_sample_file_in_one_line(tmp_path):
    """An .npz whose image member fails its checksum (a byte flipped on the way) is a ValueError
    naming the file (one 'error:' line), not zipfile's traceback."""
    images, labels = make_builtin_dataset(4, seed=9)
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=images, labels=labels)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF                                          # inside arr_0's pixels
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{path} is damaged (")):
        evaluate.main(["--npz", str(path), "--classifier", str(tmp_path / "never.pt")])
    assert not (tmp_path / "never.pt").exists(), "the classifier was written though the npz is damaged"
    np.savez(path, arr_0=np.array([object()], dtype=object), labels=labels)  # pickled: never loaded
    with pytest.raises(ValueError, match=re.escape(f"{path} cannot be read (") + ".*sample.py --fid N"):
        evaluate.main(["--npz", str(path), "--classifier", str(tmp_path / "never.pt")])


@pytest.mark.parametrize("case", ["labels (N, 1)", "float labels", "a bare .npy", "8-pixel images", "one image",
                                  "non-square images", "labels out of range", "no such file", "--n 1"])
def test_cli_refuses_a_sample_file_it_cannot_score(tmp_path, case):
    """A sample file whose labels are not integers (N,) or not built-in class ids, that is not an
    .npz or not there, or whose images are too small or too few to score, and --n below 2 (a
    covariance needs two images) are refused with a ValueError or FileNotFoundError (one 'error:'
    line), before any work."""
    images, labels = make_builtin_dataset(4, seed=9)
    path = tmp_path / "samples.npz"
    extra = []
    if case == "labels (N, 1)":
        np.savez(path, arr_0=images, labels=labels[:, None])
    elif case == "float labels":
        np.savez(path, arr_0=images, labels=labels.astype(np.float32))
    elif case == "a bare .npy":
        np.save(path.with_suffix(".npy"), images)
        path = path.with_suffix(".npy")
    elif case == "8-pixel images":
        np.savez(path, arr_0=images[:, :8, :8], labels=labels)
    elif case == "non-square images":                                    # the real sets are square
        np.savez(path, arr_0=images[:, :, :48], labels=labels)
    elif case == "labels out of range":                                  # ids past the built-in 0..9
        np.savez(path, arr_0=images, labels=labels + 10)
    elif case == "no such file":
        path = tmp_path / "missing.npz"
    elif case == "--n 1":
        np.savez(path, arr_0=images, labels=labels)
        extra = ["--n", "1"]
    else:
        np.savez(path, arr_0=images[:1], labels=labels[:1])
    message = {"a bare .npy": "is not an .npz archive",
               "labels out of range": "labels must be built-in class ids 0..9; this evaluation only applies",
               "no such file": f"sample file not found: {path}",
               "--n 1": "--n must be at least 2 (a covariance needs two images), got 1"}.get(
                   case, "expected arr_0 uint8 (N, H, H, 3), N >= 2")
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        evaluate.main(["--npz", str(path), "--classifier", str(tmp_path / "never.pt"), *extra])
    assert not (tmp_path / "never.pt").exists(), "a classifier was trained for a file that cannot be scored"
