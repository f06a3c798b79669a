"""export.py and onnx_sampler.py: the ONNX graphs equal PyTorch, and the torch-free loop equals ARPG.generate."""

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

import export
import onnx_sampler
from arpg import ARPG, ARPG_PRESETS, ARPGConfig
from data import CLASS_NAMES
from export import export_onnx
from onnx_sampler import OnnxSampler
from test_arpg import SAMPLING_CASES, SAMPLING_LOGITS  # the hand-worked sampling cases
from tokenizer import VQ_PRESETS, VQModel, tensor_to_images

ROOT = Path(__file__).resolve().parent.parent
PASS_LAYERS = ARPG_PRESETS["tiny"].context_depth   # the context graph caches one K/V per Pass-1 block
FIXTURES = Path(__file__).parent / "fixtures"


def run(*args, env=None):
    """Run a command from the repo root; returns (exit code, stdout + stderr)."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    return result.returncode, result.stdout + result.stderr


def caches_as_tensors(caches):
    """ARPG.context's cache list -> the graphs' (layers, 2, B, H, N, D) and (2, B, H, N, D) tensors."""
    return torch.stack([torch.stack(layer) for layer in caches[:-1]]), torch.stack(caches[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ARPG checkpoint (EMA weights differ from the trained ones) and a small tokenizer,
    exported with the command line, which must print no warnings. Returns (folder, the EMA model, the tokenizer)."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    ema = ARPG(ARPG_PRESETS["tiny"]).eval()
    torch.nn.init.normal_(ema.head.weight, std=0.02)   # a zero head makes every logit equal
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in ema.state_dict().items()}
    sampling = {"cfg_scale": 2.5, "cfg_schedule": "constant", "schedule": "cosine", "top_p": 0.8}
    torch.save({"model": trained, "ema": ema.state_dict(), "config": asdict(ema.config), "step": 1,
                "class_names": CLASS_NAMES, "sampling": sampling}, folder / "arpg.pt")
    vq = VQModel(VQ_PRESETS["small"]).eval()
    torch.save({"model": vq.state_dict(), "config": asdict(vq.config)}, folder / "tokenizer.pt")
    code, output = run("export.py", "--ckpt", str(folder / "arpg.pt"), "--vq-ckpt", str(folder / "tokenizer.pt"),
                       "--out", str(folder / "onnx"))
    assert code == 0, output
    assert "Warning" not in output, f"the export printed a warning a user would take for a fault:\n{output}"
    return folder / "onnx", ema, vq


# --- the export itself ---

def test_export_writes_three_checked_graphs_with_dynamic_shapes(exported):
    """The three graphs pass onnx.checker, carry the JSON's export id, have dynamic batch / cache /
    query axes, and the export reports per-graph parity within 1e-4; the JSON has the token ids,
    the checkpoint's class names and sampling defaults; no temporary file is left and every file is mode 0644."""
    folder, _, _ = exported
    metadata = json.loads((folder / "arpg_onnx.json").read_text())
    assert sorted(os.listdir(folder)) == sorted(
        ["arpg_onnx.json"] + [f"{g}.onnx{s}" for g in ("context", "guided", "vq_decoder") for s in ("", ".data")]), \
        f"unexpected files: {os.listdir(folder)}"
    modes = {p: oct(os.stat(folder / p).st_mode & 0o777) for p in os.listdir(folder)}
    assert set(modes.values()) == {"0o644"}, f"every exported file should be readable by all: {modes}"
    for name in ("context", "guided", "vq_decoder"):
        onnx.checker.check_model(str(folder / f"{name}.onnx"))
        graph = onnx.load(str(folder / f"{name}.onnx"), load_external_data=False)
        props = {p.key: p.value for p in graph.metadata_props}
        assert props[onnx_sampler.EXPORT_ID_KEY] == metadata["export_id"], f"{name}.onnx lacks the export id"
        assert metadata["parity_max_abs_diff"][name] <= 1e-4, f"{name}: {metadata['parity_max_abs_diff'][name]}"
    def signature(name):
        session = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        return {i.name: i.shape for i in session.get_inputs() + session.get_outputs()}
    shapes = signature("context")
    assert shapes["past_kv"] == [PASS_LAYERS, 2, "batch", 4, "past", 32], f"context signature {shapes}"
    assert shapes["ids"] == ["batch", "new"] and shapes["slots"] == ["new"], f"context signature {shapes}"
    shapes = signature("guided")
    assert shapes["target_slots"] == ["queries"] and shapes["shared_kv"] == [2, "batch", 4, "past", 32] \
        and shapes["logits"] == ["batch", "queries", 128], f"guided signature {shapes}"
    shapes = signature("vq_decoder")
    assert shapes["codes"] == ["batch", "rows", "cols"] and shapes["images"] == ["batch", 3, "height", "width"], \
        f"vq_decoder signature {shapes}"
    V = ARPG_PRESETS["tiny"].vocab_size
    assert metadata["mask_id"] == V and metadata["null_class_id"] == V + 10 + 1, "token ids in the JSON"
    assert metadata["class_names"] == CLASS_NAMES, f"class names {metadata['class_names']}"
    assert metadata["default_classes"] == list(range(10)), f"default rows {metadata['default_classes']}"
    assert metadata["sampling"] == {"cfg_scale": 2.5, "cfg_schedule": "constant", "schedule": "cosine", "top_p": 0.8}, \
        f"sampling {metadata['sampling']}"


