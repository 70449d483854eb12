"""A short GPU training check: a few epochs with mixed precision; prints images/s and peak memory.

Runs on synthetic data (no dataset needed) unless a folder is given::

    python benchmarks/gpu_train.py                 # synthetic, 480 images
    python benchmarks/gpu_train.py ../shared/data/brain-tumor-mri --epochs 3

The decoded-image cache is built before either run is timed, so both read the same cache.
``--device cpu`` runs the same comparison without a GPU (to check the script; mixed precision
is a CUDA feature, so there both rows train in fp32 and no GPU memory is reported). The first
run's wall time also pays for start-up; images/s is the best epoch's, which does not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from btc.config import load_config
from btc.data.manifest import build_manifest
from btc.data.split import split_without_leakage
from btc.data.synth import generate_synthetic_dataset
from btc.training import cache_dir_of, split_arrays, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, nargs="?")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="compact_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script without a GPU")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (or --device cpu to check the script)")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or generate_synthetic_dataset(Path(tmp) / "synth", per_class=120, seed=0, size=128)
        split = split_without_leakage(build_manifest(data, progress=False))
        base = load_config(None, [f"output_dir={tmp}"])
        t0 = time.perf_counter()
        for name in ("train", "val"):
            split_arrays(split, name, base, cache_dir_of(base), progress=False)
        cache_s = time.perf_counter() - t0
        rows = []
        for precision in ("amp", "fp32"):
            cfg = load_config(None, [f"output_dir={tmp}", f"model.arch={args.arch}", f"train.epochs={args.epochs}",
                                     f"train.batch_size={args.batch_size}", f"train.device={args.device}", f"train.patience={args.epochs}",
                                     f"train.amp={precision == 'amp'}"])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            result = train_model(cfg, split, Path(tmp) / f"run-{precision}", progress=False)
            wall = time.perf_counter() - t0
            rate = max(h["images_per_s"] for h in result.history)
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if cuda else "n/a"
            rows.append((precision if cuda else f"{precision} requested, fp32 on the CPU", rate, peak, wall, result.history[-1]["val_macro_f1"]))
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{device} | {args.arch} | batch {args.batch_size} | {args.epochs} epochs | "
          f"decoded cache built first in {cache_s:.1f} s (not in the wall times)\n")
    print("| precision | train images/s (best epoch) | peak GPU memory MiB | wall s | val macro-F1 |")
    print("|---|---:|---:|---:|---:|")
    for p, r, m, w, f in rows:
        print(f"| {p} | {r:.0f} | {m} | {w:.1f} | {f:.3f} |")


if __name__ == "__main__":
    main()
