"""
How good are the samples? A built-in stand-in for FID, for models trained on the built-in shapes.

The paper scores ImageNet samples with FID (SPEC 6 and 9): the Frechet distance between
Inception-v3 features of 50,000 samples and of the real images. Inception's weights cannot be
downloaded here, and they know nothing about ten classes of flat shapes anyway. So this file
trains a small CNN on real built-in images (data.py; 16 s to under a minute on 2 CPU cores,
then cached in out/classifier.pt) and uses it the way FID uses Inception:

  (a) class accuracy: how often the classifier sees the class a sample was generated for (the
      built-in analogue of the Inception Score's "is it recognisably that class");
  (b) Frechet distance: FID's formula on this classifier's penultimate features instead of
      Inception's. Lower is better; two independent sets of real images of the same size set
      the floor, since the estimate is biased upwards for small sample counts;
  (c) inpainting class-keeping: after the centre of a real image is regenerated under its own
      label (sample.py), how often the classifier still sees the original class.

And one number that needs no CNN: (d) ARPG itself as a classifier of real images
(`likelihood_classification`): does the model know what each class looks like, whatever its
samples show?

sample.py does the generating and calls the functions below; this file alone gives the numbers
for real images (the reference every generated number is compared with) and scores sample files:

    python evaluate.py                                # train or load the classifier, score real images
    python evaluate.py --npz out/fid_1000.npz         # score samples written by `sample.py --fid 1000`
    python sample.py --eval 8 16 32                   # generate at 8, 16, 32 steps and score everything
"""

import argparse
import os
import time
import zipfile
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from arpg import in_eval_mode, load_strict, read_checkpoint, save_atomic, unwrap_state_dict
from data import CLASS_NAMES, check_output_path, make_builtin_dataset, run_script

DEFAULT_CLASSIFIER = "out/classifier.pt"

# Seeds of the real image sets. Training (train.py) draws its images with its --seed (0 by
# default; the runs in README.md used 0-34); every set here has a seed of its own, so the classifier
# is never tested on what it, or ARPG, was trained on (unless a run picks one of these as --seed).
CLASSIFIER_TRAIN_SEED = 1001   # the classifier's training images
HELDOUT_SEED = 1002            # its test images: the accuracy reported for real images
REFERENCE_SEED = 1003          # the real set every Frechet distance is measured against
SECOND_REAL_SEED = 1004        # a second real set: real-vs-real distance, the floor (and sample.py's
                               # reconstructions and ARPG-as-classifier images)
INPAINT_SEED = 1005            # the real images whose centres sample.py regenerates
HELDOUT_IMAGES = 1000          # the classifier's test images (HELDOUT_SEED)


# -----------------------------------------------------------------------------
# The classifier: four conv layers and a linear head, about 100k parameters

class ShapeClassifier(nn.Module):
    """A small CNN for the built-in shapes. features() is the 128-d vector the Frechet distance uses.

    It first averages 2 x 2 pixel blocks (64 x 64 -> 32 x 32): a quarter of the compute, and
    averaging keeps the anti-aliased edges, so the shapes stay apart (99% held-out accuracy).
    BatchNorm lets it train at a high learning rate in a few hundred steps; global average
    pooling at the end makes it accept any image size.
    """

    def __init__(self, n_classes=len(CLASS_NAMES)):
        super().__init__()

        def layer(c_in, c_out, pool):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()] + \
                ([nn.MaxPool2d(2)] if pool else [])

        self.body = nn.Sequential(nn.AvgPool2d(2),                                        # 64 -> 32
                                  *layer(3, 16, True), *layer(16, 32, True),             # -> 16 -> 8
                                  *layer(32, 64, True), *layer(64, 128, False))          # -> 4
        self.head = nn.Linear(128, n_classes)

    def features(self, x):
        """x (B, 3, H, W) in [-1, 1] -> (B, 128) pooled features."""
        return self.body(x).mean(dim=(2, 3))                              # (B, 128, h, w) -> (B, 128)

    def forward(self, x):
        return self.head(self.features(x))                               # (B, n_classes)


