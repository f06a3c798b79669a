"""
Benchmark ARPG token generation and training, following the paper's speed protocol.

Paper protocol (Table 1 / SPEC 9): one GPU, batch 64 images (128 rows with guidance), bf16,
token generation only (no VQ decoding), random weights are fine since speed does not depend on
them. We time, on whatever device this runs on, with warm-up and several repeats:
  - the readable `generate`, the fast path (`generate(fast=True)`, compiled on GPU), and the
    ONNX Runtime sampler (onnx_sampler.py, on graphs written by export.py) at 16 / 32 / 64 steps;
  - one token per step in raster order (L steps), the classic autoregressive baseline;
  - training throughput (images/s of forward + backward + optimizer step, with train.py's
    optimizers: AdamW, plus Muon for the tiny recipe).
It prints a markdown table and writes it to --out.

    python bench.py                               # tiny on this machine (CPU here: ~2 minutes)
    python bench.py --size L --batch 64           # the paper's setting, on a GPU (bf16)
    python bench.py --profile                     # where one decoding call spends its time (and, on a CPU, its memory)
"""

import argparse
import functools
import itertools
import math
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace

import torch

from arpg import ARPG, ARPG_PRESETS, check_device
from data import atomic_output, check_output_path, run_script
from train import (RECIPES, default_precision, make_optimizers, optimizer_step, parse_args as parse_train_args,
                   wait_for_device)

# -----------------------------------------------------------------------------
# Arguments


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=list(ARPG_PRESETS), help="model preset (random weights)")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="images per batch (default: 64 on GPU as in the paper, 16 and 64 on CPU)")
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64], help="parallel decoding step counts")
    parser.add_argument("--tokens", type=int, default=None,
                        help="image tokens per sample (a square number, at least 16; default: the preset's, 64 "
                             "for tiny, 256 for L)")
    parser.add_argument("--cfg", type=float, default=4.0,
                        help="guidance scale (default 4: rows doubled as in the paper's protocol; 1: no guidance, "
                             "half the rows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (after one warm-up call)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime sampler")
    parser.add_argument("--no-train", action="store_true", help="skip the training-throughput row")
    parser.add_argument("--no-compile", action="store_true",
                        help="run the fast path eagerly on a GPU too (compiling its two step functions for ARPG-L "
                             "takes minutes the first time)")
    parser.add_argument("--profile", action="store_true",
                        help="only print a profile of one fast decoding call (eager, at the first --steps and "
                             "--batch), and on a CPU its peak memory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--out", default="out/bench.md", help="where to write the markdown table")
    args = parser.parse_args()
    # Bad input: a ValueError, which run_script turns into one "error:" line and exit code 2.
    if args.tokens is None:
        args.tokens = ARPG_PRESETS[args.size].block_size
    if args.tokens < 16 or math.isqrt(args.tokens) ** 2 != args.tokens:
        raise ValueError(f"--tokens must be a square number of at least 16 (the tokens of an n x n grid; the ONNX "
                         f"export's parity check decodes 12 of them, and 16 is the first square above), got "
                         f"{args.tokens}")
    if not all(1 <= steps <= args.tokens for steps in args.steps):
        raise ValueError(f"--steps must be between 1 and the {args.tokens} tokens of an image, got {args.steps}")
    if not math.isfinite(args.cfg):
        raise ValueError(f"--cfg must be a finite number, got {args.cfg}")
    if min(args.batch or [1]) < 1 or args.repeats < 1:
        raise ValueError(f"--batch and --repeats must be at least 1, got {args.batch} and {args.repeats}")
    check_device(args.device)
    check_output_path(args.out)
    return args


# -----------------------------------------------------------------------------
# Timing

def memory(peak):
    """A peak from `timed` as text: "1.23 GB", or "n/a" on a CPU (torch tracks GPU memory only)."""
    return "n/a" if peak is None else f"{peak:.2f} GB"


def timed(fns, repeats, device):
    """{name: (median seconds per call, peak GPU memory in GB or None on a CPU)} of the callables in `fns`.

    One warm-up call each, then `repeats` rounds that call every function once in turn. Taking
    turns matters on shared machines: when the machine slows down for a while (other tenants,
    frequency changes), every function is slowed alike instead of whichever ran at that time.
    """
    on_gpu = device.type == "cuda"
    times = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0.0 if on_gpu else None)
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            wait_for_device(device)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn()
            wait_for_device(device)
            times[name].append(time.perf_counter() - start)
            if on_gpu:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 1e9)
    return {name: (statistics.median(t), peaks[name]) for name, t in times.items()}


