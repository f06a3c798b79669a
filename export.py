"""
Export ARPG to ONNX: Pass 1, Pass 2 and the tokenizer's decoder as three graphs for ONNX Runtime.

ARPG's two passes (paper Sec. 3.1, Fig. 3; SPEC 3 and 6) make a natural cut. Each decoding
step is Pass 1 on the tokens revealed last step (which grows the KV caches), then Pass 2 on
[MASK] queries at the next target positions (which reads the shared K/V). So one graph per
pass serves every step, and a small loop outside the graphs (onnx_sampler.py, numpy only)
does the rest: order, schedule, guidance, sampling.

    context.onnx     ids (B, T) int64, slots (T,) int64,
                     past_kv (layers, 2, B, H, N, D), past_shared_kv (2, B, H, N, D)
                     -> kv (layers, 2, B, H, N+T, D), shared_kv (2, B, H, N+T, D)
    guided.onnx      target_slots (K,) int64, shared_kv (2, B, H, N, D) -> logits (B, K, V) float32
    vq_decoder.onnx  codes (B, h, w) int64 -> images (B, 3, h*f, w*f) float32 in [-1, 1]
    arpg_onnx.json   config, token ids ([MASK], classes, null class), grid, dtype, class names,
                     sample.py's default rows and sampling settings (guidance, its schedule, the decoding
                     schedule, top-p), parity figures, and the export id stamped into every graph

B, T, N, K, h and w are dynamic: the first step (N = 0, an empty cache), any batch, any number
of new tokens or queries. `slots` are rows of ARPG's RoPE table (slot 0 = the class token's slot,
zeros or the identity per `class_rope`; slot p + 1 = grid position p): the table is a constant
inside the graphs, built for the training grid or for --grid (any grid of 12 tokens or more; a
larger one gives larger images, as sample.py --edit expand makes them; the graphs take no known
tokens, so no other edit), and recorded in the JSON.

Each graph passes onnx.checker and is compared with PyTorch on fresh inputs (max |difference|
is printed; fp32 must be <= 1e-4 or nothing is written). Files are written in a temporary
folder and moved into place, the JSON last.

    python export.py                                   # out/arpg.pt + out/tokenizer.pt -> out/onnx/ (seconds)
    python onnx_sampler.py                             # sample with ONNX Runtime -> out/onnx_samples.png
    python export.py --ckpt arpg_300m.pt --vq-ckpt vq_ds16_c2i.pt --out out/onnx_l      # official ARPG-L
    python export.py --ckpt arpg_300m.pt --vq-ckpt vq_ds16_c2i.pt --out out/onnx_l16 --fp16   # for GPUs

From Python (bench.py does this): export_onnx(model, vq_or_None, "out/onnx", fp16=False).
"""

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from arpg import ARPG
from data import default_classes, run_script
from onnx_sampler import EXPORT_ID_KEY, METADATA_FILE, METADATA_FORMAT
from sample import add_checkpoint_arguments, load_models
from schedules import SAMPLING_DEFAULTS
from tokenizer import VQModel

OPSET = 18              # supported by every onnxruntime since 1.14
FP32_TOLERANCE = 1e-4   # max |ONNX - PyTorch| allowed for an fp32 graph


# -----------------------------------------------------------------------------
# The three graphs, as modules that call the model's own methods (nothing re-implemented)

def pack_caches(caches):
    """ARPG.context's list of (k, v) -> the graphs' two cache tensors: (layers, 2, B, H, N, D) for the
    Pass-1 layers and (2, B, H, N, D) for the shared K/V that Pass 2 reads."""
    return torch.stack([torch.stack(layer) for layer in caches[:-1]]), torch.stack(caches[-1])