def to_input(images):
    """uint8 images (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the classifier's input."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# -----------------------------------------------------------------------------
# Training it once, then loading it from the cache

def train_classifier(images, labels, steps=400, batch_size=64, lr=2e-2, seed=0):
    """Train a ShapeClassifier on uint8 images (N, H, W, 3) and labels (N,): AdamW, one-cycle lr.

    It trains on ONE CPU thread. Its convolutions are too small to gain much from a second one,
    and when other processes share the cores, OpenMP threads that wait for each other made each
    step 5-12x slower on a 2-core machine (0.13 s/step with one thread, 0.7-1.6 s with two).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = ShapeClassifier().train()
        x, y = to_input(images), torch.from_numpy(labels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = torch.randint(len(x), (batch_size,), generator=generator)  # (batch_size,) random images
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def load_classifier(path=DEFAULT_CLASSIFIER, image_size=64, n_train=3000, train_steps=400, log=print):
    """The classifier for `image_size` images: read from `path`, or trained and saved there first.

    Returns (classifier in eval mode, its accuracy on held-out real images).
    """
    if os.path.isfile(path):
        checkpoint = read_checkpoint(path)
        if "heldout_accuracy" not in checkpoint:  # another checkpoint given by mistake: never overwrite it
            raise ValueError(f"{path} is not an evaluation classifier (no held-out accuracy in it); give a new "
                             f"path to train one there, or the default {DEFAULT_CLASSIFIER}")
        if checkpoint.get("image_size") == image_size:
            classifier = ShapeClassifier()
            load_strict(classifier, unwrap_state_dict(checkpoint), f"classifier {path} (delete it to retrain)")
            return classifier.eval(), checkpoint["heldout_accuracy"]
        log(f"{path} was trained on {checkpoint.get('image_size')} px images, not {image_size}: retraining")
    check_output_path(path, "--classifier")                              # before the training, not after it
    log(f"training the evaluation classifier on {n_train} real built-in images (once; cached in {path})")
    start = time.time()
    images, labels = make_builtin_dataset(n_train, seed=CLASSIFIER_TRAIN_SEED, image_size=image_size)
    classifier = train_classifier(images, labels, steps=train_steps)
    test_images, test_labels = make_builtin_dataset(HELDOUT_IMAGES, seed=HELDOUT_SEED, image_size=image_size)
    accuracy = class_accuracy(classify(classifier, test_images)[0], test_labels)
    save_atomic({"model": classifier.state_dict(), "image_size": image_size, "heldout_accuracy": accuracy,
                 "n_train": n_train}, path)
    log(f"trained it in {time.time() - start:.0f} s")                     # its accuracy: the caller's next line
    return classifier, accuracy


# -----------------------------------------------------------------------------
# The metrics

@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """uint8 images (N, H, W, 3) -> (predicted classes (N,) int64, features (N, D) float64), numpy."""
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        batch_features = classifier.features(to_input(images[start:start + batch_size]))  # (b, D)
        predictions.append(classifier.head(batch_features).argmax(dim=1))
        features.append(batch_features.double())
    return torch.cat(predictions).numpy(), torch.cat(features).numpy()


def class_accuracy(predictions, labels):
    """Fraction of predictions equal to the labels."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def symmetric_sqrt(matrix):
    """Square root of a symmetric positive semi-definite matrix, by eigendecomposition.

    A covariance matrix is symmetric, so eigh applies: M = Q diag(e) Q^T, sqrt(M) = Q diag(sqrt e) Q^T.
    Tiny negative eigenvalues from rounding are clipped to 0. (FID code usually calls
    scipy.linalg.sqrtm, which handles any matrix; we need no scipy for the symmetric case.)
    """
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(features_a, features_b):
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D): FID's formula.

        d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

    The usual form writes the last term as Tr((S_a S_b)^1/2); S_a S_b is not symmetric, but it is
    similar to the symmetric S_a^1/2 S_b S_a^1/2, so both have the same eigenvalues and the same
    trace of the square root, and symmetric_sqrt can be used twice.
    """
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)  # (D, D) each
    root_a = symmetric_sqrt(cov_a)
    middle = symmetric_sqrt(root_a @ cov_b @ root_a)
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(middle)
    return max(0.0, float(distance))  # rounding can leave a tiny negative for (nearly) identical sets


def score_images(classifier, images, labels, reference_features):
    """Class accuracy of uint8 images (N, H, W, 3) against labels (N,), and their Frechet distance to
    the reference features: {"n": N, "accuracy": float, "frechet": float}."""
    predictions, features = classify(classifier, images)
    return {"n": len(images), "accuracy": class_accuracy(predictions, labels),
            "frechet": frechet_distance(features, reference_features)}


def real_image_rows(classifier, n, image_size=64):
    """The reference rows of the results table, from real images only.

    Returns (reference features of n real images (n, D), rows): "real images" scores n other real
    images (their class accuracy, and the real-vs-real Frechet distance: the floor for n samples).
    """
    _, reference_features = classify(classifier, make_builtin_dataset(n, seed=REFERENCE_SEED, image_size=image_size)[0])
    images, labels = make_builtin_dataset(n, seed=SECOND_REAL_SEED, image_size=image_size)
    return reference_features, [("real images", score_images(classifier, images, labels, reference_features))]