@pytest.mark.parametrize("batch, new, past", [(1, 1, 0), (4, 5, 0), (3, 2, 7), (1, 3, 60)])
def test_context_graph_equals_arpg_context(exported, batch, new, past):
    """context.onnx = ARPG.context (the EMA weights) within 1e-4 for any batch, new-token count and
    cache length, the empty first-step cache (N = 0) included."""
    folder, model, _ = exported
    session = ort.InferenceSession(str(folder / "context.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(batch * 100 + past)
    slots = torch.randperm(65, generator=generator)[:past + new]        # RoPE rows, the class slot 0 allowed
    ids = torch.randint(0, model.config.vocab_size, (batch, past + new), generator=generator)
    with torch.no_grad():
        caches = model.context(ids[:, :past], model.rope[slots[:past]][None]) if past else None
        expected = caches_as_tensors(model.context(ids[:, past:], model.rope[slots[past:]][None], caches=caches))
    past_kv, past_shared_kv = caches_as_tensors(caches) if past else (torch.zeros(PASS_LAYERS, 2, batch, 4, 0, 32),
                                                                      torch.zeros(2, batch, 4, 0, 32))
    outputs = session.run(None, {"ids": ids[:, past:].numpy(), "slots": slots[past:].numpy(),
                                 "past_kv": past_kv.numpy(), "past_shared_kv": past_shared_kv.numpy()})
    for name, got, want in zip(("kv", "shared_kv"), outputs, expected):
        assert got.shape == tuple(want.shape), f"{name} shape {got.shape} vs {tuple(want.shape)}"
        assert np.abs(got - want.numpy()).max() <= 1e-4, f"{name} differs by {np.abs(got - want.numpy()).max():.2e}"


@pytest.mark.parametrize("batch, queries, past", [(1, 1, 1), (6, 9, 33)])
def test_guided_graph_equals_arpg_guided(exported, batch, queries, past):
    """guided.onnx = ARPG.guided within 1e-4 for any batch, query count and cache length."""
    folder, model, _ = exported
    session = ort.InferenceSession(str(folder / "guided.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(queries)
    with torch.no_grad():
        shared_kv = model.context(torch.randint(0, model.config.vocab_size, (batch, past), generator=generator),
                                  model.rope[torch.randperm(65, generator=generator)[:past]][None])[-1]
        target_slots = torch.randperm(64, generator=generator)[:queries] + 1
        expected = model.guided(model.rope[target_slots][None], shared_kv).numpy()
    logits = session.run(None, {"target_slots": target_slots.numpy(), "shared_kv": torch.stack(shared_kv).numpy()})[0]
    assert logits.shape == expected.shape and np.abs(logits - expected).max() <= 1e-4, \
        f"logits differ by {np.abs(logits - expected).max():.2e}"


def test_vq_decoder_graph_equals_vq_decode(exported):
    """vq_decoder.onnx = VQModel.decode within 1e-4, and OnnxSampler.decode gives tensor_to_images' pixels."""
    folder, _, vq = exported
    codes = torch.randint(0, vq.config.codebook_size, (3, 8, 8), generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(folder / "vq_decoder.onnx"), providers=["CPUExecutionProvider"])
    expected = vq.decode(codes)
    images = session.run(None, {"codes": codes.numpy()})[0]
    diff = np.abs(images - expected.numpy()).max()
    assert diff <= 1e-4, f"images differ by {diff:.2e}"
    pixels = OnnxSampler(str(folder), device="cpu").decode(codes.reshape(3, 64).numpy())
    assert np.abs(pixels.astype(int) - tensor_to_images(expected).astype(int)).max() <= 1, "uint8 pixels differ"


@pytest.mark.parametrize("tokens", [np.zeros((1, 128), dtype=np.int64), np.zeros((2, 63), dtype=np.int64),
                                    np.zeros((1, 64)), np.zeros(64, dtype=np.int64)])
def test_decode_refuses_tokens_that_are_not_one_grid_of_integer_codes_per_image(exported, tokens):
    """OnnxSampler.decode takes (B, 64) integer codes: two images' worth in one row, a short row,
    float codes and a 1-D array are refused in one line, not decoded as other images or truncated."""
    folder, _, _ = exported
    with pytest.raises(ValueError, match=re.escape("tokens must be integer codes of shape (B, 64), the 8x8 grid")):
        OnnxSampler(str(folder), device="cpu").decode(tokens)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # GroupNorm's; torch hides its own outside pytest
def test_a_tokenizer_in_bf16_exports_an_fp32_decoder(exported, tmp_path):
    """export_onnx converts its copy of the tokenizer to fp32, as it does the ARPG's: a bf16 tokenizer
    exports the same fp32 decoder graph (ONNX's convolutions have no bf16), and the caller's is left bf16."""
    _, model, vq = exported
    vq_bf16 = copy.deepcopy(vq).to(torch.bfloat16)
    export_onnx(model, vq_bf16, str(tmp_path / "onnx"))
    graph = onnx.load(str(tmp_path / "onnx" / "vq_decoder.onnx"))
    types = {t.data_type for t in graph.graph.initializer if t.data_type != onnx.TensorProto.INT64}
    assert types == {onnx.TensorProto.FLOAT}, f"decoder weight types {types}"
    assert next(vq_bf16.parameters()).dtype == torch.bfloat16, "the caller's tokenizer was converted"


# --- the numpy loop equals ARPG.generate ---

@pytest.mark.parametrize("steps, cfg_scale, cfg_schedule, schedule", [
    (8, 4.0, "linear", "arccos"), (16, 2.5, "constant", "cosine"), (24, 1.0, "linear", "arccos")])
def test_greedy_onnx_runtime_loop_gives_arpg_generate_tokens(exported, steps, cfg_scale, cfg_schedule, schedule):
    """With the same order and greedy decoding, OnnxSampler.generate returns exactly ARPG.generate's tokens
    (guided and unguided, both schedules and both guidance schedules)."""
    folder, model, _ = exported
    labels, order = torch.tensor([0, 3, 9, 3]), torch.randperm(64, generator=torch.Generator().manual_seed(steps))
    settings = dict(steps=steps, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, schedule=schedule, top_k=1)
    expected = model.generate(labels, order=order, **settings).numpy()
    tokens = OnnxSampler(str(folder), device="cpu").generate(labels.numpy(), order=order.numpy(), **settings)
    assert np.array_equal(tokens, expected), f"{(tokens != expected).sum()} of {tokens.size} tokens differ"


def test_the_dynamo_exporter_gives_the_same_tokens(exported, tmp_path):
    """export.py --dynamo (torch.export instead of TorchScript tracing) writes graphs that pass the
    same parity check, without a warning, and give ARPG.generate's greedy tokens."""
    _, model, _ = exported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metadata = export_onnx(model, None, str(tmp_path / "dynamo"), dynamo=True)
    assert not caught, "the export warned: " + "; ".join(str(warning.message)[:200] for warning in caught)
    assert metadata["exported_with"]["exporter"] == "dynamo", metadata["exported_with"]
    labels, order = torch.tensor([2, 7]), torch.randperm(64, generator=torch.Generator().manual_seed(0))
    settings = dict(steps=16, cfg_scale=2.5, cfg_schedule="constant", schedule="cosine", top_k=1)
    expected = model.generate(labels, order=order, **settings).numpy()
    sampler = OnnxSampler(str(tmp_path / "dynamo"), device="cpu")
    tokens = sampler.generate(labels.numpy(), order=order.numpy(), **settings)
    assert np.array_equal(tokens, expected), f"{(tokens != expected).sum()} of {tokens.size} tokens differ"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="needs onnxruntime-gpu (this onnxruntime has no CUDA provider)")])])
