"""Training throughput: the decoded uint8 cache against decoding every JPEG every epoch.

Same model (a copy each), same batches, same run, each pipeline warmed up by one untimed epoch;
prints a markdown table. Usage::

    .venv/bin/python benchmarks/train_throughput.py ../shared/data/brain-tumor-mri --images 1024 --epochs 2

The cache's first build (decode once) is reported separately: it is paid once per dataset and size.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from arguments import positive_int
from btc.data.cache import cached_images
from btc.data.loaders import ArrayBatches, DecodingDataset
from btc.data.manifest import build_manifest
from btc.models import build_model
from btc.train import train_one_epoch
from btc.training import labels_of
from btc.transforms import Augment


def epoch_rate(batches, model, epochs: int, warmup: int = 1) -> float:
    """Mean images/s over ``epochs`` timed epochs, after ``warmup`` untimed ones.

    The warm-up pays torch's first-call costs (kernel selection, allocator growth) and starts
    the DataLoader's workers, so neither pipeline is charged for what the one timed first met.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rates = [train_one_epoch(model, batches, opt, torch.device("cpu"), loss_fn=nn.CrossEntropyLoss(),
                             augment=Augment(), progress=False)["images_per_s"] for _ in range(warmup + epochs)]
    return sum(rates[warmup:]) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=positive_int, default=1024, help="images per epoch (a fixed random subset)")
    parser.add_argument("--epochs", type=positive_int, default=2, help="timed epochs per pipeline, after one untimed")
    parser.add_argument("--size", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the decoding path")
    args = parser.parse_args()

    manifest = build_manifest(args.data, progress=False)
    rows = manifest[manifest["readable"]].sample(min(args.images, int(manifest["readable"].sum())), random_state=0)
    rows = rows.sort_values("path")
    labels = labels_of(rows)
    torch.manual_seed(0)
    initial = build_model(width=32).to(memory_format=torch.channels_last)  # each pipeline trains a copy of it

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        images = cached_images(rows, args.size, Path(tmp), progress=False)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached_images(rows, args.size, Path(tmp), progress=False)
        reload_s = time.perf_counter() - t0
        cached = epoch_rate(ArrayBatches(images, labels, args.batch_size, shuffle=True), copy.deepcopy(initial),
                            args.epochs)
    loader = DataLoader(DecodingDataset(list(rows["path"]), labels, args.size), batch_size=args.batch_size,
                        shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0)
    decoding = epoch_rate(loader, copy.deepcopy(initial), args.epochs)

    print(f"\n{len(rows)} images at {args.size}px, batch {args.batch_size}, {args.epochs} timed epochs each "
          "(after one untimed warm-up epoch), "
          f"{torch.get_num_threads()} torch threads\n")
    print("| input pipeline | train images/s | relative |")
    print("|---|---:|---:|")
    print(f"| decode every epoch (DataLoader, {args.workers} workers) | {decoding:.1f} | 1.00x |")
    print(f"| decoded uint8 cache | {cached:.1f} | {cached / decoding:.2f}x |")
    print(f"\ncache build (decode once): {build_s:.1f} s; reopen (mmap): {reload_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
