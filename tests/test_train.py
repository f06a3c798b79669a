"""train.py: the loss falls, resume is bit-exact, torchrun keeps the ranks identical, both code
layouts load, the data order is a pure function of the step, and bad input is refused cleanly."""

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from arpg import ARPG, ARPG_PRESETS
from data import make_builtin_dataset
from tokenizer import VQ_PRESETS, VQModel, images_to_tensor, tokenize_folder
from train import (FP32_CPU_TINY_LAYERS, TOKENIZER_MINUTES, TOKENIZER_STEPS, StepSampler, build_dataset,
                   fill_in_defaults, learning_rate, main, make_optimizers, model_layers, parse_args, update_ema)

REPO = Path(__file__).resolve().parent.parent
VOCAB, LENGTH = 32, 16                     # small codes: a 4 x 4 grid of 32 codes keeps every run fast
FAST = ["--vocab-size", str(VOCAB), "--batch-size", "8", "--log-every", "1", "--device", "cpu", "--no-compile"]


def write_codes(root, n_classes=3, per_class=5, n_aug=2, llamagen_layout=False, high=VOCAB, seed=0):
    """Random codes {root}/{class}/{index}.npy of shape (n_aug, L), or LlamaGen's (1, n_aug, L)."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        os.makedirs(root / str(c), exist_ok=True)
        for i in range(per_class):
            codes = rng.integers(0, high, size=(n_aug, LENGTH), dtype=np.int64)
            np.save(root / str(c) / f"{i}.npy", codes[None] if llamagen_layout else codes)
    return root


# One thread per process: these models are tiny, and two threads that share two busy cores with
# other processes spin-wait for each other (10x slower on a loaded machine).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**ONE_THREAD, **(env or {})})


def logged_losses(stdout):
    return [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines() if "| loss " in line]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, what):
    """Two nested checkpoint structures are the same: every tensor bitwise, every other value equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys differ"
        for key in a:
            assert_same_tensors(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: {len(a)} items against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:                                                                 # lr, betas, step counts...
        assert a == b, f"{what}: {a} against {b}"


# --- training works ---

def test_loss_falls_on_builtin_data(tmp_path):
    """A few steps on the built-in shapes (through a tokenizer) lower the loss from ln(V), and the
    default outputs appear: a checkpoint that loads with weights_only and a sample grid."""
    torch.manual_seed(0)
    tokenizer = tmp_path / "tokenizer.pt"  # untrained: training it is tokenizer.py's test
    torch.save({"model": VQModel(VQ_PRESETS["small"]).state_dict(), "config": asdict(VQ_PRESETS["small"])}, tokenizer)
    result = run_train("--tokenizer", str(tokenizer), "--num-images", "100", "--max-steps", "25",
                       "--batch-size", "16", "--lr", "3e-3", "--log-every", "5", "--sample-columns", "2",
                       "--sample-steps", "4", "--no-compile", "--out", str(tmp_path / "arpg.pt"))
    assert result.returncode == 0, result.stderr
    losses = logged_losses(result.stdout)
    vocab = VQ_PRESETS["small"].codebook_size
    assert len(losses) == 5, f"expected a log line every 5 steps:\n{result.stdout}"
    assert losses[0] < math.log(vocab) + 0.01, f"a zero head starts at ln(V) = {math.log(vocab):.3f}, got {losses}"
    assert losses[-1] < losses[0] - 0.5, f"the loss did not fall: {losses}"
    checkpoint = load(tmp_path / "arpg.pt")
    assert checkpoint["step"] == 25 and checkpoint["config"]["vocab_size"] == vocab, "checkpoint contents"
    assert checkpoint["sampling"] == {"cfg_scale": 2.5, "cfg_schedule": "constant", "schedule": "cosine",
                                      "top_p": 0.8}, \
        "the tiny recipe's sampling travels with it"
    assert (tmp_path / "arpg_samples.png").is_file(), "no sample grid named after the checkpoint"
    assert f"tokenizer: {tokenizer}, trained before (delete it" in result.stdout, \
        "a tokenizer that is there is used, and said to be (--tokenizer-steps would train a new one)"


def test_interrupted_then_resumed_run_is_bit_exact(tmp_path):
    """Ctrl-C saves a checkpoint; --resume then ends with exactly the weights, EMA and optimizer
    state of a run that was never stopped (data order, orders, label and token dropout restored)."""
    data = write_codes(tmp_path / "codes", per_class=4)  # 12 images, batch 8: epochs end mid-batch
    common = ["--data", str(data), *FAST, "--ema", "0.9", "--save-every", "0"]
    straight = run_train(*common, "--max-steps", "30", "--out", str(tmp_path / "straight.pt"))
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "stopped.pt"
    process = subprocess.Popen([sys.executable, "train.py", *common, "--max-steps", "30", "--out", str(out)], cwd=REPO,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env=ONE_THREAD)
    for line in process.stdout:  # like Ctrl-C in a terminal: the signal goes to the whole process group
        if line.startswith("step 3/"):
            os.killpg(process.pid, signal.SIGINT)
            break
    process.communicate(timeout=120)
    assert process.returncode == 130, "an interrupted run exits with 130"
    stopped_at = load(out)["step"]
    assert 3 <= stopped_at < 30, f"the run should have stopped early and saved, saved step {stopped_at}"

    resumed = run_train(*common, "--out", str(out), "--resume")  # the step count comes from the checkpoint
    assert resumed.returncode == 0, resumed.stderr
    a, b = load(tmp_path / "straight.pt"), load(out)
    assert a["step"] == b["step"] == 30, "both runs end at the last step"
    for key in ("model", "ema", "optimizer"):
        assert_same_tensors(a[key], b[key], key)


def test_a_resumed_run_keeps_the_warm_up_of_its_first_plan(tmp_path, capsys):
    """A timed run re-plans its step count while the learning rate holds its peak and saves the new
    count (simulated here by editing it); resumed, its warm-up keeps the 4 steps it had, rather than
    becoming half of the new count and sending a run at its peak back into warm-up."""
    data, out = write_codes(tmp_path / "codes"), tmp_path / "arpg.pt"
    common = ["--data", str(data), *FAST, "--warmup", "0.5", "--decay", "0.25", "--lr", "1e-3", "--out", str(out)]
    main([*common, "--max-steps", "8"])
    checkpoint = load(out)
    assert checkpoint["warmup_steps"] == 4, checkpoint["warmup_steps"]
    checkpoint["args"]["max_steps"] = 32                                  # as a re-plan at step 8 would save
    torch.save(checkpoint, out)
    capsys.readouterr()
    main([*common, "--resume"])
    step_9 = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 9/32 |"))
    assert "| lr 1.00e-03 |" in step_9, f"step 9 is not at the peak: {step_9}"


def test_a_resumed_run_keeps_a_decay_that_a_late_re_plan_shortened(tmp_path, monkeypatch):
    """A re-plan can cut a timed run so short that its decay should have begun already: it then
    begins at once, over fewer steps than --decay of the new count (here 3 of 4, not 0.9 x 4). That
    count is saved, so a run interrupted after it and resumed decays as the uninterrupted one did
    and ends with the same weights."""
    monkeypatch.setattr(train, "steps_within", lambda *args, **kwargs: (20, time.perf_counter() + 3600))
    monkeypatch.setattr(train, "steps_that_fit", lambda *args: 3)        # the loop's pace: 1 + 3 steps in all
    step_2 = {}
    real_save = train.save_atomic

    def keep_step_2(checkpoint, path):
        if checkpoint["step"] == 2:
            step_2.update(copy.deepcopy(checkpoint))
        real_save(checkpoint, path)
    monkeypatch.setattr(train, "save_atomic", keep_step_2)
    out = tmp_path / "arpg.pt"
    common = ["--data", str(write_codes(tmp_path / "codes")), *FAST, "--warmup", "0", "--decay", "0.9", "--lr", "1e-3",
              "--min-lr", "0", "--out", str(out)]
    main([*common, "--total-minutes", "1", "--save-every", "2"])
    straight = load(out)
    assert straight["step"] == straight["args"]["max_steps"] == 4 and step_2, "the run was not re-planned to 4 steps"
    assert straight["decay_steps"] == 3, f"the decay spans {straight['decay_steps']} steps, not 3"
    last_lr = straight["optimizer"][0]["param_groups"][0]["lr"]          # step 3: 1 of the 3 decay steps left
    assert abs(last_lr - 1e-3 / 3) < 1e-12, f"the last step's learning rate is {last_lr}, not 1e-3 / 3"
    torch.save(step_2, out)                                               # as if stopped after step 2
    main([*common, "--resume"])
    resumed = load(out)
    for key in ("model", "optimizer"):
        assert_same_tensors(straight[key], resumed[key], key)


def test_ctrl_c_during_the_final_save_lets_it_finish(tmp_path, monkeypatch):
    """The stop handlers stay in place until the last checkpoint is written: a Ctrl-C in the middle
    of it no longer throws the save, and every step since the last one, away."""
    real_save = train.save_atomic

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)
    monkeypatch.setattr(train, "save_atomic", interrupted_save)
    main(["--data", str(write_codes(tmp_path / "codes")), *FAST, "--max-steps", "3", "--save-every", "0",
          "--out", str(tmp_path / "arpg.pt")])
    assert load(tmp_path / "arpg.pt")["step"] == 3, "the final checkpoint was not written"