@pytest.mark.parametrize("steps", [8, 32])
def test_onnx_runtime_loop_gives_the_official_greedy_tokens(tmp_path, steps, device):
    """Exported from the official implementation's tiny model (16x16 grid), the ONNX Runtime loop
    reproduces the official greedy generations token for token, on the CPU and, where there is
    one, on a CUDA GPU (.ci/gpu: TF32 off, so its fp32 products round as the CPU's do)."""
    reference = np.load(FIXTURES / "arpg_tiny_reference.npz")
    config = ARPGConfig(**json.loads(str(reference["config"])))
    model = ARPG.from_checkpoint(str(FIXTURES / "arpg_tiny_official.pt"), config).eval()
    export_onnx(model, None, str(tmp_path))
    settings = json.loads(str(reference[f"gen{steps}_settings"]))
    sampler = OnnxSampler(str(tmp_path), device=device)
    assert sampler.device == device, f"asked for {device}, ONNX Runtime ran on {sampler.device}"
    tokens = sampler.generate(
        np.array(settings["classes"]), steps=steps, cfg_scale=settings["guidance_scale"],
        cfg_schedule=settings["cfg_schedule"], schedule=settings["sample_schedule"], top_k=settings["top_k"],
        order=reference[f"gen{steps}_order"])
    expected = reference[f"gen{steps}_tokens"]
    assert np.array_equal(tokens, expected), f"{(tokens != expected).sum()} of {tokens.size} tokens differ"


def test_fp16_and_larger_grid_exports_decode_like_pytorch(tmp_path, exported):
    """An fp16 export (logits within 1e-2 of fp32 PyTorch, by export's own measure) decodes, greedily
    and guided, at least 95% of fp32 PyTorch's tokens (fp16 rounding may flip near-ties); an export
    for a larger, non-square grid (--grid) gives ARPG.generate(grid=...)'s greedy tokens."""
    _, model, _ = exported
    export_onnx(model, None, str(tmp_path / "fp16"), fp16=True)
    metadata = json.loads((tmp_path / "fp16" / "arpg_onnx.json").read_text())
    assert metadata["dtype"] == "float16" and metadata["parity_max_abs_diff"]["guided"] <= 1e-2, metadata
    labels, order = torch.tensor([1, 2, 3, 4]), torch.randperm(64, generator=torch.Generator().manual_seed(0))
    expected = model.generate(labels, steps=8, top_k=1, order=order, cfg_scale=4.0).numpy()
    tokens = OnnxSampler(str(tmp_path / "fp16"), device="cpu").generate(labels.numpy(), steps=8, top_k=1,
                                                                       order=order.numpy(), cfg_scale=4.0)
    assert (tokens == expected).mean() >= 0.95, f"fp16 agrees on {(tokens == expected).mean():.0%} of the tokens"
    for name in ("context", "guided"):                                    # RoPE stays fp32, as in PyTorch
        graph = onnx.load(str(tmp_path / "fp16" / f"{name}.onnx"))
        ropes = [t.data_type for t in graph.graph.initializer if t.name == "rope"]
        assert ropes == [onnx.TensorProto.FLOAT], f"{name}.onnx: RoPE table types {ropes}"

    export_onnx(model, None, str(tmp_path / "wide"), grid=(6, 12))
    labels, order = torch.tensor([4, 5]), torch.randperm(72, generator=torch.Generator().manual_seed(0))
    expected = model.generate(labels, steps=12, top_k=1, order=order, grid=(6, 12)).numpy()
    tokens = OnnxSampler(str(tmp_path / "wide"), device="cpu").generate(labels.numpy(), steps=12, top_k=1,
                                                                       order=order.numpy())
    assert np.array_equal(tokens, expected), f"{(tokens != expected).sum()} of {tokens.size} tokens differ"


# --- the numpy copy of arpg.py's sampler (the schedules are one shared file, schedules.py) ---