@torch.no_grad()
@in_eval_mode
def likelihood_classification(model, codes, labels, n_orders=4, seed=0, batch_size=250):
    """(d) The share of real images (their codes (N, L) and labels (N,)) that ARPG assigns to their
    own class: each image's teacher-forced loss (`ARPG.forward`, the training loss, summed over its
    tokens) is computed under every class label, in the same n_orders random orders, and the
    label with the lowest total wins. It is Bayes' rule with equal class priors: argmax p(x | c).

    A model can know the classes this way long before it can draw them: a sample must get every
    token right, while here the true image only has to be likelier under its own label.
    """
    codes = codes.to(model.embeddings.weight.device)
    labels = torch.as_tensor(labels, device=codes.device)
    N, L = codes.shape
    generator = torch.Generator().manual_seed(seed)
    nll = torch.zeros(N, model.config.num_classes, device=codes.device)  # summed over tokens and orders
    for _ in range(n_orders):
        order = torch.rand(N, L, generator=generator).argsort(dim=1).to(codes.device)  # one order per image
        for label in range(model.config.num_classes):
            for start in range(0, N, batch_size):
                rows = slice(start, start + batch_size)
                logits, _ = model(codes[rows], torch.full_like(labels[rows], label), order=order[rows])  # (b, L, V)
                targets = codes[rows].gather(1, order[rows])             # (b, L), in generation order
                nll[rows, label] += F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").sum(1)
    return (nll.argmin(dim=1) == labels).float().mean().item()


def format_table(rows):
    """Rows [(name, score_images' dict, optionally with "inpaint_keeps_class")] -> a markdown table."""
    lines = ["| images | n | class accuracy | Frechet distance to real | inpainting keeps class |",
             "|---|---|---|---|---|"]
    for name, scores in rows:
        keeps = scores.get("inpaint_keeps_class")
        lines.append(f"| {name} | {scores['n']} | {scores['accuracy']:.1%} | {scores['frechet']:.2f} | "
                     f"{'-' if keeps is None else f'{keeps:.1%}'} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Command line: reference numbers, or the score of a sample file

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                        help="cached classifier (trained on real built-in images if missing; retrained in its place "
                             "if it was trained at another image size than the samples')")
    parser.add_argument("--npz", default=None,
                        help="samples to score: a .npz with arr_0 uint8 (N, H, W, 3) and labels (N,), "
                             "as written by `sample.py --fid N`")
    parser.add_argument("--n", type=int, default=None,
                        help="real images per reference set (default: as many as --npz holds, else 1000; a "
                             "Frechet distance depends on the sample count, so compare at one count)")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 2:
        raise ValueError(f"--n must be at least 2 (a covariance needs two images), got {args.n}")

    samples = None
    if args.npz is not None:
        if not os.path.isfile(args.npz):
            raise FileNotFoundError(f"sample file not found: {args.npz}")
        if not zipfile.is_zipfile(args.npz):  # np.load would hand back a bare array (.npy) or fail
            raise ValueError(f"{args.npz} is not an .npz archive: write one with `sample.py --fid N`")
        try:
            with np.load(args.npz) as npz:
                arrays = {name: npz[name] for name in ("arr_0", "labels") if name in npz}
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:       # a bad checksum, a cut-off member
            raise ValueError(f"{args.npz} is damaged ({error}): write it again with `sample.py --fid N`") from None
        except ValueError as error:                                       # object arrays: pickled, never loaded
            raise ValueError(f"{args.npz} cannot be read ({error}): write it again with `sample.py --fid N`") from None
        if len(arrays) < 2:
            raise ValueError(f"{args.npz} needs arr_0 (images) and labels: write it with `sample.py --fid N`")
        samples, labels = arrays["arr_0"], arrays["labels"]
        # The classifier halves an image four times (16 pixels at least), and a covariance needs 2 images.
        # The real sets it is compared with are square.
        if (samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[-1] != 3 or len(samples) < 2
                or samples.shape[1] < 16 or samples.shape[1] != samples.shape[2] or labels.shape != samples.shape[:1]
                or not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"{args.npz}: expected arr_0 uint8 (N, H, H, 3), N >= 2, H >= 16, and integer "
                             f"labels (N,), got {samples.dtype} {samples.shape} and {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"{args.npz}: labels must be built-in class ids 0..{len(CLASS_NAMES) - 1}; "
                             "this evaluation only applies to models trained on the built-in shapes")

    image_size = samples.shape[1] if samples is not None else 64
    classifier, heldout_accuracy = load_classifier(args.classifier, image_size)
    print(f"classifier: {heldout_accuracy:.1%} accuracy on {HELDOUT_IMAGES} held-out real images")
    n = args.n or (len(samples) if samples is not None else 1000)
    reference_features, rows = real_image_rows(classifier, n, image_size)
    if samples is not None:
        rows.append((os.path.basename(args.npz), score_images(classifier, samples, labels, reference_features)))
    print(format_table(rows))


if __name__ == "__main__":
    run_script(main)