def peak_cpu_bytes(profile):
    """The most bytes of CPU tensors held at once during a torch.profiler profile made with
    profile_memory=True, from its allocation events (+size, or -size for a free) in time order.
    The operations' own memory columns are net per operation, and would miss the scratch tensors
    an operation frees before it returns (torch.multinomial's is as large as its probabilities):
    hence the raw events, read through an interface torch still calls experimental. Tensors made
    before the profile (the weights) do not count."""
    allocations, nodes = [], list(profile.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == torch._C._profiler._EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations, key=lambda allocation: allocation[0]):
        live += size
        peak = max(peak, live)
    return peak


def print_profile(model, labels, args, device):
    """Profile mode: where does one fast decoding call spend its time, and on a CPU, how much
    memory does it hold at most (torch counts GPU memory itself: the table's rows)?"""
    model.generate(labels, steps=args.steps[0], cfg_scale=args.cfg, fast=True)    # warm-up
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities, profile_memory=not on_gpu) as profile:
        model.generate(labels, steps=args.steps[0], cfg_scale=args.cfg, fast=True)
        wait_for_device(device)
    sort_key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(profile.key_averages().table(sort_by=sort_key, row_limit=15))
    if not on_gpu:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        call = peak_cpu_bytes(profile)
        print(f"peak memory of the call: {(weights + call) / 1e6:.1f} MB (weights {weights / 1e6:.1f} MB, the "
              f"call's own tensors {call / 1e6:.1f} MB at most, as torch.profiler tracks them)")


# -----------------------------------------------------------------------------
# The table, rewritten as each group of rows is measured: a run cut short (a time limit, Ctrl-C)
# keeps what it measured

def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_setting(args, device, with_onnx):
    """The table's first line: the device, the versions, and what was timed (with_onnx: the table
    has ONNX Runtime rows)."""
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    on_gpu = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if on_gpu else \
        f"{cpu_name()} (CPU, {torch.get_num_threads()} threads)"
    return (f"Device: {device_name}; torch {torch.__version__}; onnxruntime {ort_version}; ARPG-{args.size} "
            f"with {args.tokens} tokens per image (random weights), "
            f"{'bf16' if on_gpu else 'fp32'}{' (ONNX Runtime: fp16 graphs)' if on_gpu and with_onnx else ''}, "
            f"guidance {args.cfg}"
            f"{' (rows doubled)' if args.cfg != 1 else ''}, token generation only"
            f"{'; the fast path eager' if on_gpu and args.no_compile else ''}.")


def write_table(path, setting, rows, training=None):
    """Write the markdown table of `rows` [(sampler, batch, steps, img/s, peak GB)] and the training
    row (batch, img/s, peak GB, what it ran), if any, to `path` under the `setting` line; returns it."""
    lines = [setting, "", "| sampler | batch | steps | img/s | peak GPU memory |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {batch} | {steps} | {ips:.1f} | {memory(peak)} |"
              for name, batch, steps, ips, peak in rows]
    if training:
        batch, ips, peak, how = training
        lines += ["", f"Training ({how}): batch {batch}, {ips:.1f} img/s"
                      + ("" if peak is None else f", peak {memory(peak)}") + "."]
    table = "\n".join(lines)
    with atomic_output(path, ".md") as tmp, open(tmp, "w") as f:
        f.write(table + "\n")
    return table


# -----------------------------------------------------------------------------
# What is measured

def sampling_rows(model, onnx_sampler, batch, args, device, record):
    """Token generation at one batch size: the samplers take turns at each step count (`timed`),
    then in raster order. Each group's rows go to record(rows) as soon as they are measured."""
    L = args.tokens
    labels = torch.arange(batch, device=device) % model.config.num_classes
    compile_fast = device.type == "cuda" and not args.no_compile
    samplers = {
        "readable": lambda steps, order=None: model.generate(labels, steps=steps, cfg_scale=args.cfg, order=order),
        "fast": lambda steps, order=None: model.generate(labels, steps=steps, cfg_scale=args.cfg, order=order,
                                                         fast=True, compile=compile_fast),
    }
    if onnx_sampler is not None:
        samplers["onnx runtime"] = lambda steps, order=None: onnx_sampler.generate(
            labels.cpu().numpy(), steps=steps, cfg_scale=args.cfg, order=None if order is None else order.cpu().numpy())
    raster = torch.arange(L, device=device)   # one token per step, left to right, top to bottom
    groups = [{(name, steps): functools.partial(sample, steps) for name, sample in samplers.items()}
              for steps in args.steps]
    groups.append({(f"{name}, raster", L): functools.partial(sample, L, raster) for name, sample in samplers.items()})
    for runs in groups:
        rows = []
        for (name, steps), (seconds, peak) in timed(runs, args.repeats, device).items():
            if name.startswith("onnx runtime"):
                peak = None      # torch's counter does not see ONNX Runtime's own GPU memory
            rows.append((name, batch, steps, batch / seconds, peak))
            print(f"{name:>20}  batch {batch:3d}  {steps:3d} steps  {batch / seconds:8.1f} img/s  peak {memory(peak)}")
        record(rows)


