"""bench.py end to end on a small setting (the table it writes), and its refusal of bad input."""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from arpg import ARPG, ARPG_PRESETS

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args, env=None):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def test_bench_writes_a_row_per_sampler_and_step_count(tmp_path):
    """bench.py's table has one row per sampler and step count, the samplers side by side at each step
    count, raster rows last, all with a speed; then the training throughput of the tiny recipe
    (forward, backward and its two optimizers' steps) at the first batch size, a positive speed."""
    out = tmp_path / "bench.md"
    result = run_bench("--batch", "2", "--steps", "2", "4", "--tokens", "16", "--repeats", "1", "--no-onnx",
                       "--out", str(out))
    assert result.returncode == 0, result.stderr
    training = re.findall(r"^Training \((?:.*, )?AdamW and Muon\): batch 2, (\S+) img/s(?:, peak .*)?\.$",
                          out.read_text(), re.MULTILINE)
    assert len(training) == 1 and float(training[0]) > 0, f"no training line with a speed:\n{out.read_text()}"
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "img/s" not in line]
    # readable and fast at 2 and 4 steps, then both in raster order (one token per step: 16 steps)
    assert [(row[0].lstrip("| "), row[2]) for row in rows] == [
        ("readable", "2"), ("fast", "2"), ("readable", "4"), ("fast", "4"),
        ("readable, raster", "16"), ("fast, raster", "16")], rows
    assert all(float(row[3]) > 0 for row in rows), rows                # images per second
    memory = [row[4].rstrip(" |") for row in rows]                       # "n/a" on a CPU, "1.23 GB" on a GPU
    assert all(peak == "n/a" or peak.endswith(" GB") for peak in memory), memory
    assert "nan" not in result.stdout, result.stdout


def test_bench_profile_names_the_operations_and_the_peak_memory_of_a_call(tmp_path):
    """--profile prints the operations of one fast call by time and, on a CPU, the call's peak
    memory: the weights, plus at least the preallocated caches it held (class token and 15 of the
    16 tokens: the last step's token is never fed back) for 2 images doubled by guidance."""
    result = run_bench("--profile", "--batch", "2", "--steps", "16", "--tokens", "16", "--out", str(tmp_path / "b.md"))
    assert result.returncode == 0, result.stderr
    assert "aten::mm" in result.stdout and "Self CPU time total" in result.stdout, result.stdout
    weights, call = map(float, re.search(r"peak memory of the call: \S+ MB \(weights (\S+) MB, the call's own "
                                         r"tensors (\S+) MB at most", result.stdout).groups())
    config = ARPG_PRESETS["tiny"]
    caches = (config.pass1_layers + 1) * 2 * (2 * 2) * config.dim * (1 + 15) * 4        # k|v, rows, C, positions, fp32
    assert abs(weights - sum(p.numel() for p in ARPG(replace(config, block_size=16)).parameters()) * 4 / 1e6) < 0.1, \
        f"weights of {weights} MB are not the tiny model's fp32 parameters"
    assert call >= caches / 1e6, result.stdout


def test_bench_removes_its_onnx_export_folder(tmp_path):
    """The ONNX sampler runs from an export in a temporary folder, which is gone when bench.py ends."""
    temp = tmp_path / "temp"
    temp.mkdir()
    result = run_bench("--batch", "2", "--steps", "2", "--tokens", "16", "--repeats", "1", "--no-train",
                       "--out", str(tmp_path / "bench.md"), env={**os.environ, "TMPDIR": str(temp)})
    assert result.returncode == 0, result.stderr
    assert "| onnx runtime | 2 | 2 |" in (tmp_path / "bench.md").read_text(), "no ONNX Runtime row"
    left = [p.name for p in temp.iterdir() if p.name.startswith("arpg-bench-onnx-")]
    assert not left, f"bench.py left {left} behind"


def test_bench_without_onnxruntime_says_what_to_do_in_one_line():
    """Without onnxruntime, the ONNX Runtime rows (on by default) end in one line that names the
    package and --no-onnx, not in an ImportError's traceback."""
    blocked = ("import runpy, sys; sys.modules['onnxruntime'] = None; "    # None in sys.modules: ImportError
               "sys.argv = ['bench.py', '--tokens', '16', '--steps', '2']; "
               "runpy.run_path('bench.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("error: the ONNX Runtime rows need onnxruntime (pip install -r requirements.txt), or "
                             "pass --no-onnx\n"), result.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "100"], "--steps must be between 1 and the 64 tokens"),
    (["--tokens", "50"], "--tokens must be a square number"),
    (["--device", "gpu0"], "--device gpu0: not a device name"),
    (["--out", "/"], "--out / is a folder; give a file name in it"),
    (["--tokens", "0"], "--tokens must be a square number of at least 16"),
    (["--tokens", "9"], "--tokens must be a square number of at least 16 (the tokens of an n x n grid; the ONNX"),
    (["--cfg", "nan"], "--cfg must be a finite number, got nan"),
    (["--batch", "0"], "--batch and --repeats must be at least 1"),
])
def test_bench_refuses_bad_input_in_one_line(args, message):
    """Bad arguments exit with status 2 and one line saying what was wrong."""
    result = run_bench(*args, "--no-onnx", "--no-train")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_bench_interrupted_says_so_in_one_line_and_keeps_its_rows(tmp_path):
    """SIGTERM (what a time limit sends; Ctrl-C takes the same way out) during the timing: exit code
    130, the one line "interrupted" instead of a traceback, and --out holds the whole table of the
    rows measured so far. (Not SIGINT here: a test run started in the background from a script
    ignores it, and so would bench.py.)"""
    out = tmp_path / "bench.md"
    bench = subprocess.Popen([sys.executable, "bench.py", "--batch", "2", "--steps", "2", "4", "--tokens", "16",
                              "--repeats", "200", "--no-onnx", "--no-train", "--out", str(out)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not out.exists() and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)                                             # until the 2-step rows are written
        assert bench.poll() is None, "bench.py ended before it could be interrupted"
        bench.send_signal(signal.SIGTERM)                                # while it times the 4-step rows
        _, stderr = bench.communicate(timeout=120)
    finally:
        bench.kill()
    assert bench.returncode == 130 and stderr == "interrupted\n", (bench.returncode, stderr)
    rows = [line.split(" | ")[:3] for line in out.read_text().splitlines() if line.startswith("| ") and "img/s" not in line]
    assert rows == [["| readable", "2", "2"], ["| fast", "2", "2"]], out.read_text()