@pytest.mark.parametrize("temperature, top_k, top_p, kept", SAMPLING_CASES)
def test_numpy_sampler_draws_the_kept_tokens_in_proportion_to_exp_logit_over_t(temperature, top_k, top_p, kept):
    """onnx_sampler.sample_tokens draws exactly the tokens the rules keep (worked out by hand in
    tests/test_arpg.py, where arpg.sample_tokens meets the same cases), each with probability
    exp(logit / T) over the kept tokens' sum (20,000 draws, within 0.015)."""
    draws = 20000
    logits = np.tile(np.array(SAMPLING_LOGITS, dtype=np.float32), (draws, 1))
    frequency = np.bincount(onnx_sampler.sample_tokens(logits, np.random.default_rng(0), temperature, top_k, top_p),
                            minlength=len(SAMPLING_LOGITS)) / draws
    assert set(np.flatnonzero(frequency).tolist()) == kept, f"drew {np.flatnonzero(frequency).tolist()}"
    weight = {i: math.exp(SAMPLING_LOGITS[i] / temperature) for i in kept}
    for i in kept:
        expected = weight[i] / sum(weight.values())
        assert abs(frequency[i] - expected) < 0.015, f"token {i}: {frequency[i]:.3f} drawn, {expected:.3f} expected"


def test_the_sampler_s_default_steps_fit_a_grid_of_fewer_than_32_tokens(exported, tmp_path):
    """onnx_sampler.py with no --steps on an export of 15 tokens (--grid 3 5) decodes one token per
    step instead of refusing its own default of 32."""
    folder, _, _ = exported
    code, output = run("export.py", "--ckpt", str(folder.parent / "arpg.pt"), "--vq-ckpt",
                       str(folder.parent / "tokenizer.pt"), "--grid", "3", "5", "--out", str(tmp_path / "small"))
    assert code == 0, output
    code, output = run("onnx_sampler.py", "--onnx-dir", str(tmp_path / "small"), "--device", "cpu", "--per-class", "1",
                       "--out", str(tmp_path / "grid.png"))
    assert code == 0 and "15 steps" in output and (tmp_path / "grid.png").is_file(), output
    sampler = OnnxSampler(str(tmp_path / "small"), device="cpu")          # and the API's default alike
    tokens = sampler.generate(np.array([1]), seed=0)
    assert np.array_equal(tokens, sampler.generate(np.array([1]), steps=15, seed=0)), "the default is not 15 steps"


def test_the_command_line_samples_in_batches_of_batch_size(exported, tmp_path, monkeypatch):
    """onnx_sampler.py --batch-size 4 samples 2 classes x 3 images as batches of 4 and 2, one random
    stream through both (the second batch is not the first one's draw again), into one grid."""
    folder, _, _ = exported
    batches = []
    real_generate = OnnxSampler.generate

    def generate(self, labels, **kwargs):
        tokens = real_generate(self, labels, **kwargs)
        batches.append((labels.tolist(), tokens, {key: value for key, value in kwargs.items() if key != "seed"}))
        return tokens
    monkeypatch.setattr(OnnxSampler, "generate", generate)
    monkeypatch.setattr(sys, "argv", ["onnx_sampler.py", "--onnx-dir", str(folder), "--device", "cpu", "--classes",
                                      "1", "1", "--per-class", "3", "--batch-size", "4", "--steps", "4",
                                      "--seed", "7", "--out", str(tmp_path / "grid.png")])
    onnx_sampler.main()
    assert [labels for labels, _, _ in batches] == [[1, 1, 1, 1], [1, 1]], batches
    sampler, rng = OnnxSampler(str(folder), device="cpu"), np.random.default_rng(7)  # one stream, drawn on
    for labels, tokens, settings in batches:
        expected = real_generate(sampler, np.array(labels), seed=rng, **settings)
        assert np.array_equal(tokens, expected), f"batch {labels} is not the next draw of one random stream"
    assert (tmp_path / "grid.png").is_file(), "no grid written"


