"""The benchmark scripts run end to end on generated data and print their tables (nothing is timed here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_gpu_train_benchmark_runs_its_comparison_on_the_cpu():
    """What runs on a lent GPU, checked here with --device cpu: cache built first, one row per precision."""
    out = run_script("gpu_train.py", "--device", "cpu", "--epochs", "1", "--batch-size", "64")
    assert "decoded cache built first" in out
    rows = table_rows(out)
    assert [r[0].split()[0] for r in rows] == ["amp", "fp32"]
    for row in rows:
        assert float(row[1]) > 0 and row[2] == "n/a" and 0 <= float(row[4]) <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_train_benchmark_refuses_cuda_without_a_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_train.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no CUDA device" in done.stderr


def test_train_throughput_benchmark_compares_cache_with_decoding(synth_root):
    out = run_script("train_throughput.py", str(synth_root), "--images", "64", "--epochs", "1", "--workers", "0")
    rows = table_rows(out)
    assert [r[0].split()[0] for r in rows] == ["decode", "decoded"]
    assert all(float(r[1]) > 0 for r in rows)
    assert "cache build (decode once)" in out
    assert "after one untimed warm-up epoch" in out  # neither pipeline pays torch's first-call costs in its rate
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), str(synth_root),
                              "--epochs", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--epochs: 0: expected a whole number of 1 or more" in refused.stderr
