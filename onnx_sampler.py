"""
Sample ARPG images with ONNX Runtime, without PyTorch: numpy, onnxruntime and pillow only.

`export.py` cuts a trained ARPG into two ONNX graphs at the seam of the paper's two passes
(Sec. 3.1, Fig. 3), plus the tokenizer's decoder:

    context.onnx     Pass 1, one decoding step: the tokens revealed last step go in, every
                     Pass-1 layer's self-attention cache and the shared K/V come out, grown
    guided.onnx      Pass 2: [MASK] queries at the target positions read the shared K/V -> logits
    vq_decoder.onnx  codes (B, h, w) -> images (B, 3, H, W) in [-1, 1]
    arpg_onnx.json   what a runner needs: config, token ids, grid, dtype, class names, default rows
                     and sampling settings

This file is the runner: the randomized parallel decoding loop of `ARPG.generate` (Sec. 3.1,
Alg. 1; SPEC 6) rewritten in numpy around those graphs. It imports no torch, so a deployment
needs only this file, schedules.py, data.py (the PNG grid writer) and the export folder:

    pip install numpy onnxruntime pillow           # or onnxruntime-gpu on a CUDA machine
    python onnx_sampler.py                         # out/onnx -> out/onnx_samples.png (CPU: seconds)
    python onnx_sampler.py --classes 0 3 --per-class 8 --steps 64 --cfg 4.5 --seed 1
    python onnx_sampler.py --onnx-dir out/onnx_l16 --device cuda   # CUDA, caches stay on the GPU

From Python (bench.py times exactly this):
    from onnx_sampler import OnnxSampler
    sampler = OnnxSampler("out/onnx")                          # CUDA when it works, else CPU
    tokens = sampler.generate(np.array([0, 1]), steps=32, cfg_scale=4.0, seed=0)  # (2, L) int64
    images = sampler.decode(tokens)                            # uint8 (2, H, W, 3)

With the same order and greedy decoding (top_k=1) it gives exactly the tokens of
`ARPG.generate` in fp32 (tests/test_export.py checks it). Sampled tokens follow the same
distribution but not the same stream of random numbers: numpy's generator is not torch's.
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf,
                                                         NoSuchFile, RuntimeException)

from data import check_classes, check_image_path, run_script, save_image_grid
from schedules import (CFG_SCHEDULES, MASK_SCHEDULES, SAMPLING_DEFAULTS, check_decoding, default_steps, reveal_counts,
                       sampling_settings)

METADATA_FILE = "arpg_onnx.json"
METADATA_FORMAT = "arpg-onnx/1"
EXPORT_ID_KEY = "arpg_export_id"   # stored in every graph's metadata_props and in the JSON
METADATA_KEYS = ("graphs", "arpg_config", "cache", "grid", "dtype", "export_id", "first_class_id", "null_class_id",
                 "class_names", "default_classes")                  # what this file reads from the JSON
NO_DECODER = ("this export has no vq_decoder.onnx (it was made without a tokenizer, as bench.py makes them): "
              "run python export.py with the model's tokenizer (--vq-ckpt) to decode images")


# -----------------------------------------------------------------------------
# Sampling, in numpy (SPEC 6)
#
# The schedules come from schedules.py, as in arpg.py. `sample_tokens` follows arpg.py's step for
# step (temperature, top-k, top-p, then one draw per row), in numpy because arpg.py imports torch;
# tests/test_export.py checks that both give the same sampling distribution.

def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))        # -inf -> probability 0
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sample_tokens(logits, rng, temperature=1.0, top_k=0, top_p=1.0):
    """Draw one token per row of logits (..., V) after temperature, top-k and top-p filtering."""
    logits = logits.astype(np.float32) / max(temperature, 1e-5)
    if top_k > 0:  # keep the k most likely
        rank = logits.shape[-1] - min(top_k, logits.shape[-1])           # where the k-th largest sits when sorted
        kth = np.partition(logits, rank, axis=-1)[..., rank, None]       # (..., 1)
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:  # keep the smallest set whose probability reaches top_p (always the top token)
        by_rank = np.argsort(-logits, axis=-1, kind="stable")            # (..., V) token ids, most likely first
        sorted_probs = softmax(np.take_along_axis(logits, by_rank, axis=-1))
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        drop = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(drop, by_rank, mass_before >= top_p, axis=-1)  # back to vocab order
        logits = np.where(drop, -np.inf, logits)
    # Inverse-CDF sampling: the first token whose cumulative probability reaches u, u in (0, 1].
    # u in (0, 1] (not [0, 1)) so a zero-probability first token can never be drawn. The running
    # sum in float64: in float32, over V = 16384 codes, it drifts by ~1e-3 and steps over tokens
    # rarer than half a float32 step near 1.
    cdf = np.cumsum(softmax(logits), axis=-1, dtype=np.float64)          # (..., V)
    if not np.isfinite(cdf[..., -1]).all():  # NaN would fall through the search below as token 0
        raise ValueError("the logits hold NaN or inf (damaged weights, or an fp16 export that overflows): "
                         "re-export the folder, in fp32 if it was fp16")
    u = (1.0 - rng.random(cdf.shape[:-1] + (1,))) * cdf[..., -1:]
    return np.minimum((cdf < u).sum(axis=-1), cdf.shape[-1] - 1)          # (...,) int64


# -----------------------------------------------------------------------------
# Loading an export folder: metadata, graphs, execution provider; running a graph

def read_metadata(folder):
    """The export's arpg_onnx.json, after checking the folder holds a complete export."""
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METADATA_FILE} in {folder}: export the model first with python export.py")
    try:
        with open(path) as f:
            metadata = json.load(f)
    except ValueError as error:                                          # truncated or not JSON at all
        raise ValueError(f"cannot read {path}, damaged: re-export the folder with python export.py ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
        raise ValueError(f"{path} is not an ARPG ONNX export ({METADATA_FORMAT}); re-export with python export.py")
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:                                                          # an older export, or an edited file
        raise ValueError(f"{path} lacks {', '.join(missing)}: re-export the folder with python export.py")
    for graph_file in metadata["graphs"].values():
        if not os.path.isfile(os.path.join(folder, graph_file)):
            raise FileNotFoundError(f"{graph_file} is missing from {folder}; "
                                    "re-export the folder with python export.py")
    return metadata


OUT_OF_MEMORY = re.compile("allocat|out of memory", re.IGNORECASE)  # "Failed to allocate", "bad allocation"


@contextlib.contextmanager
def memory_error_when_full():
    """ONNX Runtime reports a failed allocation as a RuntimeException or a Fail ("Failed to
    allocate memory for requested buffer", "bad allocation", CUDA's "out of memory"): re-raised as
    MemoryError, it becomes run_script's one-line out-of-memory message."""
    try:
        yield
    except (RuntimeException, Fail) as error:
        if not OUT_OF_MEMORY.search(str(error)):
            raise
        raise MemoryError(" ".join(str(error).split())) from None


def load_graph(path, options, providers):
    """An InferenceSession for one graph file. A damaged export (a truncated .onnx, a missing or
    truncated .onnx.data beside it) is one clear ValueError instead of ONNX Runtime's traceback."""
    try:
        with memory_error_when_full():                                    # too large to load is not damaged
            return ort.InferenceSession(path, options, providers=providers)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as error:
        detail = " ".join(str(error).split())                            # ONNX Runtime's message, on one line
        raise ValueError(f"cannot load {path}, damaged or incomplete: re-export the folder with python export.py "
                         f"(ONNX Runtime: {detail})") from None


def check_device_name(device):
    """Refuse, in one line, a --device that is not auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (GPU N), got {device!r}")


def start_sessions(folder, graphs, device, single_threaded=()):
    """An InferenceSession per graph, on CUDA when asked for and really available (device "cuda:N":
    GPU N, "cuda": the first); and the device used, as ("cuda", N) or ("cpu", 0). The graphs named
    in `single_threaded` run their CPU work on one thread (see OnnxSampler).

    onnxruntime-gpu lists CUDAExecutionProvider even where CUDA or cuDNN is missing; a session
    then falls back to the CPU after printing a long complaint. So we ask for CUDA with ORT's
    logging silenced, look at the providers the sessions actually got, and say it in one line.
    """
    check_device_name(device)
    wants_cuda = device != "cpu"
    gpu = int(device.partition(":")[2] or 0)
    # The CPU-only onnxruntime package does not list CUDA at all: asked anyway, it warns in two lines.
    cuda_listed = "CUDAExecutionProvider" in ort.get_available_providers()
    # TF32 off: ORT's CUDA provider turns it on by default, which rounds every fp32 matrix multiply's
    # inputs to 10 mantissa bits on Ampere and newer GPUs. PyTorch leaves it off for matrix
    # multiplies, and an fp32 export must give ARPG.generate's tokens; fp16 graphs do not use it.
    cuda_options = {"device_id": gpu, "use_tf32": 0}
    providers = ([("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"] if wants_cuda and cuda_listed
                 else ["CPUExecutionProvider"])

    def session_options(name):
        options = ort.SessionOptions()
        # ORT's CPU threads spin-wait after each run by default, for the next one. Here the next run
        # waits for numpy's sampling, which the spinning threads slow down: off, the loop ran 2.7x
        # faster on 2 cores busy with other work (tiny model, batch 16, 32 steps; EXPERIMENTS.md's
        # session 4). On quiet cores it makes no difference (its session 13, AVX2 EPYC: 250.3 against
        # 246.7 ms a call).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if name in single_threaded:
            options.intra_op_num_threads = 1
        return options

    def load_all(providers):
        return {name: load_graph(os.path.join(folder, graph_file), session_options(name), providers)
                for name, graph_file in graphs.items()}

    if wants_cuda:
        ort.set_default_logger_severity(4)                               # fatal only, while CUDA is tried
        if cuda_listed and hasattr(ort, "preload_dlls"):                 # onnxruntime-gpu 1.21 on
            # CUDA and cuDNN from PyTorch's or the nvidia-* pip packages, on a machine without a
            # system CUDA: without it the provider finds no libraries and the session falls back.
            # It prints a line for each library it cannot find; the outcome is said below, once.
            with contextlib.redirect_stdout(io.StringIO()):
                ort.preload_dlls()
    try:
        sessions = load_all(providers)
    except ValueError:
        # A CUDA provider that cannot start (on a GPU that is not there, say) may raise rather
        # than fall back, and load_graph then blames the file. Loaded on the CPU alone, a
        # damaged export still fails with its own message, and a sound one runs there.
        if not wants_cuda:
            raise
        sessions = load_all(["CPUExecutionProvider"])
    finally:
        ort.set_default_logger_severity(2)                               # back to ORT's default (warnings)
    on_cuda = all(s.get_providers()[0] == "CUDAExecutionProvider" for s in sessions.values())
    if wants_cuda and not on_cuda:
        if device != "auto":
            raise ValueError(f"the CUDA execution provider is not available here for {device} (it needs "
                             f"onnxruntime-gpu, that NVIDIA GPU, CUDA and cuDNN); use --device cpu or --device auto")
        print("onnx_sampler: CUDA execution provider not available, running ONNX Runtime on the CPU", file=sys.stderr)
    return sessions, ("cuda", gpu) if on_cuda else ("cpu", 0)


class OnnxSampler:
    """Randomized parallel decoding with ONNX Runtime: the loop of `ARPG.generate`, in numpy.

    device: 'auto' (the first GPU if CUDA's provider really works, else CPU, said in one
    line), 'cuda' or 'cuda:N' (the first GPU or GPU N; an error if unavailable) or 'cpu'.
    Every step runs through IO binding: the caches a step returns stay where ONNX Runtime put
    them (GPU memory under CUDA) and are bound as the next step's input, so they never cross to
    the host; only token ids go in and logits come out.

    Footgun (GPU, untested here): the logits (2B, K, V) still come to the host every step and
    guidance and sampling run in numpy. For ARPG-L (V = 16384, 128 rows) that host work, not
    the graphs, will likely bound img/s; moving guidance and sampling into a graph is the fix.
    """

    def __init__(self, folder="out/onnx", device="auto"):
        self.metadata = read_metadata(folder)
        # A narrow model's steps are too small to share between CPU threads: handing work to ORT's
        # thread pool costs more than it saves. At width 128 (tiny) on 2 cores, one thread per ARPG
        # graph took a 16-image 32-step call from 61.1 to 48.8 ms, and 64 images at 64 steps from
        # 376 to 354 ms (64 images at 32 steps: 190 and 193; EXPERIMENTS.md's session 8, a 6-block
        # tiny, AVX-512 EPYC); its session 13's 7-block tiny on an AVX2 EPYC: 259.0 -> 236.6 and
        # 269.1 -> 250.3 ms (16 images, 32 steps, guidance 4). Wider models keep ORT's default; the
        # VQ decoder's convolutions always do.
        narrow = self.metadata["arpg_config"]["dim"] <= 256
        self.sessions, (self.device, self.device_id) = start_sessions(
            folder, self.metadata["graphs"], device, single_threaded=("context", "guided") if narrow else ())
        # Every graph carries the id of the export that wrote it: files of two exports (another
        # model, another config, another dtype) must never be run together.
        for name, session in self.sessions.items():
            found = session.get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY)
            if found != self.metadata["export_id"]:
                raise ValueError(f"{self.metadata['graphs'][name]} comes from another export than {METADATA_FILE} "
                                 f"in {folder} (export id {found} vs {self.metadata['export_id']}); re-export the "
                                 "whole folder with python export.py")
        config, cache = self.metadata["arpg_config"], self.metadata["cache"]
        self.rows, self.cols = self.metadata["grid"]
        self.num_classes = config["num_classes"]
        self.cache_dtype = np.dtype(self.metadata["dtype"])
        self.cache_layout = (cache["pass1_layers"], cache["heads"], cache["head_dim"])

    # --- one step of each pass, through IO binding ---

    def _context(self, ids, slots, kv, shared_kv):
        """Pass 1 on the new tokens ids (B, T) at RoPE slots (T,); returns the grown caches (on the device)."""
        binding = self.sessions["context"].io_binding()
        binding.bind_cpu_input("ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("slots", np.ascontiguousarray(slots, dtype=np.int64))
        binding.bind_ortvalue_input("past_kv", kv)
        binding.bind_ortvalue_input("past_shared_kv", shared_kv)
        binding.bind_output("kv", self.device, self.device_id)          # stays on the device for the next step
        binding.bind_output("shared_kv", self.device, self.device_id)
        with memory_error_when_full():
            self.sessions["context"].run_with_iobinding(binding)
        kv, shared_kv = binding.get_outputs()
        return kv, shared_kv

    def _guided(self, target_slots, shared_kv):
        """Pass 2: logits (B, K, V) on the host for the [MASK] queries at target_slots (K,)."""
        binding = self.sessions["guided"].io_binding()
        binding.bind_cpu_input("target_slots", np.ascontiguousarray(target_slots, dtype=np.int64))
        binding.bind_ortvalue_input("shared_kv", shared_kv)
        binding.bind_output("logits", "cpu")                             # sampling happens in numpy
        with memory_error_when_full():
            self.sessions["guided"].run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _empty_caches(self, batch):
        """The first step's caches: zero keys long (N = 0), in the export's dtype, on the device."""
        layers, heads, head_dim = self.cache_layout
        kv = np.zeros((layers, 2, batch, heads, 0, head_dim), self.cache_dtype)   # (layers, k|v, B, H, N=0, D)
        shared_kv = np.zeros((2, batch, heads, 0, head_dim), self.cache_dtype)    # (k|v, B, H, N=0, D)
        return (ort.OrtValue.ortvalue_from_numpy(kv, self.device, self.device_id),
                ort.OrtValue.ortvalue_from_numpy(shared_kv, self.device, self.device_id))

    # --- the decoding loop: ARPG.generate, step for step ---

    def generate(self, labels, steps=None, cfg_scale=SAMPLING_DEFAULTS["cfg_scale"],
                 cfg_schedule=SAMPLING_DEFAULTS["cfg_schedule"], schedule=SAMPLING_DEFAULTS["schedule"],
                 temperature=1.0, top_k=0, top_p=SAMPLING_DEFAULTS["top_p"], order=None, seed=None):
        """Sample image tokens (B, rows*cols) int64 in raster order for class labels (B,).

        Arguments as `ARPG.generate` (steps: 32, or one per token on a grid of fewer), less known
        tokens, grid and fast: the grid is the export's; order: a permutation of the grid positions
        (random when None); seed: numpy's random generator (order and samples), or an int to start one.
        """
        labels = np.asarray(labels)
        L = self.rows * self.cols
        if (labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer)
                or labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be a non-empty 1-D array of integer class ids in [0, {self.num_classes}), "
                             f"got {labels.tolist()}")
        check_decoding(schedule, cfg_schedule, temperature, top_k, top_p, cfg_scale)
        steps = default_steps(L) if steps is None else steps
        if not 1 <= steps <= L:
            raise ValueError(f"steps must be between 1 and the {L} tokens to decode, got {steps}")
        rng = np.random.default_rng(seed)
        # 1. The generation order: one random permutation for the whole batch.
        order = rng.permutation(L) if order is None else np.asarray(order)
        if (order.shape != (L,) or not np.issubdtype(order.dtype, np.integer)
                or not np.array_equal(np.sort(order), np.arange(L))):
            raise ValueError(f"order must be a permutation of the {L} grid positions (integers)")
        order = order.astype(np.int64)                                    # the graphs' slot inputs are int64

        # 2. The first Pass-1 input: the class token at RoPE slot 0 (zeros or the identity, per
        #    class_rope). With guidance the batch is doubled: conditional rows, then the same rows
        #    with the null class.
        B = labels.shape[0]
        use_cfg = cfg_scale != 1.0
        feed_ids = (labels.astype(np.int64) + self.metadata["first_class_id"])[:, None]  # (B, 1)
        if use_cfg:
            feed_ids = np.concatenate([feed_ids, np.full_like(feed_ids, self.metadata["null_class_id"])])  # (2B, 1)
        feed_slots = np.zeros(1, dtype=np.int64)
        tokens = np.zeros((B, L), dtype=np.int64)
        kv, shared_kv = self._empty_caches(len(feed_ids))
        decoded = 0
        for n_reveal in reveal_counts(L, steps, schedule):
            # 3. Pass 1 reads only what is new; the graph appends it to every cache.
            kv, shared_kv = self._context(feed_ids, feed_slots, kv, shared_kv)
            # 4. Pass 2: one [MASK] query per target, at the target's RoPE slot (position + 1).
            target_pos = order[decoded:decoded + n_reveal]                # (K,)
            logits = self._guided(target_pos + 1, shared_kv)              # (B or 2B, K, V)
            decoded += n_reveal
            # 5. Classifier-free guidance, scaled by how much of the canvas is known after this step.
            if use_cfg:
                cond, uncond = logits[:B], logits[B:]
                logits = uncond + (cond - uncond) * np.float32(CFG_SCHEDULES[cfg_schedule](cfg_scale, decoded / L))
            # 6. Sample, and write the new tokens to their grid positions.
            new_tokens = sample_tokens(logits, rng, temperature, top_k, top_p)  # (B, K)
            tokens[:, target_pos] = new_tokens
            # 7. They are next step's Pass-1 input (both halves when guided).
            feed_ids = np.concatenate([new_tokens, new_tokens]) if use_cfg else new_tokens
            feed_slots = target_pos + 1
        return tokens

    def decode(self, tokens):
        """Tokens (B, rows*cols) -> uint8 images (B, H, W, 3) through vq_decoder.onnx."""
        if "vq_decoder" not in self.sessions:
            raise ValueError(NO_DECODER)
        tokens, L = np.asarray(tokens), self.rows * self.cols
        if tokens.ndim != 2 or tokens.shape[1] != L or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integer codes of shape (B, {L}), the {self.rows}x{self.cols} grid in "
                             f"raster order, got {tokens.dtype} {tokens.shape}")
        codes = tokens.astype(np.int64).reshape(-1, self.rows, self.cols)  # (B, rows, cols)
        vocab = self.metadata["arpg_config"]["vocab_size"]
        if codes.size and not 0 <= codes.min() <= codes.max() < vocab:  # a GPU gather would not check
            raise ValueError(f"tokens must be codes in [0, {vocab}), got {codes.min()}..{codes.max()}")
        with memory_error_when_full():
            images = self.sessions["vq_decoder"].run(None, {"codes": codes})[0]  # (B, 3, H, W) in [-1, 1]
        # The same mapping as tokenizer.tensor_to_images: +128 then truncation rounds to the nearest level.
        pixels = np.clip(127.5 * images.astype(np.float32) + 128.0, 0, 255).astype(np.uint8)
        return pixels.transpose(0, 2, 3, 1)                              # (B, H, W, 3)


# -----------------------------------------------------------------------------
# Command line: a PNG grid like sample.py's, one row per class

def main():
    parser = argparse.ArgumentParser(description="Sample ARPG images with ONNX Runtime (no PyTorch needed).")
    parser.add_argument("--onnx-dir", default="out/onnx", help="folder written by export.py")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="class ids, one grid row each (default: sample.py's rows, stored by export.py: "
                             "every class of a model with up to 16, else 8)")
    parser.add_argument("--per-class", type=int, default=8, help="images per class (grid columns)")
    parser.add_argument("--steps", type=int, default=None,
                        help="decoding steps (default 32, or one per token on a grid of fewer; the paper uses 32 or 64)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="classifier-free guidance scale (default: sample.py's for this model, stored by "
                             "export.py; 1 = off)")
    parser.add_argument("--cfg-schedule", default=None, choices=list(CFG_SCHEDULES),
                        help="how guidance changes as the canvas fills (default: sample.py's for this model)")
    parser.add_argument("--schedule", default=None, choices=list(MASK_SCHEDULES),
                        help="tokens revealed per step (default: sample.py's for this model)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling mass (default: sample.py's for this model, stored by export.py; "
                             "1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (order and samples)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images decoded at once (their caches and logits must fit in memory)")
    parser.add_argument("--device", default="auto",
                        help="ONNX Runtime execution provider: cpu, cuda (the first GPU), cuda:N (GPU N), or auto = "
                             "the first GPU when CUDA really works, else the CPU")
    parser.add_argument("--out", default="out/onnx_samples.png", help="PNG grid to write")
    args = parser.parse_args()
    for flag, value in (("--per-class", args.per_class), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    check_device_name(args.device)
    check_image_path(args.out)

    sampler = OnnxSampler(args.onnx_dir, args.device)
    if "vq_decoder" not in sampler.sessions:                             # found out now, not after sampling
        raise ValueError(NO_DECODER)
    classes = args.classes or sampler.metadata["default_classes"]
    check_classes(classes, sampler.num_classes)
    labels = np.repeat(np.asarray(classes, dtype=np.int64), args.per_class)   # class-major: row r = classes[r]
    stored = {**SAMPLING_DEFAULTS, **sampler.metadata.get("sampling", {})}  # older exports store fewer
    settings = sampling_settings(args, stored)
    steps = default_steps(sampler.rows * sampler.cols) if args.steps is None else args.steps
    rng = np.random.default_rng(args.seed)                                # one stream through every batch
    batches = []
    for start in range(0, len(labels), args.batch_size):
        tokens = sampler.generate(labels[start:start + args.batch_size], steps=steps, temperature=args.temperature,
                                  top_k=args.top_k, seed=rng, **settings)  # (b, L)
        batches.append(sampler.decode(tokens))                            # (b, H, W, 3)
    images = np.concatenate(batches)                                      # (R*C, H, W, 3)
    names = sampler.metadata["class_names"] or [str(c) for c in range(sampler.num_classes)]
    save_image_grid(images.reshape(len(classes), args.per_class, *images.shape[1:]),  # (R, C, H, W, 3)
                    [names[c] for c in classes], args.out)
    print(f"wrote {args.out}: {len(classes)} classes x {args.per_class} images, {steps} steps, "
          f"cfg {settings['cfg_scale']} ({settings['cfg_schedule']}), {settings['schedule']} schedule, "
          f"top-p {settings['top_p']}, ONNX Runtime on {sampler.device}"
          + (f":{sampler.device_id}" if sampler.device == "cuda" else ""))


if __name__ == "__main__":
    run_script(main)