class ContextGraph(nn.Module):
    """Pass 1 for one decoding step: `ARPG.context` with its caches packed into two tensors."""

    def __init__(self, model: ARPG, rope: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("rope", rope)                                # (1 + rows*cols, D/2, 2), a graph constant

    def forward(self, ids, slots, past_kv, past_shared_kv):
        # ids (B, T); slots (T,); past_kv (layers, 2, B, H, N, D); past_shared_kv (2, B, H, N, D)
        caches = [tuple(layer.unbind(0)) for layer in past_kv.unbind(0)] + [tuple(past_shared_kv.unbind(0))]
        grown = self.model.context(ids, self.rope[slots][None], mask=None, caches=caches)  # rope (1, T, D/2, 2)
        return pack_caches(grown)                                         # N + T positions now


class GuidedGraph(nn.Module):
    """Pass 2: `ARPG.guided`, one [MASK] query per target slot against the shared K/V."""

    def __init__(self, model: ARPG, rope: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("rope", rope)

    def forward(self, target_slots, shared_kv):
        # target_slots (K,); shared_kv (2, B, H, N, D) -> logits (B, K, V), float32 in every dtype
        return self.model.guided(self.rope[target_slots][None], (shared_kv[0], shared_kv[1]))


class VQDecoderGraph(nn.Module):
    """The tokenizer's decoder: `VQModel.decode`, codes (B, h, w) -> images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, vq: VQModel):
        super().__init__()
        self.vq = vq

    def forward(self, codes):
        # VQModel.decode minus its range check on the codes: that check is a Python `if` on tensor
        # values, which no graph can hold (and the runner's codes come from ARPG, always in range).
        return self.vq.decode_latents(self.vq.quantize.lookup(codes)).clamp(-1.0, 1.0)


# -----------------------------------------------------------------------------
# Exporting one graph: trace, stamp the export id, one weights file beside it, check

def export_graph(module, example, input_names, output_names, dynamic_axes, folder, name, export_id, dynamo):
    """Write {folder}/{name}.onnx and {name}.onnx.data; returns the graph's path."""
    raw_folder = os.path.join(folder, f"raw-{name}")                     # whatever the exporter writes
    os.makedirs(raw_folder)
    # Footgun: a new nn.Module starts in training mode, and the exporter puts the module back in
    # the mode it found it in, recursively. Without this, the wrapped model would come back from
    # the export in training mode, with dropout on.
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter (this script's default: about 1 s for the tiny model, against
        # 10-30 s for the torch.export-based one, torch's own default, on these CPUs) is deprecated
        # since PyTorch 2.9 and says so on every call.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*will be removed.*", category=DeprecationWarning)
        # The torch.export-based one (--dynamo) advises dynamic_shapes over dynamic_axes, merges the
        # axis names that always share a size, and trips over a deprecation inside torch: nothing a
        # user can act on, and the parity check below proves the graphs either way.
        warnings.filterwarnings("ignore", message=".*'dynamic_axes' is not recommended when dynamo=True.*")
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        torch.onnx.export(module, example, os.path.join(raw_folder, "graph.onnx"), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=OPSET,
                          dynamo=dynamo, verbose=False)
    graph = onnx.load(os.path.join(raw_folder, "graph.onnx"))           # with its weights, wherever they went
    onnx.helper.set_model_props(graph, {EXPORT_ID_KEY: export_id})
    path = os.path.join(folder, f"{name}.onnx")
    # Weights always go to one file beside the graph: a protobuf cannot exceed 2 GB (ARPG-XXL's
    # Pass 1 in fp32 does), and one layout for every model size is the layout the tests check.
    onnx.save(graph, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{name}.onnx.data")
    os.chmod(f"{path}.data", 0o644)  # onnx writes external weights owner-only; the graph beside them is 0644
    shutil.rmtree(raw_folder)
    onnx.checker.check_model(path, full_check=True)                      # by path: works past 2 GB
    return path


# -----------------------------------------------------------------------------
# Parity: every graph against PyTorch, on inputs the trace never saw

def max_diff(onnx_output, torch_output):
    return float(np.abs(onnx_output.astype(np.float32) - torch_output.float().cpu().numpy()).max())


@torch.no_grad()
def measure_parity(graphs, model, vq, rope, grid, dtype):
    """Max |ONNX Runtime (CPU) - PyTorch fp32| per graph, over a two-step decode and a VQ decode.

    Step 1 starts from empty caches (N = 0) with a class token and 4 tokens, step 2 adds 2
    tokens to those caches, then 6 [MASK] queries read the shared K/V: the shapes the sampler
    uses, none of them the traced ones.
    """
    sessions = {name: ort.InferenceSession(path, providers=["CPUExecutionProvider"]) for name, path in graphs.items()}
    device, config = model.embeddings.weight.device, model.config
    generator = torch.Generator().manual_seed(1234)
    L, B = grid[0] * grid[1], 3
    positions = torch.randperm(L, generator=generator)[:12]
    codes = torch.randint(0, config.vocab_size, (B, 6), generator=generator)
    labels = torch.randint(0, config.num_classes, (B, 1), generator=generator)
    class_slot = torch.zeros(1, dtype=torch.long)                        # RoPE slot 0: the class token
    steps = [(torch.cat([model.class_ids(labels), codes[:, :4]], dim=1), torch.cat([class_slot, positions[:4] + 1])),
             (codes[:, 4:], positions[4:6] + 1)]                          # (ids (B, T), slots (T,)) per step

    diffs = {}
    layers, heads, head_dim = config.context_depth, config.n_head, config.dim // config.n_head
    caches = None
    past_kv = np.zeros((layers, 2, B, heads, 0, head_dim), dtype)        # what the sampler starts from
    past_shared_kv = np.zeros((2, B, heads, 0, head_dim), dtype)
    for ids, slots in steps:
        caches = model.context(ids.to(device), rope[slots.to(device)][None], mask=None, caches=caches)
        kv, shared_kv = sessions["context"].run(None, {"ids": ids.numpy(), "slots": slots.numpy(),
                                                        "past_kv": past_kv, "past_shared_kv": past_shared_kv})
        torch_kv, torch_shared_kv = pack_caches(caches)
        step_diffs = [diffs.get("context", 0.0), max_diff(kv, torch_kv), max_diff(shared_kv, torch_shared_kv)]
        diffs["context"] = float(np.max(step_diffs))                     # NaN, if any, stays NaN (Python's max drops it)
        # The next step starts from PyTorch's caches, so each step is measured on its own.
        past_kv = torch_kv.cpu().numpy().astype(dtype)
        past_shared_kv = torch_shared_kv.cpu().numpy().astype(dtype)

    target_slots = positions[6:] + 1                                      # (K,) = (6,)
    logits = sessions["guided"].run(None, {"target_slots": target_slots.numpy(), "shared_kv": past_shared_kv})[0]
    diffs["guided"] = max_diff(logits, model.guided(rope[target_slots.to(device)][None], caches[-1]))

    if "vq_decoder" in sessions:
        codes = torch.randint(0, config.vocab_size, (B, *grid), generator=generator)  # traced with 2 images
        images = sessions["vq_decoder"].run(None, {"codes": codes.numpy()})[0]
        diffs["vq_decoder"] = max_diff(images, vq.decode(codes.to(vq.device)))
    return diffs


# -----------------------------------------------------------------------------
# The whole export

def first_missing_folder(path):
    """The outermost folder of `path` that does not exist yet (the first one an export makes), or
    None when `path` exists."""
    path, first = os.path.abspath(path), None
    while not os.path.exists(path) and path != os.path.dirname(path):   # (a missing drive is its own parent)
        first, path = path, os.path.dirname(path)
    return first


def remove_made_folders(out_dir, first_made):
    """After a failed export, once its work folder is gone: out_dir, which it made, and then each
    folder above it up to first_made, while they are empty. A folder that holds something else by
    then (another export writing into or beside this one) stays, with what it holds."""
    folder = os.path.abspath(out_dir)
    while True:
        try:
            os.rmdir(folder)                                              # only if empty
        except OSError:
            return
        if folder == first_made:
            return
        folder = os.path.dirname(folder)


def check_export_folder(out_dir):
    """Refuse, in one line, an export folder that cannot be made: an empty name, a file, or a path
    under a file (main checks it before loading the checkpoints, which takes a while for L-XXL)."""
    if not out_dir.strip():
        raise ValueError("--out is empty; give the export a folder name")
    if os.path.isfile(out_dir):
        raise ValueError(f"{out_dir} is a file; the export needs a folder name")
    first = first_missing_folder(out_dir)
    existing = os.path.dirname(first) if first else os.path.abspath(out_dir)  # the nearest part that exists
    if not os.path.isdir(existing):
        raise ValueError(f"cannot export to {out_dir}: {existing} is a file, not a folder")


def check_grid(rows, cols):
    """Refuse a grid the export cannot check (main checks it before loading the checkpoints)."""
    if rows < 1 or cols < 1 or rows * cols < 12:  # the parity check decodes 12 positions
        raise ValueError(f"the grid must have at least one row and one column and 12 tokens in all, got "
                         f"{rows} x {cols}")


def export_onnx(model, vq, out_dir, fp16=False, grid=None, class_names=None, dynamo=False, sampling=SAMPLING_DEFAULTS):
    """Export `model` (and `vq`'s decoder unless None) to out_dir; returns the metadata written.

    fp16: ARPG graphs with fp16 weights and caches (logits stay fp32), for GPUs; the VQ decoder
    stays fp32 (GroupNorm over large activations is fragile in fp16, and it runs once per image).
    grid: (rows, cols) the graphs' RoPE table covers; default the training grid.
    sampling: the guidance, its schedule, the decoding schedule and top-p onnx_sampler.py uses by default
              (sample.py's for the model).
    """
    start = time.perf_counter()
    config = model.config
    rows, cols = grid or (config.grid_size,) * 2
    check_grid(rows, cols)
    check_export_folder(out_dir)                                          # before copying the models
    if vq is not None and vq.config.codebook_size != config.vocab_size:
        raise ValueError(f"the tokenizer has {vq.config.codebook_size} codes but ARPG was trained on "
                         f"{config.vocab_size}; pass the tokenizer ARPG was trained with")
    for what, module in (("ARPG", model), ("tokenizer", vq)):
        if module is None:
            continue
        broken = [name for name, weight in module.state_dict().items()
                  if weight.is_floating_point() and not weight.isfinite().all()]
        if broken:
            raise ValueError(f"the {what} weights hold NaN or inf ({', '.join(broken[:3])}"
                             f"{', ...' if len(broken) > 3 else ''}): export a checkpoint from before the training diverged")
    device = model.embeddings.weight.device
    dtype = torch.float16 if fp16 else torch.float32
    # Export copies in eval mode: tracing must not switch the caller's models to eval or fp16.
    reference = copy.deepcopy(model).eval().float()                       # fp32 PyTorch, for the parity check
    exported = reference if not fp16 else copy.deepcopy(reference).half()
    vq = copy.deepcopy(vq).eval().float() if vq is not None else None    # fp32, whatever the caller's dtype
    rope = reference.rope_table(rows, cols)                               # (1 + rows*cols, D/2, 2); slot 0: class
    export_id = uuid.uuid4().hex
    # Work in a temporary folder inside out_dir (the same file system, even where out_dir is a
    # link or a mount point, so os.replace is atomic): a failed export leaves nothing behind, not
    # even the folders it made on the way to out_dir.
    first_made = first_missing_folder(out_dir)
    work, succeeded = None, False
    try:
        try:
            os.makedirs(out_dir, exist_ok=True)
            work = tempfile.mkdtemp(dir=out_dir, prefix=".onnx-export-")
        except PermissionError:
            raise ValueError(f"cannot export to {out_dir}: it is not writable; choose another path") from None
        # Example inputs for tracing: sizes that differ from each other and from 0 and 1, so no
        # dimension is mistaken for a constant. (The VQ decoder's codes come at the export grid,
        # square by default, so --dynamo may tie its rows to its columns: the sampler decodes
        # nothing but that grid.)
        B, T, N, K = 2, 3, 4, 5
        layers, heads, head_dim = config.context_depth, config.n_head, config.dim // config.n_head
        ids = torch.randint(0, config.vocab_size, (B, T), device=device)
        slots = torch.arange(1, T + 1, device=device)
        past_kv = torch.randn(layers, 2, B, heads, N, head_dim, device=device, dtype=dtype)
        past_shared_kv = torch.randn(2, B, heads, N, head_dim, device=device, dtype=dtype)
        graphs = {
            "context": export_graph(
                ContextGraph(exported, rope), (ids, slots, past_kv, past_shared_kv),
                ["ids", "slots", "past_kv", "past_shared_kv"], ["kv", "shared_kv"],
                {"ids": {0: "batch", 1: "new"}, "slots": {0: "new"}, "past_kv": {2: "batch", 4: "past"},
                 "past_shared_kv": {1: "batch", 3: "past"}, "kv": {2: "batch", 4: "past_plus_new"},
                 "shared_kv": {1: "batch", 3: "past_plus_new"}}, work, "context", export_id, dynamo),
            "guided": export_graph(
                GuidedGraph(exported, rope), (torch.arange(1, K + 1, device=device), past_shared_kv),
                ["target_slots", "shared_kv"], ["logits"],
                {"target_slots": {0: "queries"}, "shared_kv": {1: "batch", 3: "past"},
                 "logits": {0: "batch", 1: "queries"}}, work, "guided", export_id, dynamo),
        }
        if vq is not None:
            codes = torch.randint(0, config.vocab_size, (B, rows, cols), device=vq.device)
            graphs["vq_decoder"] = export_graph(
                VQDecoderGraph(vq), (codes,), ["codes"], ["images"],
                {"codes": {0: "batch", 1: "rows", 2: "cols"}, "images": {0: "batch", 2: "height", 3: "width"}},
                work, "vq_decoder", export_id, dynamo)

        parity = measure_parity(graphs, reference, vq, rope, (rows, cols), np.float16 if fp16 else np.float32)
        held_to_limit = [name for name in parity if not fp16 or name == "vq_decoder"]  # fp16 graphs: reported only
        for name, diff in parity.items():
            print(f"{name + '.onnx':>16}: max |ONNX Runtime - PyTorch fp32| = {diff:.2e}"
                  + (f" (limit {FP32_TOLERANCE:.0e})" if name in held_to_limit else " (fp16 graph)"))
        # `not diff <= limit`, so a NaN fails too; an fp16 graph must at least give finite numbers.
        too_far = {name: diff for name, diff in parity.items()
                   if not (diff <= FP32_TOLERANCE if name in held_to_limit else np.isfinite(diff))}
        if too_far:
            raise ValueError(f"ONNX graphs differ from PyTorch by more than {FP32_TOLERANCE} (fp16 ones: by "
                             f"NaN or inf): {too_far}; nothing was written (please report this with your "
                             "onnxruntime and torch versions)")

        metadata = {
            "format": METADATA_FORMAT,
            "export_id": export_id,
            "arpg_config": asdict(config),
            "vq_config": asdict(vq.config) if vq is not None else None,
            "grid": [rows, cols],
            "mask_id": model.mask_id,
            "first_class_id": config.vocab_size + 1,                       # class c is first_class_id + c
            "null_class_id": model.null_class_id,
            "class_names": list(class_names) if class_names is not None else None,
            # The rows sample.py draws by default, so `python onnx_sampler.py` draws the same ones.
            "default_classes": default_classes(class_names or range(config.num_classes)),
            "sampling": dict(sampling),                                    # and its guidance, schedules and top-p
            "dtype": "float16" if fp16 else "float32",                     # of the caches and the ARPG weights
            "cache": {"pass1_layers": layers, "heads": heads, "head_dim": head_dim},
            "graphs": {name: os.path.basename(path) for name, path in graphs.items()},
            "parity_max_abs_diff": parity,
            "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET,
                              "exporter": "dynamo" if dynamo else "torchscript"},
        }
        with open(os.path.join(work, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=1)
        # Install: each graph before its weights, all of them before the JSON. A reader that
        # opens the folder half-way finds a new graph (whose export id the old JSON does not
        # carry, so it refuses) or an old graph beside its own old weights. (The weights file
        # carries no export id: a reader that had parsed an old graph and opened its weights only
        # after they were replaced would pair the two, as would a hand copy mixing two exports.)
        for name in graphs:
            for suffix in (".onnx", ".onnx.data"):
                os.replace(os.path.join(work, name + suffix), os.path.join(out_dir, name + suffix))
        os.replace(os.path.join(work, METADATA_FILE), os.path.join(out_dir, METADATA_FILE))
        succeeded = True
    finally:
        # A failed export removes what it made: its work folder, and out_dir and the folders above it if it made them.
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if first_made and not succeeded:
            remove_made_folders(out_dir, first_made)

    sizes = {name: sum(os.path.getsize(os.path.join(out_dir, name + s)) for s in (".onnx", ".onnx.data")) / 1e6
             for name in graphs}
    print(f"wrote {out_dir}: " + ", ".join(f"{name}.onnx {mb:.1f} MB" for name, mb in sizes.items())
        + f", {METADATA_FILE} ({metadata['dtype']}, grid {rows}x{cols}) in {time.perf_counter() - start:.1f} s")
    return metadata


# -----------------------------------------------------------------------------
# Command line

def main():
    parser = argparse.ArgumentParser(description="Export ARPG (Pass 1, Pass 2) and the VQ decoder to ONNX.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", default="out/onnx", help="folder for the graphs and arpg_onnx.json")
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 weights and caches (for GPUs; logits stay fp32; their difference from PyTorch is "
                             "reported, not held to the fp32 graphs' 1e-4)")
    parser.add_argument("--grid", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                        help="token grid the graphs cover, 12 tokens or more (default: the training grid; another "
                             "grid gives images of that size, a larger one as sample.py --edit expand does)")
    parser.add_argument("--dynamo", action="store_true",
                        help="use the torch.export-based exporter (slower; the TorchScript one is deprecated)")
    # Models are loaded exactly as sample.py loads them, on the CPU in fp32 (--fp16 converts a copy).
    parser.set_defaults(device="cpu", dtype="float32")
    args = parser.parse_args()
    check_export_folder(args.out)
    if args.grid:
        check_grid(*args.grid)

    model, vq, class_names, description, sampling = load_models(args)
    print(f"exporting {description}")
    export_onnx(model, vq, args.out, fp16=args.fp16, grid=args.grid, class_names=class_names, dynamo=args.dynamo,
                sampling=sampling)


if __name__ == "__main__":
    run_script(main)
