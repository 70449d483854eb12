"""The benchmark scripts run end to end on generated data and print their tables (nothing is timed here)."""

from __future__ import annotations

import json
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


def _refused(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_benchmarks_refuse_counts_below_one_before_any_work(synth_root, tmp_path):
    for name, args, message in (
            ("leakage.py", [str(synth_root), "--epochs", "0"], "--epochs: 0: expected a whole number of 1 or more"),
            ("leakage.py", [str(synth_root), "--thresholds", "300"], "--thresholds 300: expected bits between 0 and 256"),
            ("serving.py", ["--model", str(tmp_path / "m.pt"), "--requests", "0"], "--requests: 0: expected a whole"),
            ("serving.py", ["--model", str(tmp_path / "m.pt"), "--concurrency", "8", "0"], "--concurrency: 0: expected")):
        done = _refused(name, *args)
        assert done.returncode == 2 and message in done.stderr, (name, args, done.stderr[-2000:])


def test_ood_rates_skips_an_image_the_service_would_refuse_and_names_it(synth_root, tmp_path):
    folder = tmp_path / "mri"
    folder.mkdir()
    good = sorted((synth_root / "Testing" / "glioma").iterdir())[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    done = _refused("ood_rates.py", "--mri", str(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped (the service answers 400): {folder / 'empty.jpg'}: cannot use this image: empty file" in done.stderr
    assert "real MRI" in done.stdout and "of 1 flagged" in done.stdout and "(1 unreadable skipped)" in done.stdout


@pytest.mark.slow  # starts a BentoML service and the FastAPI baseline (~1 min)
def test_serving_benchmark_never_writes_the_callers_prediction_log(trained_run, tmp_path):
    import os

    users_log = tmp_path / "users_predictions.sqlite"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--model", str(trained_run.model_path),
                           "--distinct", "4", "--requests", "10", "--concurrency", "1", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BTC_PREDICTION_LOG": str(users_log)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BentoML service" in done.stdout and "FastAPI baseline" in done.stdout
    assert not users_log.exists()


def test_variants_benchmark_trains_each_variant_on_one_split_and_reports_val_and_test(synth_root, tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    out = run_script("variants.py", str(synth_root), "-s", "data.image_size=64", "-s", "train.epochs=1",
                     "-s", "data.seed=5", "--variant", "base", "--variant", "narrow=model.width=8 train.batch_size=16",
                     "--out", str(tmp_path / "runs"), "--jsonl", str(jsonl))
    rows = table_rows(out)
    assert [r[:2] for r in rows] == [["base", "(none)"], ["narrow", "model.width=8 train.batch_size=16"]]
    for row in rows:
        assert row[2] == "1 (1)" and all(0 <= float(v) <= 1 for v in row[5:8]) and row[9] == "n/a"
    assert [json.loads(line)["variant"] for line in jsonl.read_text().splitlines()] == ["base", "narrow"]
    assert all((tmp_path / "runs" / name / "model.pt").is_file() for name in ("base", "narrow"))
    again = _refused("variants.py", str(synth_root), "--variant", "narrow", "--out", str(tmp_path / "runs"))
    assert again.returncode != 0 and "variant 'narrow'" in again.stderr and "already holds a run" in again.stderr
    # a split file is used as it is, and each run records the settings it was made with (as btc train does)
    split_file = tmp_path / "runs" / "base" / "split.parquet"
    run_script("variants.py", str(split_file), "-s", "data.image_size=64", "-s", "train.epochs=1", "--variant", "again",
               "--out", str(tmp_path / "again"))
    assert "seed: 5" in (tmp_path / "again" / "again" / "config.yaml").read_text()
    resplit = _refused("variants.py", str(split_file), "-s", "data.seed=7", "--variant", "x")
    assert resplit.returncode == 2 and "was made with data.seed=5" in resplit.stderr
    skipped = run_script("variants.py", str(synth_root), "--variant", "late", "--time-budget", "0.001")
    assert table_rows(skipped) == [["late", "", "skipped: past --time-budget", "", "", "", "", "", "", ""]]


@pytest.mark.parametrize("args, message", [
    (["--variant", "a='data={seed: 3}'"], "variant 'a' changes data.seed: variants share one split"),
    (["--variant", "a", "--variant", "a"], "variant names must differ: a"),
    (["--variant", "a=model.widht=3"], "variant 'a': invalid config: model.widht"),
    (["--variant", "=x"], "a variant starts with a name"),
])
def test_variants_benchmark_refuses_bad_variants_before_training(synth_root, args, message):
    done = _refused("variants.py", str(synth_root), *args)
    assert done.returncode != 0 and message in done.stderr


def test_variants_benchmark_names_data_it_cannot_use_in_one_line(synth_root, tmp_path):
    (tmp_path / "empty").mkdir()
    for data, message in ((synth_root / "lesions.csv", "is not a readable Parquet file"),
                          (tmp_path / "empty", "no class folders in")):
        done = _refused("variants.py", str(data), "--variant", "x")
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
