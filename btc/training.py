"""A training run from a config and a split: the one function the CLI and flows call.

It wires the plain pieces together (cache, batches, model, optimizer, :func:`btc.train.fit`),
fits the temperature on validation and writes, into ``out_dir``: ``model.pt``,
``config.yaml``, ``history.json``, ``split.parquet`` and the resumable ``last.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from btc.checkpoint import ModelSpec, save_model
from btc.config import Config, flatten_config, load_config
from btc.data.cache import cached_images
from btc.data.loaders import ArrayBatches
from btc.labels import CLASSES
from btc.metrics import fit_temperature
from btc.models import build_model
from btc.paths import usable_folder
from btc.tables import read_parquet
from btc.train import check_resumable, fit, predict_logits, resolve_device
from btc.transforms import Augment

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a run's outputs are and what it measured."""

    out_dir: Path
    model_path: Path
    history: list[dict]
    temperature: float
    seconds: float
    device: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def labels_of(rows: pd.DataFrame) -> np.ndarray:
    return rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64)


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights, mean 1 (classes absent from training get weight 0)."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(float)
    w = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return w * (counts > 0).sum() / w.sum()


def augment_from(cfg: Config) -> Augment:
    t = cfg.train
    return Augment(rotation_degrees=t.rotation_degrees, scale_jitter=t.scale_jitter, hflip=t.hflip,
                   intensity_jitter=t.intensity_jitter, gamma_jitter=t.gamma_jitter, translate=t.translate)


def min_epochs_of(cfg: Config) -> int:
    """The epoch before which early stopping may not stop: ``train.min_epochs``, else half the epochs."""
    return cfg.train.min_epochs if cfg.train.min_epochs is not None else cfg.train.epochs // 2


# What a resumed run may change: none of these shape the saved weights, optimizer or schedule.
RESUME_MAY_CHANGE = ("output_dir", "data.cache_dir", "train.threads", "train.device", "train.epochs",
                     "model.pretrained", "model.init_weights")


def _split_key(split: pd.DataFrame) -> set:
    return set(split.loc[split["split"].isin(["train", "val"]), ["sha256", "label", "split"]].itertuples(index=False))


def check_same_run(run_dir: Path, cfg: Config, split: pd.DataFrame) -> None:
    """Refuse to resume the run in ``run_dir`` with other train/val images or with settings that change
    what its ``last.pt`` holds (the batch size, the model, the augmentation, ...); the message names
    each setting. ``train.epochs`` is checked against ``last.pt`` itself (:func:`btc.train.check_resumable`)."""
    if (run_dir / "split.parquet").is_file():
        before = _split_key(read_parquet(run_dir / "split.parquet", columns=["sha256", "label", "split"]))
        now = _split_key(split)
        if before != now:
            raise ValueError(f"cannot resume {run_dir} on other data: {len(before - now)} of its train/val images are "
                             f"not in this split and {len(now - before)} of this split's are new. Resume with the "
                             f"run's own split ({run_dir / 'split.parquet'}), or start a new run")
    saved_config = run_dir / "config.yaml"
    if not saved_config.is_file():
        return
    shaping = ("data.", "model.", "train.")  # the sections that make up what last.pt holds
    before, now = flatten_config(load_config(saved_config)), flatten_config(cfg)
    changed = [k for k in sorted(before.keys() | now.keys())
               if k.startswith(shaping) and before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE]
    if changed:
        raise ValueError(
            f"cannot resume with other settings than the run was made with ({saved_config}): "
            + "; ".join(f"{k} was {before.get(k)}, now {now.get(k)}" for k in changed)
            + ". Resume with the run's own settings, or start a new run")


def lr_schedule(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int):
    """One-cycle: warm up over a fifth of the steps, then anneal to almost nothing.

    The warm-up lasts at least two steps: torch's OneCycleLR divides by zero when it would
    last one (5 steps at 20 %). Under four steps in all there is nothing to warm up over,
    so the learning rate stays at ``max_lr``.
    """
    if total_steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               pct_start=max(0.2, 2 / total_steps))


def cpu_threads(asked: int) -> int:
    """``asked``, or the number of cores when that is fewer: thousands of threads abort the process."""
    cores = os.cpu_count() or 1
    if asked > cores:
        log.warning("train.threads=%d but this machine has %d CPU cores; using %d", asked, cores, cores)
    return min(asked, cores)


def cache_dir_of(cfg: Config) -> Path:
    """Where the decoded-image cache lives: ``data.cache_dir``, by default ``<output_dir>/cache``."""
    return cfg.data.cache_dir or cfg.output_dir / "cache"


def split_rows(split: pd.DataFrame, name: str) -> pd.DataFrame:
    """The ``name`` rows of ``split`` in path order; refuses too few to train on."""
    rows = split[split["split"] == name].sort_values("path")
    if rows.empty:
        raise ValueError(f"the split has no {name!r} images; cannot train without train and val images")
    if name == "train" and len(rows) < 2:
        raise ValueError("the split has 1 'train' image; training needs at least 2 (batch normalisation learns "
                         "from each batch's spread)")
    return rows