def test_onnx_runtime_out_of_memory_is_one_line(exported, tmp_path, monkeypatch, capsys):
    """A failed allocation inside ONNX Runtime (a RuntimeException or a Fail, running a graph or
    loading one) ends onnx_sampler.py with one out-of-memory line and exit code 1, not a traceback
    or a claim that the export is damaged; its other errors are not mistaken for it."""
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException
    folder, _, _ = exported
    message = "Failed to allocate memory for requested buffer of size 34359738368"

    def run_out_of_memory(self, *args, **kwargs):
        raise RuntimeException(f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : {message}")
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", run_out_of_memory)
    monkeypatch.setattr(sys, "argv", ["onnx_sampler.py", "--onnx-dir", str(folder), "--device", "cpu",
                                      "--out", str(tmp_path / "grid.png")])
    with pytest.raises(SystemExit) as stopped:
        onnx_sampler.run_script(onnx_sampler.main)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and err.strip().splitlines() == [
        "error: out of memory: ask for less at once (a smaller batch, grid or image count)"], err
    assert not (tmp_path / "grid.png").exists(), "grid.png was written after running out of memory"
    with pytest.raises(RuntimeException, match="shape mismatch"), onnx_sampler.memory_error_when_full():
        raise RuntimeException("shape mismatch")
    with pytest.raises(MemoryError), onnx_sampler.memory_error_when_full():   # ORT's CPU allocator
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : bad allocation")

    def session_too_large(*args, **kwargs):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Load model from context.onnx failed:bad allocation")
    monkeypatch.setattr(onnx_sampler.ort, "InferenceSession", session_too_large)
    with pytest.raises(MemoryError):                                      # not "damaged: re-export"
        onnx_sampler.load_graph(str(folder / "context.onnx"), None, ["CPUExecutionProvider"])


def test_numpy_sampler_refuses_nan_logits():
    """NaN logits (a damaged or overflowing export) are refused, not drawn as token 0."""
    logits = np.array([[0.5, np.nan, 1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    for top_p in (1.0, 0.8):
        with pytest.raises(ValueError, match="the logits hold NaN or inf"):
            onnx_sampler.sample_tokens(logits, np.random.default_rng(0), top_p=top_p)


# --- deployment without torch, and bad input ---

BLOCK_TORCH = """
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
"""


def test_sampler_runs_where_importing_torch_fails(exported, tmp_path):
    """With a sitecustomize that makes `import torch` raise, the sampler still imports, generates,
    decodes and writes a PNG grid from the command line, and torch is never loaded."""
    folder, _, _ = exported
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    code, output = run("-c", "import torch", env=env)
    assert code != 0 and "torch is blocked" in output, f"the hook does not block torch: {output}"
    code, output = run("-c", f"""
import sys, numpy as np
from onnx_sampler import OnnxSampler
sampler = OnnxSampler({str(folder)!r}, device="cpu")
images = sampler.decode(sampler.generate(np.array([1, 2]), steps=4, seed=0))
assert images.shape == (2, 64, 64, 3), images.shape
assert "torch" not in sys.modules
""", env=env)
    assert code == 0, output
    png = tmp_path / "grid.png"
    code, output = run("onnx_sampler.py", "--onnx-dir", str(folder), "--classes", "0", "5", "--per-class", "3",
                       "--steps", "4", "--device", "cpu", "--out", str(png), env=env)
    assert code == 0 and png.stat().st_size > 0, output
    # The checkpoint's sampling defaults, carried by the export:
    assert "2 classes x 3 images" in output and "cfg 2.5 (constant), cosine schedule, top-p 0.8," in output, output


def test_a_narrow_models_graphs_run_on_one_cpu_thread_and_the_decoder_on_the_default(exported):
    """Width 128: the context and guided sessions get one intra-op thread (their steps are too
    small to share; bench.py measures the gain), the VQ decoder keeps ORT's default (0 = all cores)."""
    folder, _, _ = exported
    sessions = onnx_sampler.OnnxSampler(str(folder), device="cpu").sessions
    threads = {name: session.get_session_options().intra_op_num_threads for name, session in sessions.items()}
    assert threads == {"context": 1, "guided": 1, "vq_decoder": 0}, threads


def test_bad_inputs_are_refused_with_one_clear_line(exported, tmp_path):
    """A tokenizer whose codebook is not ARPG's (export_onnx), a missing checkpoint, a grid too small
    to export, a file (or a path under one, or no name) as the export folder, a folder or a .txt
    name as the PNG, a missing graph, graphs mixed from two exports, a JSON that lacks a key, an
    export without a decoder, a class the model lacks and an explicit but unavailable CUDA provider
    each end with one 'error:' line and exit code 2; the sampler's API refuses class ids and codes
    out of range."""
    folder, model, vq = exported
    other_vq = VQModel(replace(VQ_PRESETS["small"], codebook_size=64))
    with pytest.raises(ValueError, match="the tokenizer has 64 codes but ARPG was trained on 128; pass the"):
        export_onnx(model, other_vq, str(tmp_path / "other_codebook"))    # no load_models here to check it first
    assert not (tmp_path / "other_codebook").exists(), "a refused export left a folder behind"
    with pytest.raises(ValueError, match="at least one row and one column and 12 tokens in all, got 0 x 8"):
        export_onnx(model, vq, str(tmp_path / "no_rows"), grid=(0, 8))
    with pytest.raises(ValueError, match="12 tokens in all, got 2 x 2"):  # too small for the parity check
        export_onnx(model, vq, str(tmp_path / "no_rows"), grid=(2, 2))
    assert not (tmp_path / "no_rows").exists(), "a refused export left a folder behind"
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(ValueError, match="is a file; the export needs a folder name"):
        export_onnx(model, vq, str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="notes.txt is a file, not a folder"):
        export_onnx(model, vq, str(tmp_path / "notes.txt" / "onnx"))
    code, output = run("export.py", "--ckpt", str(tmp_path / "nope.pt"), "--out", "")  # checked before loading
    assert code == 2 and output.strip() == "error: --out is empty; give the export a folder name", output
    code, output = run("onnx_sampler.py", "--onnx-dir", str(folder), "--device", "cpu", "--out", str(tmp_path))
    assert code == 2 and output.strip() == f"error: --out {tmp_path} is a folder; give a file name in it", output
    code, output = run("onnx_sampler.py", "--onnx-dir", str(folder), "--device", "cpu", "--out", str(tmp_path / "a.txt"))
    assert code == 2 and output.strip() == f"error: --out {tmp_path / 'a.txt'}: .txt is no image format PIL can " \
                                           f"write; end the name with .png or .jpg", output
    code, output = run("export.py", "--ckpt", str(tmp_path / "nope.pt"), "--grid", "2", "2")  # checked before loading
    assert code == 2 and output.strip() == "error: the grid must have at least one row and one column and 12 " \
                                           "tokens in all, got 2 x 2", output
    code, output = run("export.py", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x"))
    assert code == 2 and output.strip().splitlines()[-1].startswith("error: ARPG checkpoint not found"), output
    assert not (tmp_path / "x").exists(), "a failed export left a folder behind"

    missing = tmp_path / "missing"
    shutil.copytree(folder, missing)
    os.remove(missing / "guided.onnx")
    code, output = run("onnx_sampler.py", "--onnx-dir", str(missing), "--device", "cpu")
    assert code == 2 and output.strip() == f"error: guided.onnx is missing from {missing}; " \
                                            "re-export the folder with python export.py", output

    mixed = tmp_path / "mixed"                                            # the JSON of another export
    shutil.copytree(folder, mixed)
    metadata = json.loads((mixed / "arpg_onnx.json").read_text())
    (mixed / "arpg_onnx.json").write_text(json.dumps({**metadata, "export_id": "another export"}))
    code, output = run("onnx_sampler.py", "--onnx-dir", str(mixed), "--device", "cpu")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert output.startswith("error: context.onnx comes from another export"), output

    older = tmp_path / "older"                                            # a JSON without a key this sampler reads
    shutil.copytree(folder, older)
    (older / "arpg_onnx.json").write_text(json.dumps({k: v for k, v in metadata.items() if k != "default_classes"}))
    code, output = run("onnx_sampler.py", "--onnx-dir", str(older), "--device", "cpu")
    assert code == 2 and output.strip() == f"error: {older / 'arpg_onnx.json'} lacks default_classes: re-export " \
                                            "the folder with python export.py", output

    undecodable = tmp_path / "undecodable"                                # bench.py's kind: no VQ decoder
    shutil.copytree(folder, undecodable)
    os.remove(undecodable / "vq_decoder.onnx")
    graphs = {k: v for k, v in metadata["graphs"].items() if k != "vq_decoder"}
    (undecodable / "arpg_onnx.json").write_text(json.dumps({**metadata, "graphs": graphs}))
    code, output = run("onnx_sampler.py", "--onnx-dir", str(undecodable), "--device", "cpu")
    assert code == 2 and output.strip() == f"error: {onnx_sampler.NO_DECODER}", output

    code, output = run("onnx_sampler.py", "--onnx-dir", str(folder), "--device", "cpu", "--classes", "12", "3", "12",
                       "--out", str(tmp_path / "never.png"))
    assert code == 2 and output.strip() == "error: --classes 12 out of range: this model has 10 classes (0..9)", output
    assert not (tmp_path / "never.png").exists(), "a refused run wrote its grid"
    sampler = OnnxSampler(str(folder), device="cpu")
    with pytest.raises(ValueError, match="class ids"):
        sampler.generate(np.array([10]))
    with pytest.raises(ValueError, match=r"tokens must be codes in \[0, 128\), got 0..128"):
        sampler.decode(np.array([[0] * 63 + [128]]))
    for settings, message in (({"top_p": 0.0}, r"top-p must be in \(0, 1\]"),
                              ({"temperature": -1.0}, "must be 0 or more, got -1.0 and 0"),
                              ({"top_k": -2}, "must be 0 or more, got 1.0 and -2"),
                              ({"schedule": "linear"}, "schedule must be one of")):
        with pytest.raises(ValueError, match=message):                    # the same check as ARPG.generate's
            sampler.generate(np.array([1]), **settings)
    if "CUDAExecutionProvider" not in ort.InferenceSession(str(folder / "guided.onnx"), providers=[
            "CUDAExecutionProvider", "CPUExecutionProvider"]).get_providers():
        code, output = run("onnx_sampler.py", "--onnx-dir", str(folder), "--device", "cuda")
        assert code == 2 and output.strip().startswith("error: the CUDA execution provider is not available"), output


@pytest.mark.parametrize("case, message", [
    ("no JSON", "no arpg_onnx.json in "),
    ("another format", "is not an ARPG ONNX export (arpg-onnx/1); re-export with python export.py"),
    (["--steps", "0"], "steps must be between 1 and the 64 tokens to decode, got 0"),
    (["--steps", "65"], "steps must be between 1 and the 64 tokens to decode, got 65"),
    (["--per-class", "0"], "--per-class must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_onnx_sampler_command_line_refuses_bad_input_in_one_line(exported, tmp_path, monkeypatch, capsys, case,
                                                                 message):
    """A folder without arpg_onnx.json, a JSON of another format, a step count outside 1..64 and
    --per-class or --batch-size below 1 end onnx_sampler.py with one 'error:' line and exit code 2,
    and no PNG is written."""
    folder, _, _ = exported
    argv = []
    if case == "no JSON":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "another format":
        metadata = json.loads((folder / "arpg_onnx.json").read_text())
        shutil.copytree(folder, tmp_path / "other")
        folder = tmp_path / "other"
        (folder / "arpg_onnx.json").write_text(json.dumps({**metadata, "format": "arpg-onnx/0"}))
    else:
        argv = case
    png = tmp_path / "never.png"
    monkeypatch.setattr(sys, "argv", ["onnx_sampler.py", "--onnx-dir", str(folder), "--device", "cpu",
                                      "--out", str(png), *argv])
    with pytest.raises(SystemExit) as stopped:
        onnx_sampler.run_script(onnx_sampler.main)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err
    assert not png.exists(), "a refused run wrote its grid"


@pytest.mark.parametrize("labels, settings, message", [
    (np.array([], dtype=np.int64), {}, "labels must be a non-empty 1-D array of integer class ids in [0, 10), got []"),
    (np.array([1.9]), {}, "labels must be a non-empty 1-D array of integer class ids in [0, 10), got [1.9]"),
    (np.array([1]), {"order": np.zeros(64, dtype=np.int64)}, "order must be a permutation of the 64 grid positions"),
    (np.array([1]), {"order": np.arange(63)}, "order must be a permutation of the 64 grid positions"),
    (np.array([1]), {"order": np.arange(64) + 0.5}, "order must be a permutation of the 64 grid positions"),
])
def test_onnx_sampler_api_refuses_empty_labels_and_orders_that_are_no_permutation(exported, labels, settings,
                                                                                   message):
    """OnnxSampler.generate refuses an empty batch of labels, labels that are not integers (1.9 would
    sample class 1) and an order that is not a permutation of the grid's 64 positions (one repeated,
    one short, or not integers), with a ValueError."""
    folder, _, _ = exported
    with pytest.raises(ValueError, match=re.escape(message)):
        OnnxSampler(str(folder), device="cpu").generate(labels, **settings)


def list_providers(monkeypatch, providers):
    """Make ONNX Runtime list these execution providers, whichever package is installed
    (onnxruntime-gpu lists CUDA even on a machine without a GPU; the CPU-only package does not)."""
    for module in (ort, ort.capi._pybind_state):                          # what we read, and what ORT reads
        monkeypatch.setattr(module, "get_available_providers", lambda: list(providers))


def test_onnx_runtime_is_asked_for_the_gpu_it_is_given(exported, monkeypatch):
    """device "cuda:N" asks ONNX Runtime's CUDA provider for GPU N and "cuda" for GPU 0 (bench.py
    passes torch's device, so both time the same GPU); a malformed device name is refused."""
    folder, _, _ = exported
    graphs = onnx_sampler.read_metadata(str(folder))["graphs"]
    list_providers(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    asked = []

    class CudaSession:                                                    # as if the CUDA provider had started
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnx_sampler, "load_graph", lambda path, options, providers: asked.append(providers)
                        or CudaSession())
    for device, gpu in (("cuda:1", 1), ("cuda", 0), ("auto", 0)):
        asked.clear()
        _, used = onnx_sampler.start_sessions(str(folder), graphs, device)
        assert used == ("cuda", gpu), f"{device}: ran on {used}"
        assert asked == [[("CUDAExecutionProvider", {"device_id": gpu, "use_tf32": 0}),
                          "CPUExecutionProvider"]] * len(graphs), asked
    for bad in ("cuda:x", "gpu", "cuda:"):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            onnx_sampler.start_sessions(str(folder), graphs, bad)
    out = folder.parent / "not_made"
    code, output = run("onnx_sampler.py", "--onnx-dir", str(folder), "--device", "gpu", "--out", str(out / "x.png"))
    assert code == 2 and "device must be auto, cpu, cuda or cuda:N" in output and not out.exists(), output


def test_a_cuda_provider_that_raises_is_not_taken_for_a_damaged_export(exported, monkeypatch, capsys):
    """If ONNX Runtime's CUDA provider raises instead of falling back (a GPU number that does not
    exist), --device cuda:N says CUDA is not available for it and --device auto runs on the CPU,
    rather than calling the export damaged."""
    folder, _, _ = exported
    graphs = onnx_sampler.read_metadata(str(folder))["graphs"]
    list_providers(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session = ort.InferenceSession

    def session(path, options=None, providers=None):
        if any("CUDAExecutionProvider" in str(provider) for provider in providers):
            raise Fail("CUDA failure 101: invalid device ordinal")
        return real_session(path, options, providers=providers)
    monkeypatch.setattr(onnx_sampler.ort, "InferenceSession", session)
    with pytest.raises(ValueError, match="CUDA execution provider is not available here for cuda:3"):
        onnx_sampler.start_sessions(str(folder), graphs, "cuda:3")
    sessions, used = onnx_sampler.start_sessions(str(folder), graphs, "auto")
    assert used == ("cpu", 0) and set(sessions) == set(graphs), used
    assert "running ONNX Runtime on the CPU" in capsys.readouterr().err, \
        "expected a note on stderr that ONNX Runtime runs on the CPU"


def test_the_cpu_only_onnxruntime_package_runs_on_the_cpu_in_one_line(exported, monkeypatch, capfd):
    """The CPU-only onnxruntime package lists no CUDA provider: --device auto says so in one line,
    and ONNX Runtime is not asked for CUDA (asked, it warns in two lines more); cuda is refused."""
    folder, _, _ = exported
    graphs = onnx_sampler.read_metadata(str(folder))["graphs"]
    list_providers(monkeypatch, ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="CUDA execution provider is not available here for cuda"):
        onnx_sampler.start_sessions(str(folder), graphs, "cuda")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _, used = onnx_sampler.start_sessions(str(folder), graphs, "auto")
    err = capfd.readouterr().err
    assert used == ("cpu", 0) and not warned and err.strip().splitlines() == [
        "onnx_sampler: CUDA execution provider not available, running ONNX Runtime on the CPU"], \
        (err, [str(w.message) for w in warned])


def test_an_export_that_is_not_finite_is_refused_and_writes_nothing(exported, tmp_path, monkeypatch):
    """Weights that hold NaN are refused before anything is traced; a NaN parity figure (which
    `diff > limit` would let through) is refused for an fp32 export, a non-finite one for fp16;
    none leaves a folder behind, not even the ones it made above its own, but what another export
    wrote into them meanwhile stays."""
    _, model, vq = exported
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layers.to_v.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"the ARPG weights hold NaN or inf \(layers.to_v.weight\)"):
        export_onnx(broken, vq, str(tmp_path / "nan_weights"))
    real_parity = export.measure_parity
    for fp16, value in ((False, float("nan")), (True, float("inf"))):
        monkeypatch.setattr(export, "measure_parity", lambda *args: {**real_parity(*args), "guided": value})
        with pytest.raises(ValueError, match=r"differ from PyTorch .*'guided': (nan|inf)"):
            export_onnx(model, None, str(tmp_path / "made" / "on_the_way" / "not_finite"), fp16=fp16)
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)

    def parity_while_another_export_writes_there(*args):                 # into folders this export made
        (tmp_path / "made" / "beside").mkdir()
        (tmp_path / "made" / "beside" / "context.onnx").write_text("another export's graph")
        (tmp_path / "made" / "on_the_way" / "not_finite" / "guided.onnx").write_text("another export's graph")
        return {**real_parity(*args), "guided": float("nan")}
    monkeypatch.setattr(export, "measure_parity", parity_while_another_export_writes_there)
    with pytest.raises(ValueError, match="differ from PyTorch"):
        export_onnx(model, None, str(tmp_path / "made" / "on_the_way" / "not_finite"))
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert left == ["made", "made/beside", "made/beside/context.onnx", "made/on_the_way",
                    "made/on_the_way/not_finite", "made/on_the_way/not_finite/guided.onnx"], left


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # GroupNorm's; torch hides its own outside pytest
def test_the_parity_check_measures_graphs_that_differ_from_pytorch(exported, tmp_path, monkeypatch):
    """measure_parity really compares: the exported graphs against the model they came from are
    within 1e-4, against the same model with one weight of each pass moved by 1e-2 they are not;
    and an export whose graphs are measured against that other model is refused, writing nothing."""
    folder, model, vq = exported
    graphs = {name: str(folder / f"{name}.onnx") for name in ("context", "guided", "vq_decoder")}
    rope, real_parity = model.rope_table(8, 8), export.measure_parity
    same = real_parity(graphs, model, vq, rope, (8, 8), np.float32)
    assert max(same.values()) <= 1e-4, f"the graphs differ from their own model: {same}"
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.layers.self_dec[0].attn.to_q.weight[0] += 1e-2               # Pass 1
        moved.layers.cross_dec[0].ffn.w2.weight[0] += 1e-2                 # Pass 2
    other = real_parity(graphs, moved, vq, rope, (8, 8), np.float32)
    assert other["context"] > 1e-3 and other["guided"] > 1e-3, f"moved weights went unmeasured: {other}"
    assert other["vq_decoder"] <= 1e-4, f"the decoder was not moved: {other}"
    monkeypatch.setattr(export, "measure_parity", lambda graphs, model, *rest: real_parity(graphs, moved, *rest))
    with pytest.raises(ValueError, match="ONNX graphs differ from PyTorch by more than"):
        export_onnx(model, vq, str(tmp_path / "onnx"))
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_export_installs_each_graph_before_its_weights_and_the_json_last(exported, tmp_path, monkeypatch):
    """A reader that opens a folder caught half-way finds no old graph beside new weights: each
    .onnx is moved in before its .onnx.data, and arpg_onnx.json after all of them."""
    _, model, _ = exported
    moved, real_replace = [], os.replace
    monkeypatch.setattr(export.os, "replace", lambda src, dst: moved.append(os.path.basename(dst)) or real_replace(src, dst))
    export_onnx(model, None, str(tmp_path / "onnx"))
    assert moved == [f"{g}.onnx{s}" for g in ("context", "guided") for s in ("", ".data")] + ["arpg_onnx.json"], moved


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm, a file system of its own")
def test_export_into_a_link_to_another_file_system(exported, tmp_path):
    """An --out that is a link to a folder on another file system (here /dev/shm) is exported into
    in place: the work folder lives inside it, so every move stays on one file system."""
    _, model, _ = exported
    target = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if os.stat(target).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system as the test's folder here")
        (tmp_path / "link").symlink_to(target)
        export_onnx(model, None, str(tmp_path / "link"))
        assert sorted(os.listdir(target)) == sorted(["arpg_onnx.json", "context.onnx", "context.onnx.data",
                                                     "guided.onnx", "guided.onnx.data"]), os.listdir(target)
    finally:
        shutil.rmtree(target)


@pytest.mark.parametrize("damaged_file, damage", [("guided.onnx.data", "removed"), ("guided.onnx", "truncated"),
                                                  ("guided.onnx.data", "truncated"), ("arpg_onnx.json", "truncated")])
def test_a_damaged_export_is_refused_in_one_line_naming_the_file(exported, tmp_path, damaged_file, damage):
    """A missing or truncated graph file or a truncated arpg_onnx.json ends with one 'error:' line
    naming the file and saying to re-export, and exit code 2, not ONNX Runtime's or json's traceback."""
    folder, _, _ = exported
    damaged = tmp_path / "onnx"
    shutil.copytree(folder, damaged)
    path = damaged / damaged_file
    if damage == "removed":
        os.remove(path)
    else:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    code, output = run("onnx_sampler.py", "--onnx-dir", str(damaged), "--device", "cpu",
                       "--out", str(tmp_path / "x.png"))
    named = str(path).removesuffix(".data")                               # the graph, whose data file is broken
    assert code == 2 and len(output.strip().splitlines()) == 1 and output.startswith("error: "), output
    assert named in output and "re-export the folder with python export.py" in output, output
    assert not (tmp_path / "x.png").exists(), "a PNG was written from a damaged export"


@pytest.mark.parametrize("cfg", ["nan", "inf", "-inf"])
def test_a_non_finite_guidance_scale_is_refused_in_one_line(exported, tmp_path, cfg):
    """--cfg nan / inf / -inf would turn every logit into nan and sample garbage: refused, exit code 2."""
    folder, _, _ = exported
    code, output = run("onnx_sampler.py", "--onnx-dir", str(folder), "--device", "cpu", f"--cfg={cfg}",
                       "--out", str(tmp_path / "x.png"))
    assert code == 2 and output.startswith("error: temperature and guidance must be finite numbers, got 1.0 and "), output
    assert not (tmp_path / "x.png").exists(), "a PNG was written"