def training_row(config, batch, args, device):
    """Training throughput at `batch`: train.py's optimizer step (forward, backward, gradient
    clipping, optimizers), eager, with the optimizers and dropout of train.py's recipe for this size.
    Returns (batch, img/s, peak GB, how)."""
    precision = default_precision(str(device))  # train.py's: bf16 on CUDA and on CPUs with bf16 instructions
    recipe = RECIPES["tiny" if args.size == "tiny" else "paper"]
    dropout = dict.fromkeys(("token_dropout_p", "resid_dropout_p", "ffn_dropout_p"), recipe["dropout"])  # train.py's
    train_model = ARPG(replace(config, **dropout)).to(device).train()
    optimizers = make_optimizers(train_model, 1e-4, 0.05, device, recipe["muon_lr"], precision)
    tokens = torch.randint(0, config.vocab_size, (batch, args.tokens), device=device)
    labels = torch.arange(batch, device=device) % config.num_classes
    batches = itertools.repeat((tokens, labels))                         # the same batch every step
    step_args = SimpleNamespace(precision=precision, grad_accum=1,
                                grad_clip=parse_train_args([]).grad_clip)  # train.py's default

    def train_step():
        optimizer_step(train_model, train_model, optimizers, batches, step_args, device)

    seconds, peak = timed({"train": train_step}, args.repeats, device)["train"]
    optimized = "AdamW and Muon" if recipe["muon_lr"] > 0 else "AdamW"
    how = f"eager, {'bf16 autocast' if precision == 'bf16' else 'fp32'}, {optimized}"
    print(f"training  batch {batch}  {batch / seconds:.1f} img/s  peak {memory(peak)}")
    return batch, batch / seconds, peak, how


def main():
    args = parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        device = torch.device("cuda", device.index or 0)  # set_device refuses a bare "cuda" (as train.py does)
        torch.cuda.set_device(device)   # so that the memory counters watch this GPU
    dtype = torch.bfloat16 if on_gpu else torch.float32   # the paper's bf16 on GPU; fp32 on CPU
    batches = args.batch or ([64] if on_gpu else [16, 64])
    torch.manual_seed(0)
    config = replace(ARPG_PRESETS[args.size], block_size=args.tokens)
    model = ARPG(config).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)   # a zero head: uniform logits, and the export's parity
                                                         # check of its logits would compare zeros with zeros
    if args.profile:
        labels = torch.arange(batches[0], device=device) % config.num_classes
        print_profile(model.to(device, dtype), labels, args, device)
        return 0

    onnx_sampler = None
    if not args.no_onnx:
        try:
            from export import export_onnx               # only when asked: exporting needs onnx
            from onnx_sampler import OnnxSampler
        except ImportError as error:
            raise ValueError(f"the ONNX Runtime rows need {error.name} (pip install -r requirements.txt), or "
                             f"pass --no-onnx") from None
        # The sessions hold the graphs once made, so the export folder is removed right after.
        with tempfile.TemporaryDirectory(prefix="arpg-bench-onnx-") as onnx_dir:
            export_onnx(model, None, onnx_dir, fp16=on_gpu)  # from the fp32 weights, as a deployer would
            try:
                onnx_sampler = OnnxSampler(onnx_dir, device=str(device))  # cpu, or torch's GPU: cuda:N
            except ValueError as error:                  # no working CUDA provider: the other rows still run
                print(f"ONNX Runtime rows skipped: {error}")
    model = model.to(device, dtype)

    setting = describe_setting(args, device, onnx_sampler is not None)
    rows = []   # (sampler, batch, steps, img/s, peak GB)

    def record(new_rows):
        rows.extend(new_rows)
        write_table(args.out, setting, rows)

    for batch in batches:
        sampling_rows(model, onnx_sampler, batch, args, device, record)
    training = None
    if not args.no_train:
        del model, onnx_sampler                          # the sampling copies must not count in training's peak
        if on_gpu:
            torch.cuda.empty_cache()
        training = training_row(config, batches[0], args, device)
    print("\n" + write_table(args.out, setting, rows, training))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    run_script(main)