def split_arrays(split: pd.DataFrame, name: str, cfg: Config, cache_dir: Path, progress: bool):
    rows = split_rows(split, name)
    return cached_images(rows, cfg.data.image_size, cache_dir, progress=progress), labels_of(rows)


RUN_FILES = ("last.pt", "model.pt")


def check_new_run_folder(out_dir: Path) -> None:
    """Refuse to start a new run in a folder that holds a run: it would overwrite that run's config,
    split and checkpoints, and a half-trained one could no longer be resumed."""
    held = [f for f in RUN_FILES if (out_dir / f).is_file()]
    if held:
        raise ValueError(f"{out_dir} already holds a run ({', '.join(held)}); a new run would overwrite it. "
                         "Train into a new folder, or continue that run with resume (--resume)")


def train_model(cfg: Config, split: pd.DataFrame, out_dir: Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train the configured model on the ``train`` rows of ``split``, choosing on ``val``.

    Args:
        cfg: the whole config (only this adapter reads it; the loop takes plain arguments).
        split: output of :func:`btc.data.split.split_without_leakage`.
        out_dir: run folder for every output.
        resume: continue from ``out_dir/last.pt`` if present.
        progress: show progress bars.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    resuming = resume and (out_dir / "last.pt").is_file()
    # Everything that can refuse the run is checked before this run's config and split replace the
    # folder's own: a refused run leaves an earlier run in the folder as it was, resumable.
    if resuming:
        check_resumable(out_dir / "last.pt", cfg.train.epochs)
        check_same_run(out_dir, cfg, split)
    else:
        check_new_run_folder(out_dir)
    device = resolve_device(cfg.train.device)
    for name in ("train", "val"):
        split_rows(split, name)
    cache_dir = usable_folder(cache_dir_of(cfg), "cache folder (data.cache_dir)")
    usable_folder(out_dir, "run folder")
    cfg.save(out_dir / "config.yaml")
    split.to_parquet(out_dir / "split.parquet", index=False)
    seed_everything(cfg.train.seed)
    threads_before = torch.get_num_threads()  # a process-wide setting: restored for whatever runs next
    if cfg.train.threads:
        torch.set_num_threads(cpu_threads(cfg.train.threads))
    try:
        return _train(cfg, split, out_dir, resume=resume, resuming=resuming, progress=progress, device=device,
                      cache_dir=cache_dir, start=start)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: Config, split: pd.DataFrame, out_dir: Path, *, resume: bool, resuming: bool, progress: bool,
           device: torch.device, cache_dir: Path, start: float) -> TrainResult:
    x_train, y_train = split_arrays(split, "train", cfg, cache_dir, progress)
    x_val, y_val = split_arrays(split, "val", cfg, cache_dir, progress)
    weights = class_weights(y_train)
    bs = cfg.train.batch_size
    train_batches = ArrayBatches(x_train, y_train, bs, shuffle=True, seed=cfg.train.seed, drop_last=len(y_train) > bs,
                                 sample_weights=weights[y_train] if cfg.train.balance == "sampler" else None)
    val_batches = ArrayBatches(x_val, y_val, 2 * bs)

    m = cfg.model
    # A resumed run's weights come from last.pt: no download, and an initial-weights file may have moved since.
    model = build_model(m.arch, width=m.width, depth=m.depth, dropout=m.dropout, pretrained=m.pretrained and not resuming,
                        init_weights=None if resuming else m.init_weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = lr_schedule(optimizer, cfg.train.lr, cfg.train.epochs * len(train_batches))
    loss_fn = nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32, device=device) if cfg.train.balance == "weights" else None,
        label_smoothing=cfg.train.label_smoothing)
    history = fit(model, train_batches, val_batches, optimizer, device, epochs=cfg.train.epochs, loss_fn=loss_fn,
                  augment=augment_from(cfg), checkpoint_dir=out_dir, scheduler=scheduler,
                  patience=cfg.train.patience, min_epochs=min_epochs_of(cfg), resume=resume, progress=progress,
                  amp=cfg.train.amp)

    best = torch.load(out_dir / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    val_logits, val_labels = predict_logits(model, val_batches, device, amp=False)  # in float32, as it is served
    temperature = fit_temperature(val_logits, val_labels)
    spec = ModelSpec(arch=m.arch, width=m.width, depth=m.depth, dropout=m.dropout, image_size=cfg.data.image_size,
                     temperature=temperature, extra={"best_epoch": int(best["epoch"]), "val_macro_f1": float(best["val_macro_f1"])})
    model_path = save_model(out_dir / "model.pt", model, spec)
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return TrainResult(out_dir, model_path, history, temperature, time.perf_counter() - start, str(device))