def signal_every_process(pid, sig):
    """Send sig to a process and then to its children (its DataLoader workers, in their own sessions)."""
    os.kill(pid, sig)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        os.kill(int(child), sig)


@pytest.mark.parametrize("send", [os.killpg, signal_every_process], ids=["to its process group", "to every process"])
def test_sigterm_saves_like_ctrl_c(tmp_path, send):
    """SIGTERM sent to the run's process group (`timeout`, a shell's kill -- -PGID), which the
    DataLoader workers leave, or to every process of the run, workers included (a scheduler that
    signals a whole job), stops the run as Ctrl-C does: the checkpoint is saved, exit code 130."""
    data = write_codes(tmp_path / "codes")
    out = tmp_path / "arpg.pt"
    process = subprocess.Popen([sys.executable, "train.py", "--data", str(data), *FAST, "--workers", "2",
                                "--max-steps", "200", "--save-every", "0", "--out", str(out)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=ONE_THREAD)
    for line in process.stdout:
        if line.startswith("step 3/"):
            send(process.pid, signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, f"exit code {process.returncode}: {stderr[-2000:]}"
    assert 3 <= load(out)["step"] < 200, "the stopped run did not save its step"


def test_total_minutes_picks_a_step_count_that_fits(tmp_path):
    """--total-minutes times a few steps, then trains as many as fit in the budget: the count is
    printed, saved as the schedule's length, and the run ends near the budget, not far beyond it."""
    data = write_codes(tmp_path / "codes")
    started = time.perf_counter()
    result = run_train("--data", str(data), *FAST, "--total-minutes", "0.15", "--log-every", "100000",
                       "--save-every", "0", "--out", str(tmp_path / "arpg.pt"))
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("--total-minutes 0.15:")]
    steps = int(line.split()[-2])
    checkpoint = load(tmp_path / "arpg.pt")
    # Batch-8 steps take ~50-100 ms on one core, ~200 ms on a busy one: the budget fits well over 10.
    assert checkpoint["step"] == checkpoint["args"]["max_steps"] == steps > 10, line
    assert seconds < 2 * 9 + 15, f"a 9-second budget took {seconds:.0f} s (start-up included)"


def test_a_probe_that_is_too_fast_is_corrected_from_the_real_steps(tmp_path, monkeypatch, capsys):
    """If the timed probe promises 4x the steps that really fit, the count is re-planned from the
    loop's own pace while the learning rate is at its peak: the run saves the smaller count it
    reached, after its full decay."""
    import train
    probe = train.throwaway_steps
    monkeypatch.setattr(train, "throwaway_steps", lambda *args, **kwargs: probe(*args, **kwargs) / 4)
    data = write_codes(tmp_path / "codes")
    main(["--data", str(data), *FAST, "--total-minutes", "0.15", "--save-every", "0", "--out",
          str(tmp_path / "arpg.pt")])
    stdout = capsys.readouterr().out
    (line,) = [line for line in stdout.splitlines() if line.startswith("--total-minutes 0.15:")]
    planned = int(line.split()[-2])
    checkpoint = load(tmp_path / "arpg.pt")
    assert "re-planned" in stdout, stdout
    assert checkpoint["step"] == checkpoint["args"]["max_steps"] < planned / 2, (line, checkpoint["step"])
    # The last step ran at the bottom of the (re-planned) decay: one decay step above --min-lr. (A
    # re-plan late in a slow spell shortens the decay to the steps left: the saved decay_steps.)
    args, decay_steps = checkpoint["args"], checkpoint["decay_steps"]
    assert 1 <= decay_steps <= round(args["decay"] * args["max_steps"]), decay_steps
    final_lr = checkpoint["optimizer"][0]["param_groups"][0]["lr"]
    expected = args["min_lr"] + (args["lr"] - args["min_lr"]) / decay_steps
    assert final_lr == pytest.approx(expected), f"the decay did not finish: lr {final_lr}, expected {expected}"


def test_a_cosine_schedule_keeps_the_probe_s_step_count(tmp_path, monkeypatch, capsys):
    """With the cosine decay (--decay 0) the learning rate falls from the end of the warm-up on,
    so a re-planned step count would bend it mid-decay: the probe's count stands, even when the
    probe was too fast."""
    import train
    probe = train.throwaway_steps
    monkeypatch.setattr(train, "throwaway_steps", lambda *args, **kwargs: probe(*args, **kwargs) / 4)
    data = write_codes(tmp_path / "codes")
    main(["--data", str(data), *FAST, "--total-minutes", "0.1", "--decay", "0", "--save-every", "0",
          "--out", str(tmp_path / "arpg.pt")])
    stdout = capsys.readouterr().out
    (line,) = [line for line in stdout.splitlines() if line.startswith("--total-minutes 0.1:")]
    assert "re-planned" not in stdout, stdout
    assert load(tmp_path / "arpg.pt")["step"] == int(line.split()[-2]), "the probe's step count was not kept"


def test_a_budget_with_no_time_left_for_the_arpg_is_refused_in_one_line(tmp_path):
    """When the time budget is spent before the ARPG's first step (here 0.6 s of --total-minutes
    against the data and the probe's steps), the run stops with one line saying so and writes no
    checkpoint, where it used to train one step and overrun."""
    data = write_codes(tmp_path / "codes")
    with pytest.raises(ValueError, match="--total-minutes 0.01 leaves no time for the ARPG: .* give more minutes"):
        main(["--data", str(data), *FAST, "--total-minutes", "0.01", "--out", str(tmp_path / "arpg.pt")])
    assert not (tmp_path / "arpg.pt").exists(), "a refused run wrote a checkpoint"


@pytest.mark.parametrize("step_flags, minutes", [([], TOKENIZER_MINUTES), (["--total-minutes", "3.8"], 1.0),
                                                (["--max-steps", "5"], None)])
def test_the_builtin_tokenizer_has_a_time_cap_only_in_a_timed_run(tmp_path, monkeypatch, step_flags, minutes):
    """A run timed by --total-minutes (the default) trains the missing tokenizer for its steps or
    TOKENIZER_MINUTES, whichever ends first, less in proportion in a smaller budget (3.8 of 9.5
    minutes: 1.0); a run of --max-steps trains it for its steps alone. Either writes its
    reconstruction grid beside the tokenizer, named after it (vq_recon.png for vq.pt)."""
    import train

    class Stop(Exception):
        pass

    calls = []

    def record_and_stop(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(train, "train_tokenizer", record_and_stop)
    with pytest.raises(Stop):
        main(["--tokenizer", str(tmp_path / "vq.pt"), "--num-images", "10", "--device", "cpu", *step_flags,
              "--out", str(tmp_path / "arpg.pt")])
    assert [(call["max_steps"], call["minutes"]) for call in calls] == [(TOKENIZER_STEPS, pytest.approx(minutes))], calls
    assert calls[0]["preview_path"] == str(tmp_path / "vq_recon.png"), "its reconstruction grid goes beside the tokenizer"


@pytest.mark.parametrize("flags, device, layers", [
    (["--precision", "fp32"], "cpu", FP32_CPU_TINY_LAYERS),         # the default run on a CPU without bf16
    (["--precision", "bf16"], "cpu", ARPG_PRESETS["tiny"].n_layer),
    (["--precision", "fp32", "--max-steps", "100"], "cpu", ARPG_PRESETS["tiny"].n_layer),
    (["--precision", "fp32", "--total-minutes", "0"], "cpu", ARPG_PRESETS["tiny"].n_layer),
    (["--precision", "fp32"], "cuda", ARPG_PRESETS["tiny"].n_layer),
    (["--precision", "fp32", "--layers", "6"], "cpu", 6),
    (["--size", "L", "--precision", "fp32"], "cpu", ARPG_PRESETS["L"].n_layer),
])
def test_a_timed_fp32_cpu_run_trains_a_shallower_tiny(flags, device, layers):
    """Only a timed run of tiny in fp32 on a CPU swaps the preset's depth for FP32_CPU_TINY_LAYERS;
    --max-steps, no time budget, another device or size keep the preset, and --layers wins."""
    args = parse_args(flags)
    fill_in_defaults(args, world_size=1)
    assert FP32_CPU_TINY_LAYERS != ARPG_PRESETS["tiny"].n_layer, "the swap would be invisible"
    got = model_layers(args, ARPG_PRESETS[args.size], torch.device(device))
    assert got == layers, f"{flags} on {device}: {got} blocks, expected {layers}"


# torch.compile's CPU backend builds C++ kernels with the compiler inductor looks for ($CXX, else
# g++; clang++ on macOS). Training without one falls back to eager (tested below where there is one).
CPP_COMPILER = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
needs_cpp_compiler = pytest.mark.skipif(shutil.which(CPP_COMPILER) is None,
                                        reason=f"needs a C++ compiler for torch.compile ({CPP_COMPILER} not found)")


@needs_cpp_compiler
def test_compiled_training_matches_eager_and_falls_back_without_a_compiler(tmp_path):
    """--compile (the tiny recipe's default) trains the weights --no-compile trains, up to float
    rounding, and the same ones every time (what an exact --resume needs); where compiling fails
    (here: no C++ compiler) one warning line says so and the run trains eagerly, to exactly the
    --no-compile weights."""
    data = write_codes(tmp_path / "codes", per_class=30)
    # Two threads and batch 64: with one thread, or at batch 8, even compiled kernels that are not
    # deterministic happen to repeat themselves.
    # fp32: in bf16 (the default on CPUs with bf16 instructions) fused kernels round differently from eager ones.
    common = ["--data", str(data), *FAST, "--batch-size", "64", "--max-steps", "3", "--save-every", "0",
              "--precision", "fp32"]
    two_threads = {"OMP_NUM_THREADS": "2"}
    runs = {"eager": ([], two_threads), "compiled": (["--compile"], two_threads),
            "compiled again": (["--compile"], two_threads),
            "no compiler": (["--compile"], {**two_threads, "CXX": str(tmp_path / "no-such-compiler")})}
    weights = {}
    for name, (flags, env) in runs.items():
        result = run_train(*common, *flags, "--out", str(tmp_path / f"{name}.pt"), env=env)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        warned = [line for line in result.stdout.splitlines() if line.startswith("warning: torch.compile failed")]
        assert len(warned) == (name == "no compiler"), f"{name}: {result.stdout}"
        assert ("torch.compile: " in result.stdout) == name.startswith("compiled"), f"{name}: {result.stdout}"
        weights[name] = load(tmp_path / f"{name}.pt")["model"]
    for key, value in weights["eager"].items():
        assert torch.equal(weights["no compiler"][key], value), f"the eager fallback differs at {key}"
        assert torch.equal(weights["compiled again"][key], weights["compiled"][key]), f"compiled runs differ at {key}"
        assert torch.allclose(weights["compiled"][key], value, rtol=0, atol=1e-4), \
            f"compiled training differs at {key}: {(weights['compiled'][key] - value).abs().max():.2e}"


@needs_cpp_compiler
def test_a_bad_code_file_met_while_compiling_is_not_taken_for_a_compiler_failure(tmp_path):
    """Only the first code file of each class is checked at start; one that the compiling step
    reads (here read by a DataLoader worker) ends the run with its own one-line error, not a
    'torch.compile failed' warning and a second try without compiling."""
    data = write_codes(tmp_path / "codes")
    for c in range(3):
        for i in range(1, 5):                                             # all but the checked first file
            np.save(data / str(c) / f"{i}.npy", np.full((2, LENGTH), VOCAB + 3, dtype=np.int64))
    result = run_train("--data", str(data), *FAST, "--compile", "--workers", "1", "--max-steps", "2",
                       "--out", str(tmp_path / "arpg.pt"))
    assert result.returncode == 2 and "torch.compile failed" not in result.stdout, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "outside the vocabulary" in result.stderr, \
        result.stderr
    assert not (tmp_path / "arpg.pt").exists(), "a checkpoint was written by a refused run"


def test_bf16_on_a_cpu_without_bf16_instructions_is_trained_with_a_warning(tmp_path, monkeypatch, capsys):
    """--precision bf16 where the CPU has no bf16 matrix instructions runs (emulated) in bf16 (the
    head's output), with one warning line that says it is slow and that fp32 is the default there."""
    monkeypatch.setattr(train, "cpu_has", lambda feature: False)          # as on an AVX2-only CPU
    dtypes, real_step = [], train.optimizer_step

    def step_recording_the_head_s_dtype(train_model, model, *args, **kwargs):
        hook = model.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        try:
            return real_step(train_model, model, *args, **kwargs)
        finally:
            hook.remove()
    monkeypatch.setattr(train, "optimizer_step", step_recording_the_head_s_dtype)
    data = write_codes(tmp_path / "codes")
    main(["--data", str(data), *FAST, "--precision", "bf16", "--max-steps", "1", "--out", str(tmp_path / "arpg.pt")])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: --precision bf16")]
    assert len(warnings) == 1 and "fp32, the default here" in warnings[0], warnings
    assert dtypes and set(dtypes) == {torch.bfloat16}, f"the step ran in {dtypes}, not bf16"


def test_a_resumed_run_must_keep_the_flags_that_define_it(tmp_path):
    """--resume without the run's --data (it would train on the built-in shapes instead), or with
    another --batch-size, --seed or --tokenizer, or without its --vocab-size, is refused in one line naming the
    flag, before any work, and
    the checkpoint is left as it was, as is a resume with no steps left to train; the same folder
    written another way is the same run."""
    data = write_codes(tmp_path / "codes")
    out = tmp_path / "arpg.pt"
    common = [*FAST, "--save-every", "0", "--out", str(out)]
    assert run_train("--data", str(data), *common, "--max-steps", "2").returncode == 0, "the first run failed"
    before = out.read_bytes()
    for flags, named in (([], "--data is None (was"),
                         (["--data", str(data), "--batch-size", "4"], "--batch-size is 4 (was 8)"),
                         (["--data", str(data), "--seed", "3"], "--seed is 3 (was 0)"),
                         (["--data", str(data), "--tokenizer", "vq.pt"], "--tokenizer is vq.pt (was None)")):
        with pytest.raises(ValueError, match=re.escape(named)):
            main([*common, *flags, "--max-steps", "4", "--resume"])
    assert common[:2] == ["--vocab-size", str(VOCAB)], f"expected FAST to start with --vocab-size, got {common[:2]}"
    with pytest.raises(ValueError, match=re.escape(f"--vocab-size is None (was {VOCAB})")):
        main([*common[2:], "--data", str(data), "--max-steps", "4", "--resume"])
    # A finished run, resumed to its own step count (the one it saved, or an explicit one) or fewer:
    # nothing to train, refused rather than rewritten.
    for max_steps in ([], ["--max-steps", "2"], ["--max-steps", "1"]):
        with pytest.raises(ValueError, match="is already trained for 2 steps, .* raise --max-steps above 2"):
            main([*common, "--data", str(data), *max_steps, "--resume"])
    assert out.read_bytes() == before, "a refused resume changed the checkpoint"
    main([*common, "--data", str(data / ".." / "codes"), "--max-steps", "4", "--resume"])
    assert load(out)["step"] == 4, "the resumed run should end at step 4"


def test_a_checkpoint_from_before_muon_resumes_with_adamw_alone(tmp_path):
    """Checkpoints written before Muon hold one AdamW state dict, not a list: --resume --muon-lr 0
    continues them, with their AdamW state: the same weights and optimizer state as a run never stopped."""
    data = write_codes(tmp_path / "codes")
    common = ["--data", str(data), *FAST, "--muon-lr", "0", "--save-every", "0"]
    out = ["--out", str(tmp_path / "arpg.pt")]
    assert run_train(*common, *out, "--max-steps", "2").returncode == 0, "the first 2-step run failed"
    checkpoint = load(tmp_path / "arpg.pt")
    (checkpoint["optimizer"],) = checkpoint["optimizer"]                  # the old layout: one dict
    torch.save(checkpoint, tmp_path / "arpg.pt")
    resumed = run_train(*common, *out, "--max-steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert load(tmp_path / "arpg.pt")["step"] == 4, "the resumed run should end at step 4"
    straight = run_train(*common, "--out", str(tmp_path / "straight.pt"), "--max-steps", "4")
    assert straight.returncode == 0, straight.stderr
    for key in ("model", "optimizer"):
        assert_same_tensors(load(tmp_path / "straight.pt")[key], load(tmp_path / "arpg.pt")[key], key)


def torchrun(script, *args, env, timeout=180):
    """Run a wrapper of train.py (`script`: it patches train, then calls train.main) in 2 processes."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**env, "PYTHONPATH": str(REPO)})


RECORDS_ITS_BATCHES = """
import json, os, sys
import train

class RecordedSampler(train.StepSampler):  # writes each micro-batch it hands this process to a file
    def __iter__(self):
        with open(os.path.join(os.environ["BATCH_LOG"], "rank" + os.environ["RANK"] + ".jsonl"), "a") as log:
            for batch in super().__iter__():
                log.write(json.dumps(batch) + "\\n")
                log.flush()
                yield batch

train.StepSampler = RecordedSampler
train.main(sys.argv[1:])
"""


def test_torchrun_two_processes_share_each_batch_and_keep_identical_weights(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) trains, with 2 accumulation steps (DDP's all-reduce
    on the second micro-batch only): the two processes read disjoint halves that make up each
    step's global batch (the micro-batches they were handed, recorded), end with identical
    weights, and one writes the checkpoint."""
    script, batch_log = tmp_path / "train_recording_batches.py", tmp_path / "batches"
    script.write_text(RECORDS_ITS_BATCHES)
    batch_log.mkdir()
    data = write_codes(tmp_path / "codes")                                # 3 classes x 5 images
    result = torchrun(script, "--data", str(data), *FAST, "--grad-accum", "2", "--max-steps", "4", "--out",
                      str(tmp_path / "arpg.pt"), env={**os.environ, "BATCH_LOG": str(batch_log)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on all 2 processes" in result.stdout, result.stdout
    assert result.stdout.count("no --tokenizer: no sample grids") == 1, "rank 0 alone says it draws no grids"
    assert load(tmp_path / "arpg.pt")["step"] == 4, "rank 0 saved the final step"
    handed = [[json.loads(line) for line in open(batch_log / f"rank{rank}.jsonl")] for rank in range(2)]
    whole = iter(StepSampler(15, 8, seed=0, start_step=0))               # the global batches, one process
    for step in range(4):  # rank r's micro-batches 2 step and 2 step + 1 are its half of the global batch
        halves = [handed[rank][2 * step] + handed[rank][2 * step + 1] for rank in range(2)]
        assert len(halves[0]) == len(halves[1]) == 4, f"step {step}: halves of {[len(h) for h in halves]} items"
        assert halves[0] + halves[1] == [list(item) for item in next(whole)], \
            f"step {step}: the processes' halves do not make up the global batch: {halves}"


FAILS_TO_COMPILE_ON_RANK_1 = """
import os, sys
import torch
import train

class FailsOnFirstCall:  # what torch.compile returns where the compiler stack breaks at the first step
    def __init__(self, module):
        self.module = module
    def __getattr__(self, name):
        return getattr(self.module, name)
    def __call__(self, *args, **kwargs):
        raise RuntimeError("no C++ compiler (faked on this process)")

torch.compile = lambda module: FailsOnFirstCall(module) if os.environ["RANK"] == "1" else module
train.main(sys.argv[1:])
"""


def test_torchrun_processes_agree_to_train_eagerly_when_one_fails_to_compile(tmp_path):
    """Under torchrun, a compile that fails on one process only (faked: process 1's fails at its
    first call, process 0's "compiled" model is the model itself) leaves every process eager,
    rather than hanging in a collective that the failed one skipped (the code before this test
    hung until its timeout): the run ends, with identical weights and two warnings."""
    script = tmp_path / "train_failing_compile.py"
    script.write_text(FAILS_TO_COMPILE_ON_RANK_1)
    data = write_codes(tmp_path / "codes")
    flags = [flag for flag in FAST if flag != "--no-compile"]
    result = torchrun(script, "--data", str(data), *flags, "--compile", "--max-steps", "3", "--out",
                      str(tmp_path / "arpg.pt"), env=ONE_THREAD, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.compile failed on process 1 (RuntimeError: no C++ compiler" in result.stdout, result.stdout
    assert "torch.compile failed on another process" in result.stdout, result.stdout
    assert "weights identical on all 2 processes" in result.stdout, result.stdout
    assert load(tmp_path / "arpg.pt")["step"] == 3, f"expected 3 steps, got {load(tmp_path / 'arpg.pt')['step']}"


@pytest.mark.parametrize("other_rank_differs", [False, True])
def test_check_ranks_agree_compares_every_rank_s_weights(monkeypatch, other_rank_differs):
    """The check behind "weights identical on all N processes": each rank's per-tensor sums are
    gathered, and a second rank whose weights differ in one parameter is caught (dist stubbed as
    two ranks, the second's fingerprint computed from its own copy of the model)."""
    model = ARPG(replace(ARPG_PRESETS["tiny"], n_layer=2, pass1_layers=1))
    other = copy.deepcopy(model)
    if other_rank_differs:
        with torch.no_grad():
            other.head.weight[0, 0] += 1e-3

    def all_gather(gathered, fingerprint):
        gathered[0].copy_(fingerprint)
        gathered[1].copy_(torch.stack([p.detach().double().sum() for p in other.parameters()]))
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(train.dist, "all_gather", all_gather)
    if other_rank_differs:
        with pytest.raises(RuntimeError, match="went out of sync"):
            train.check_ranks_agree(model, torch.device("cpu"))
    else:
        train.check_ranks_agree(model, torch.device("cpu"))


def test_sigterm_to_torchrun_saves_the_run(tmp_path):
    """torchrun passes a SIGTERM on to each rank's process group, DataLoader workers included: the
    ranks stop at the same step, agree on the weights, and rank 0 saves. (torchrun itself then
    exits 1 with a traceback of its own, which is not ours to change.)"""
    data = write_codes(tmp_path / "codes")
    out = tmp_path / "arpg.pt"
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "train.py", "--data", str(data), *FAST, "--workers", "1", "--max-steps", "2000",
                                "--save-every", "0", "--out", str(out)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, env=ONE_THREAD)
    for line in process.stdout:
        if line.startswith("step 3/"):
            os.kill(process.pid, signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert "weights identical on all 2 processes" in stdout and "stopped at step" in stdout, stdout + stderr[-2000:]
    assert 3 <= load(out)["step"] < 2000, "the stopped run did not save its step"


# --- data ---

@pytest.mark.parametrize("llamagen_layout", [False, True])
def test_code_folders_load_in_both_layouts(tmp_path, llamagen_layout):
    """(n_aug, L) and (1, n_aug, L) files load as (L,) codes; `draw` picks the augmentation;
    class folders named by number sort numerically (folder 10 is class 10); a hidden folder (a
    notebook's checkpoints) is not a class, nor a hidden file data (macOS's ._0.npy)."""
    data = write_codes(tmp_path, n_classes=11, per_class=2, n_aug=3, llamagen_layout=llamagen_layout)
    write_codes(tmp_path / ".ipynb_checkpoints", n_classes=1, per_class=1)
    for c in range(11):
        (data / str(c) / "._0.npy").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    dataset = build_dataset(parse_args(["--data", str(data), "--vocab-size", str(VOCAB)]), None,
                            ARPG_PRESETS["tiny"], "cpu")
    assert len(dataset) == 22 and dataset.length == LENGTH, "22 grids of 16 tokens"
    assert dataset.class_names[10] == "10" and dataset.labels[20] == 10, "numeric class order"
    stored = np.load(data / "10" / "0.npy").reshape(3, LENGTH)
    for draw in range(3):
        codes, label = dataset[(20, draw)]
        assert codes.dtype == torch.int64 and codes.shape == (LENGTH,), "codes (L,) int64"
        assert torch.equal(codes, torch.from_numpy(stored[draw])) and label == 10, f"augmentation {draw}"


def test_image_folders_are_tokenized_with_their_mirror_images(tmp_path):
    """An image folder {class}/{image}.png becomes codes (2, L) per image, the tokenizer's codes of
    the image and of its mirror image, labelled by sorted folder name; tokenizer.py --tokenize
    gives the same codes and labels, and keeps the names in class_names.json."""
    torch.manual_seed(0)
    vq = VQModel(VQ_PRESETS["small"]).eval()
    images, _ = make_builtin_dataset(4, seed=5)  # uint8 (4, 64, 64, 3)
    for i, name in enumerate(["b_cat", "b_cat", "a_dog", "a_dog"]):
        os.makedirs(tmp_path / name, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / name / f"{i}.png")
    dataset = build_dataset(parse_args(["--data", str(tmp_path), "--workers", "0"]), vq, ARPG_PRESETS["tiny"], "cpu")
    assert dataset.class_names == ["a_dog", "b_cat"] and list(dataset.labels) == [0, 0, 1, 1], "sorted class folders"
    expected = vq.encode(images_to_tensor(images[2:3])).flatten(1)[0]   # a_dog/2.png, first in order
    mirrored = vq.encode(images_to_tensor(images[2:3, :, ::-1].copy())).flatten(1)[0]
    assert torch.equal(dataset[(0, 0)][0], expected), "augmentation 0 is the image's codes"
    assert torch.equal(dataset[(0, 1)][0], mirrored), "augmentation 1 is the mirror image's codes"

    # Pre-tokenized (tokenizer.py --tokenize), the same folder gives the same codes, labels and names.
    tokenize_folder(vq, tmp_path, tmp_path.parent / "codes", image_size=64)  # paths as pathlib.Path too
    codes = build_dataset(parse_args(["--data", str(tmp_path.parent / "codes")]), None, ARPG_PRESETS["tiny"], "cpu")
    assert codes.class_names == ["a_dog", "b_cat"] and list(codes.labels) == [0, 0, 1, 1], codes.class_names
    assert all(torch.equal(codes[(i, d)][0], dataset[(i, d)][0]) for i in range(4) for d in range(2)), \
        "the saved codes differ from the in-memory dataset's"
    (tmp_path.parent / "codes" / "class_names.json").write_text('["a_dog"]')
    with pytest.raises(ValueError, match="class_names.json should list the names of the 2 class folders beside it"):
        build_dataset(parse_args(["--data", str(tmp_path.parent / "codes")]), None, ARPG_PRESETS["tiny"], "cpu")
    (tmp_path.parent / "codes" / "class_names.json").write_text('["a_dog", ')
    with pytest.raises(ValueError, match="class_names.json is not valid JSON .*; fix or remove it"):
        build_dataset(parse_args(["--data", str(tmp_path.parent / "codes")]), None, ARPG_PRESETS["tiny"], "cpu")


def test_data_order_is_a_pure_function_of_the_step():
    """A sampler started at step s yields exactly what one started at 0 yields from s on; ranks
    split each global batch without overlap; every epoch visits every image once."""
    def batches(start, n, rank=0, world=1, accum=1):
        iterator = iter(StepSampler(10, 8, seed=3, start_step=start, rank=rank, world_size=world, accum=accum))
        return [next(iterator) for _ in range(n)]

    assert batches(0, 6)[2:] == batches(2, 4), "resuming at step 2 replays the same batches"
    full = batches(0, 5)
    ranks = [batches(0, 5 * 2, rank=r, world=2, accum=2) for r in range(2)]
    for step in range(5):  # rank r, micro-batches 2 step and 2 step + 1 = its half of the global batch
        pieces = [item for r in range(2) for item in ranks[r][2 * step] + ranks[r][2 * step + 1]]
        assert pieces == full[step], f"step {step}: the ranks' micro-batches do not make up the global batch"
    indices = [index for batch in full for index, _ in batch]  # 40 samples = 4 epochs of 10
    for epoch in range(4):
        assert sorted(indices[10 * epoch:10 * epoch + 10]) == list(range(10)), f"epoch {epoch} is not a permutation"


class GradientRecorder:
    """An optimizer that keeps the gradients it is asked to step with (optimizer_step's spy)."""
    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = torch.cat([p.grad.flatten() for p in self.model.parameters()])

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def recorded_step(model, batches, **settings):
    """The gradient one train.optimizer_step applies to `model`, fed `batches` as its micro-batches
    (raster order, so that no random order differs between runs); settings: grad_accum, grad_clip
    and precision."""
    args = SimpleNamespace(**{"grad_accum": len(batches), "grad_clip": 0.0, "precision": "fp32", **settings})
    recorder = GradientRecorder(model)
    raster = lambda tokens, labels: model(tokens, labels, order=torch.arange(LENGTH).expand(len(tokens), LENGTH))
    train.optimizer_step(raster, model, [recorder], iter(batches), args, torch.device("cpu"))
    return recorder.grads


def test_an_optimizer_step_accumulates_micro_batches_clips_and_runs_in_its_precision():
    """optimizer_step: 2 micro-batches of 4 give the gradient of one batch of 8 (each micro-batch's
    loss divided by --grad-accum); --grad-clip bounds the gradient's norm; bf16 autocast runs the
    forward in bf16 (the head's output), fp32 in fp32."""
    torch.manual_seed(0)
    no_dropout = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
    model = ARPG(replace(ARPG_PRESETS["tiny"], n_layer=3, vocab_size=VOCAB, num_classes=3, block_size=LENGTH,
                         **no_dropout))
    tokens, labels = torch.randint(0, VOCAB, (8, LENGTH)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    whole = recorded_step(model, [(tokens, labels)])
    halves = recorded_step(model, [(tokens[:4], labels[:4]), (tokens[4:], labels[4:])])
    torch.testing.assert_close(halves, whole, msg="two micro-batches should give the whole batch's gradient")
    assert whole.norm() > 0.01, "the test needs a gradient larger than the clip below"
    clipped = recorded_step(model, [(tokens, labels)], grad_clip=0.01)
    assert math.isclose(clipped.norm(), 0.01, rel_tol=1e-4), f"clipped to norm {clipped.norm():.5f}, not 0.01"
    dtypes = []
    model.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    for precision in ("bf16", "fp32"):
        recorded_step(model, [(tokens, labels)], precision=precision)
    assert dtypes == [torch.bfloat16, torch.float32], f"the head's output ran in {dtypes}"


def test_ema_moves_by_its_warm_up_decay_then_by_its_own():
    """update_ema: ema <- d * ema + (1 - d) * weights, with d = min(decay, (1 + step) / (10 + step)):
    0.1 at step 0 (mostly the new weights), the given decay once the warm-up has caught up."""
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for step, d in ((0, 0.1), (10 ** 6, 0.99)):
        expected = [d * e + (1 - d) * w for e, w in zip(ema.parameters(), model.parameters())]
        update_ema(ema, model, 0.99, step)
        for got, want in zip(ema.parameters(), expected):
            torch.testing.assert_close(got.detach(), want.detach(), msg=f"step {step}: decay {d}")


def test_learning_rate_warms_up_then_decays_by_cosine_or_after_holding_the_peak():
    """Both schedules climb linearly to the peak over the warm-up. Cosine (the paper's) then falls
    at every step; the tiny recipe's holds the peak until the last decay_steps, then falls by
    equal amounts to the minimum."""
    peak, minimum = 1.0, 0.1
    cosine = [learning_rate(s, 100, peak, minimum, warmup_steps=10) for s in range(101)]
    held = [learning_rate(s, 100, peak, minimum, warmup_steps=10, decay_steps=30) for s in range(101)]
    ramp = [(s + 1) / 10 for s in range(10)]
    assert cosine[:10] == ramp and held[:10] == ramp, "both schedules warm up linearly"
    assert all(a > b for a, b in zip(cosine[10:], cosine[11:])) and math.isclose(cosine[100], minimum), cosine
    halfway, a_third = (peak + minimum) / 2, minimum + (peak - minimum) * (1 + math.cos(math.pi / 3)) / 2
    assert cosine[10] == peak and math.isclose(cosine[55], halfway) and math.isclose(cosine[40], a_third), \
        "the cosine starts at the peak, is halfway down halfway through the decay, and 1/4 down at a third"
    assert held[10:71] == [peak] * 61, "the held schedule stays at its peak"
    drops = [a - b for a, b in zip(held[70:], held[71:])]
    assert all(math.isclose(d, (peak - minimum) / 30) for d in drops) and math.isclose(held[100], minimum), held


@pytest.mark.parametrize("batch, peak, floor", [(1024, 4e-4, 1e-5), (16, 6.25e-6, 1.5625e-7)])
def test_the_paper_recipe_scales_its_peak_and_floor_with_the_global_batch(batch, peak, floor):
    """SPEC 5: lr 1e-4 per 256 images (ARPG-L's batch of 1024: 4e-4), cosine down to 1e-5 at that
    batch. A smaller batch scales both, so the floor stays under the peak and the decay falls."""
    args = parse_args(["--size", "L", "--batch-size", str(batch)])
    fill_in_defaults(args, world_size=1)
    assert math.isclose(args.lr, peak) and math.isclose(args.min_lr, floor), (args.lr, args.min_lr)


def test_muon_takes_the_matrices_of_the_two_passes_and_adamw_everything_else():
    """muon_lr > 0: Muon holds exactly the 2-dim weights inside model.layers; AdamW the embeddings,
    head, query positions and norms. muon_lr = 0 (the paper's recipe): AdamW holds every weight,
    with weight decay 0.05 on the matrices and embeddings and none on the norms' gains (SPEC 5)."""
    model = ARPG(ARPG_PRESETS["tiny"])
    adamw, muon = make_optimizers(model, 3e-3, 0.05, torch.device("cpu"), muon_lr=0.02)
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    expected = {id(p) for name, p in model.named_parameters() if name.startswith("layers.") and p.dim() == 2}
    assert in_muon == expected and in_adamw == {id(p) for p in model.parameters()} - expected, "wrong split"
    assert {id(model.embeddings.weight), id(model.head.weight)} <= in_adamw, "embeddings and head belong to AdamW"
    (alone,) = make_optimizers(model, 3e-3, 0.05, torch.device("cpu"), muon_lr=0.0)
    assert sum(len(group["params"]) for group in alone.param_groups) == len(list(model.parameters())), \
        "AdamW alone holds every weight"
    names = {id(p): name for name, p in model.named_parameters()}
    decay = {names[id(p)]: group["weight_decay"] for group in alone.param_groups for p in group["params"]}
    assert {name for name, wd in decay.items() if wd == 0.05} == {n for n, p in model.named_parameters()
                                                                  if p.dim() >= 2}, "decayed: the >= 2-dim tensors"
    assert {name for name, wd in decay.items() if wd == 0.0} == {n for n, p in model.named_parameters()
                                                                 if p.dim() < 2}, "not decayed: the rest"
    assert any("norm" in name for name, wd in decay.items() if wd == 0.0), "the norms' gains are not decayed"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_optimizers_and_the_ema_make_no_tensor_on_the_cpu(precision, meta_arpg):
    """As the model's device test (tests/test_arpg.py): on the meta device, which like CUDA refuses
    CPU tensors (the meta_arpg fixture, tests/conftest.py), a step of AdamW and Muon
    (orthogonalizing in fp32 or bf16), with gradient clipping, and an EMA update run through."""
    model, tokens, labels = meta_arpg
    ema = copy.deepcopy(model)
    optimizers = make_optimizers(model, 3e-3, 0.05, torch.device("meta"), muon_lr=0.02, precision=precision)
    model(tokens, labels)[1].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for optimizer in optimizers:
        optimizer.step()
    update_ema(ema, model, 0.99, step=0)
    assert [type(optimizer).__name__ for optimizer in optimizers] == ["AdamW", "Muon"], \
        f"expected AdamW and Muon, got {[type(optimizer).__name__ for optimizer in optimizers]}"
    assert all(p.device.type == "meta" for p in [*model.parameters(), *ema.parameters()]), \
        "a model or EMA parameter left the meta device"


# --- bad input: one line, a non-zero exit, nothing written ---

def vocabulary_mismatch(tmp_path):
    """A checkpoint trained on 32 codes, resumed with a 128-code tokenizer."""
    data = write_codes(tmp_path / "codes")
    config = replace(ARPG_PRESETS["tiny"], vocab_size=VOCAB, num_classes=3, block_size=LENGTH)
    torch.save({"model": ARPG(config).state_dict(), "config": asdict(config), "step": 1, "optimizer": [], "args": {}},
               tmp_path / "arpg.pt")
    torch.save({"model": VQModel(VQ_PRESETS["small"]).state_dict(), "config": asdict(VQ_PRESETS["small"])},
               tmp_path / "tokenizer.pt")
    return ["--data", str(data), "--tokenizer", str(tmp_path / "tokenizer.pt"), "--resume"], "the model has 32 codes"


def resumed_with_another_optimizer(tmp_path):
    """A checkpoint trained by AdamW alone, resumed with the tiny recipe (Muon and AdamW)."""
    data = write_codes(tmp_path / "codes")
    config = replace(ARPG_PRESETS["tiny"], vocab_size=VOCAB, num_classes=3, block_size=LENGTH)
    model = ARPG(config)
    (adamw,) = make_optimizers(model, 3e-3, 0.05, torch.device("cpu"), muon_lr=0.0)
    torch.save({"model": model.state_dict(), "optimizer": [adamw.state_dict()], "config": asdict(config), "step": 1,
                "args": {}}, tmp_path / "arpg.pt")
    return ["--data", str(data), "--vocab-size", str(VOCAB), "--resume"], "resume it with the --muon-lr it started with"


def resumed_with_other_layers(tmp_path):
    """A 7-block checkpoint resumed with --layers 5."""
    data = write_codes(tmp_path / "codes")
    config = replace(ARPG_PRESETS["tiny"], vocab_size=VOCAB, num_classes=3, block_size=LENGTH)
    torch.save({"model": ARPG(config).state_dict(), "config": asdict(config), "step": 1, "optimizer": [], "args": {}},
               tmp_path / "arpg.pt")
    return ["--data", str(data), "--vocab-size", str(VOCAB), "--layers", "5", "--resume"], "has 7 blocks"


def resumed_from_a_tokenizer(tmp_path):
    """--resume pointed at a tokenizer checkpoint (it has a model, a config and a step, no optimizer)."""
    data = write_codes(tmp_path / "codes")
    torch.save({"model": VQModel(VQ_PRESETS["small"]).state_dict(), "config": asdict(VQ_PRESETS["small"]), "step": 9},
               tmp_path / "arpg.pt")
    return ["--data", str(data), "--vocab-size", str(VOCAB), "--resume"], "is not a checkpoint of train.py"


def resumed_from_another_version(tmp_path):
    """A checkpoint whose config names a setting this arpg.py does not have (a newer or older one)."""
    data = write_codes(tmp_path / "codes")
    config = replace(ARPG_PRESETS["tiny"], vocab_size=VOCAB, num_classes=3, block_size=LENGTH)
    torch.save({"model": ARPG(config).state_dict(), "config": {**asdict(config), "qk_norm": True}, "step": 1,
                "optimizer": [], "args": {}}, tmp_path / "arpg.pt")
    return ["--data", str(data), "--vocab-size", str(VOCAB), "--resume"], r"does not know \(qk_norm\)"


def codes_and_images_in_one_folder(tmp_path):
    data = write_codes(tmp_path / "codes")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "0" / "stray.png")
    return ["--data", str(data), "--vocab-size", str(VOCAB)], "holds both .npy code files and images"


def an_image_size_the_tokenizer_cannot_tile(tmp_path):
    os.makedirs(tmp_path / "images" / "cat")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "images" / "cat" / "0.png")
    torch.save({"model": VQModel(VQ_PRESETS["small"]).state_dict(), "config": asdict(VQ_PRESETS["small"])},
               tmp_path / "tokenizer.pt")
    return (["--data", str(tmp_path / "images"), "--tokenizer", str(tmp_path / "tokenizer.pt"), "--image-size", "12"],
            "--image-size must be a positive multiple of the tokenizer's downsampling factor 8, got 12")


def more_sample_steps_than_tokens(tmp_path):
    """Codes of the small tokenizer's 128-code vocabulary (16 tokens an image) and that tokenizer,
    whose grids cannot take 17 steps: refused before training, not at the first grid."""
    torch.save({"model": VQModel(VQ_PRESETS["small"]).state_dict(), "config": asdict(VQ_PRESETS["small"])},
               tmp_path / "tokenizer.pt")
    return (["--data", str(write_codes(tmp_path / "codes", high=VQ_PRESETS["small"].codebook_size)), "--tokenizer",
             str(tmp_path / "tokenizer.pt"), "--sample-steps", str(LENGTH + 1)],
            f"--sample-steps {LENGTH + 1} is more than the {LENGTH} tokens of an image")


def images_without_tokenizer(tmp_path):
    os.makedirs(tmp_path / "images" / "cat")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "images" / "cat" / "0.png")
    return tmp_path / "images"


def damaged_code_file(contents):
    """The first code file of class 0 replaced by an empty file, or by an array of no codes."""
    def case(tmp_path):
        data = write_codes(tmp_path / "codes")
        if contents is None:
            (data / "0" / "0.npy").write_bytes(b"")
        else:
            np.save(data / "0" / "0.npy", contents)
        message = ("cannot read .*0/0.npy as an .npy array" if contents is None else
                   "0/0.npy: expected integer codes of shape")
        return ["--data", str(data), "--vocab-size", str(VOCAB)], message
    return case


def empty_class_folder(tmp_path):
    data = write_codes(tmp_path / "codes")
    os.makedirs(data / "3")
    return ["--data", str(data), "--vocab-size", str(VOCAB)], "class folder.s. 3 in .* hold no .npy code files"


def resumed_without_its_tokenizer(tmp_path):
    """A run on the built-in shapes resumed after its tokenizer was deleted: refused, rather than a
    new tokenizer trained whose codes the model has never seen."""
    config = replace(ARPG_PRESETS["tiny"], vocab_size=128, num_classes=10)
    torch.save({"model": {}, "config": asdict(config), "step": 1, "optimizer": [], "args": {}}, tmp_path / "arpg.pt")
    return ["--tokenizer", str(tmp_path / "deleted.pt"), "--resume"], "the tokenizer .*deleted.pt that .* is missing"


def resumed_with_another_image_count(tmp_path):
    """A run on the built-in shapes resumed with another --num-images: other data, refused (only
    --data runs ignore the count an older train.py saved)."""
    config = replace(ARPG_PRESETS["tiny"], vocab_size=128, num_classes=10)
    torch.save({"model": {}, "config": asdict(config), "step": 1, "optimizer": [],
                "args": {"num_images": 20000, "max_steps": 4}}, tmp_path / "arpg.pt")
    return ["--num-images", "500", "--resume"], re.escape("--num-images is 500 (was 20000)")


def resumed_on_other_data(tmp_path):
    """A checkpoint of 4 classes on a 64-token grid, resumed on 3 classes of 16 tokens."""
    data = write_codes(tmp_path / "codes")
    config = replace(ARPG_PRESETS["tiny"], vocab_size=VOCAB, num_classes=4, block_size=64)
    torch.save({"model": ARPG(config).state_dict(), "config": asdict(config), "step": 1, "optimizer": [], "args": {}},
               tmp_path / "arpg.pt")
    return ["--data", str(data), "--vocab-size", str(VOCAB), "--resume"], \
        "classes: the model has 4, the data 3; tokens per image: the model has 64, the data 16"


def empty_folder(tmp_path):
    os.makedirs(tmp_path / "empty" / "cat")  # a class folder with nothing in it
    return ["--data", str(tmp_path / "empty")], "no training data"


BAD_INPUTS = {
    "missing folder": lambda tmp: (["--data", str(tmp / "nowhere")], "data folder not found"),
    "empty folder": empty_folder,
    "an empty class folder": empty_class_folder,
    "an empty .npy file": damaged_code_file(None),
    "an .npy file of no codes": damaged_code_file(np.zeros((0, LENGTH), dtype=np.int64)),
    "codes outside the vocabulary": lambda tmp: (["--data", str(write_codes(tmp / "codes", high=VOCAB + 5, seed=1)),
                                                  "--vocab-size", str(VOCAB)], "outside the vocabulary"),
    "tokenizer/model vocabulary mismatch": vocabulary_mismatch,
    "resumed with another optimizer": resumed_with_another_optimizer,
    "resumed with another depth": resumed_with_other_layers,
    "resumed from a tokenizer": resumed_from_a_tokenizer,
    "resumed from another version of the code": resumed_from_another_version,
    "codes and images in one folder": codes_and_images_in_one_folder,
    "an image size the tokenizer cannot tile": an_image_size_the_tokenizer_cannot_tile,
    "images without a tokenizer": lambda tmp: (["--data", str(images_without_tokenizer(tmp))],
                                                "holds images: pass the tokenizer .* python tokenizer.py --train"),
    "an image size for codes": lambda tmp: (["--data", str(write_codes(tmp / "codes")), "--vocab-size", str(VOCAB),
                                             "--image-size", "64"], "--image-size applies to .* holds codes"),
    "an image size for the built-in shapes": lambda tmp: (["--image-size", "32"], "the built-in shapes are 64 x 64"),
    "a vocabulary of no codes": lambda tmp: (["--vocab-size", "0"], "--vocab-size must be at least 1, got 0"),
    "fewer built-in images than classes": lambda tmp: (["--num-images", "5"], "--num-images 5 leaves classes of the "
                                                                          "built-in shapes without an image"),
    "a built-in image count with --data": lambda tmp: (
        ["--data", str(write_codes(tmp / "codes")), "--num-images", "500"],
        "--num-images sizes the built-in shapes dataset, and --data .* brings its own images"),
    "tokenizer steps with --data": lambda tmp: (
        ["--data", str(write_codes(tmp / "codes")), "--tokenizer-steps", "500"],
        "--tokenizer-steps trains the built-in shapes' tokenizer; for --data .* tokenizer.py --train"),
    "--out is a folder": lambda tmp: (["--out", str(tmp)], "is a folder; give a file name"),
    "--out is the tokenizer": lambda tmp: (["--tokenizer", str(tmp / "arpg.pt")],
                                           "--out .*arpg.pt is the tokenizer's file, which the ARPG checkpoint would "
                                           "overwrite"),
    "--data is a file": lambda tmp: (["--data", str(write_codes(tmp / "codes") / "0" / "0.npy")],
                                     "is a file; give the folder that holds one subfolder per class"),
    "an unknown device": lambda tmp: (["--device", "gpu0"], "--device gpu0: not a device name"),
    "no Pass-2 block": lambda tmp: (["--layers", "2"], r"--layers must be at least 3 for tiny \(2 for Pass 1"),
    "an odd depth for a half-and-half split": lambda tmp: (["--size", "L", "--layers", "5"],
                                                           "--layers 5: L splits its blocks half and half"),
    "warm-up and decay longer than the run": lambda tmp: (["--warmup", "0.5", "--decay", "0.6"], "add up to at most 1"),
    "top-p of the grids out of range": lambda tmp: (["--sample-top-p", "0"], r"--sample-top-p: top-p must be in \(0, 1\]"),
    "guidance of the grids not a number": lambda tmp: (["--sample-cfg", "nan"], "--sample-cfg must be a finite number"),
    "more sample steps than tokens": more_sample_steps_than_tokens,
    "resumed without its tokenizer": resumed_without_its_tokenizer,
    "resumed with another built-in image count": resumed_with_another_image_count,
    "resumed on data of other classes and grid": resumed_on_other_data,
    "nothing to resume": lambda tmp: (["--resume"], "nothing to resume: .*arpg.pt not found"),
    "a dropout of 1": lambda tmp: (["--data", str(write_codes(tmp / "codes")), "--vocab-size", str(VOCAB),
                                    "--dropout", "1"], r"--dropout 1.0 must be in \[0, 1\)"),
    # Refused before the tokenizer is trained (minutes), from what the small preset will be:
    "a vocabulary the tokenizer to train lacks": lambda tmp: (
        ["--tokenizer", str(tmp / "new.pt"), "--vocab-size", "64"],
        r"--vocab-size 64 does not match the small tokenizer to be trained at .*new.pt \(128 codes\)"),
    "more sample steps than the tokenizer to train gives": lambda tmp: (
        ["--tokenizer", str(tmp / "new.pt"), "--sample-steps", "65"], "--sample-steps 65 is more than the 64 tokens"),
    "a floor that is not a number": lambda tmp: (["--min-lr", "nan"], "--min-lr must be a finite number, got nan"),
    "an endless time budget": lambda tmp: (["--total-minutes", "inf"], "--total-minutes must be a finite number"),
    "a negative seed": lambda tmp: (["--seed", "-1"], "--seed must be at least 0, got -1"),
    "a seed beyond 64 bits": lambda tmp: (["--seed", str(2 ** 64)], "--seed must fit in 64 bits, got 18446744073709551616"),
    "a learning rate of 0": lambda tmp: (["--lr", "0"], "--lr must be positive, got 0.0"),
    "an empty batch": lambda tmp: (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    "a negative time budget": lambda tmp: (["--total-minutes", "-1"], "--total-minutes must be at least 0"),
    "an EMA that never moves": lambda tmp: (["--ema", "1"], r"must be in \[0, 1\)"),
    "a floor above the peak": lambda tmp: (["--lr", "1e-3", "--min-lr", "2e-3"], "--min-lr 0.002 is above the peak"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_anything_is_written(tmp_path, case):
    """Each bad input raises ValueError / FileNotFoundError naming the problem (the command line
    prints it as one 'error:' line, next test) and writes nothing: no checkpoint, no tokenizer,
    no samples, and the files already there (a checkpoint to resume) are left as they were."""
    args, message = BAD_INPUTS[case](tmp_path)
    out = tmp_path / "arpg.pt"
    before = {path: path.read_bytes() if path.is_file() else None for path in tmp_path.rglob("*")}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main(["--out", str(out), "--device", "cpu", *args, "--max-steps", "2"])
    after = {path: path.read_bytes() if path.is_file() else None for path in tmp_path.rglob("*")}
    assert after == before, f"{case}: files written or changed: {sorted(set(after.items()) ^ set(before.items()))}"


def test_a_checkpoint_that_does_not_say_its_step_count_resumes_only_with_max_steps(tmp_path):
    """A checkpoint of an older train.py, whose args lack max_steps, is refused in one line asking
    for --max-steps (not a KeyError after the data is read), and resumes once it is given."""
    data = write_codes(tmp_path / "codes")
    out = tmp_path / "arpg.pt"
    assert run_train("--data", str(data), *FAST, "--max-steps", "2", "--out", str(out)).returncode == 0, \
        "the first 2-step run failed"
    checkpoint = load(out)
    del checkpoint["args"]["max_steps"]
    torch.save(checkpoint, out)
    with pytest.raises(ValueError, match="does not say how many steps its run planned"):
        main(["--data", str(data), *FAST, "--out", str(out), "--resume"])
    main(["--data", str(data), *FAST, "--out", str(out), "--resume", "--max-steps", "3"])
    assert load(out)["step"] == 3, "the resumed run should end at the --max-steps given"


def test_a_data_run_of_an_older_train_py_resumes_with_its_saved_image_count(tmp_path):
    """An older train.py saved --num-images' default, 20000, for --data runs too, where it means
    nothing; such a run resumes (a run on the built-in shapes must keep its count: BAD_INPUTS)."""
    data = write_codes(tmp_path / "codes")
    out = tmp_path / "arpg.pt"
    main(["--data", str(data), *FAST, "--max-steps", "2", "--out", str(out)])
    checkpoint = load(out)
    assert checkpoint["args"]["num_images"] is None, "--data has no built-in image count"
    checkpoint["args"]["num_images"] = 20000
    torch.save(checkpoint, out)
    main(["--data", str(data), *FAST, "--out", str(out), "--resume", "--max-steps", "3"])
    assert load(out)["step"] == 3, "the resumed run should end at the --max-steps given"


def test_the_grids_sampling_flags_are_saved_as_sample_py_s_defaults(tmp_path):
    """--sample-cfg, --sample-cfg-schedule, --sample-schedule and --sample-top-p travel with the
    checkpoint (sample.py reads them), not the recipe's defaults."""
    out = tmp_path / "arpg.pt"
    main(["--data", str(write_codes(tmp_path / "codes")), *FAST, "--max-steps", "1", "--out", str(out),
          "--sample-cfg", "3", "--sample-cfg-schedule", "linear", "--sample-schedule", "arccos", "--sample-top-p", "0.9"])
    assert load(out)["sampling"] == {"cfg_scale": 3.0, "cfg_schedule": "linear", "schedule": "arccos", "top_p": 0.9}, \
        f"saved sampling settings: {load(out)['sampling']}"


def test_command_line_error_is_one_line_and_exit_code_2(tmp_path):
    """From the shell, bad input is one 'error: ...' line on stderr and exit code 2."""
    result = run_train("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "arpg.pt"))
    assert result.returncode == 2, f"exit code {result.returncode}\n{result.stderr}"
    assert result.stderr == f"error: data folder not found: {tmp_path / 'nowhere'}\n", repr(result.stderr)
    assert not any(tmp_path.iterdir()), "nothing may be written"


def test_global_batch_must_split_over_processes(tmp_path, monkeypatch):
    """A global batch that the processes (x accumulation steps) cannot share evenly is refused
    before any process group or file exists."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)  # what torchrun --nproc_per_node 2 sets
    with pytest.raises(ValueError, match="does not split evenly over 2 processes"):
        main(["--batch-size", "6", "--grad-accum", "2", "--out", str(tmp_path / "arpg.pt")])
    assert not any(tmp_path.iterdir()), "nothing may be written"
