"""The training loop as plain functions: model, batches, optimizer and device in; metrics out.

Nothing here knows about Prefect, MLflow or BentoML; callers log what these return.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from btc.metrics import macro_f1
from btc.transforms import Augment, preprocess, train_transform

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available; use device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was asked for but Apple MPS is not available; use device=auto or cpu")
    return torch.device(name)


def _autocast(device: torch.device, amp: bool = True):
    # Mixed precision only where it pays: CUDA tensor cores. CPU autocast is slower here.
    return torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else nullcontext()


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True, memory_format=torch.channels_last) if x.ndim == 4 else x.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    loss_fn: nn.Module,
    augment: Augment,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
    desc: str = "train",
    amp: bool = True,
) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss, accuracy, images/s, seconds and the learning rate of
    its last step."""
    model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress)
    for images, labels in bar:
        x = _to_device(train_transform(images.to(device), augment), device)
        y = labels.to(device)
        with _autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used (the scheduler moves it on)
        if scheduler is not None:
            scheduler.step()
        n = len(y)
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "images_per_s": seen / seconds, "seconds": seconds, "lr": lr}


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Batches, device: torch.device, *,
                   amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch, in order (eval mode, no augmentation; float16 on CUDA when ``amp``)."""
    model.eval()
    outs, ys = [], []
    for images, labels in batches:
        with _autocast(device, amp):
            outs.append(model(_to_device(preprocess(images.to(device)), device)).float().cpu())
        ys.append(labels)
    return torch.cat(outs).numpy(), torch.cat(ys).numpy()


def evaluate_batches(model: nn.Module, batches: Batches, device: torch.device, loss_fn: nn.Module, *,
                     amp: bool = True) -> dict[str, float]:
    """Validation loss, accuracy and macro-F1.

    The loss is ``loss_fn``'s label smoothing without its class weights: a weighted mean over a
    validation set of classes training lacks (weight 0) would be 0/0, a false "diverged".
    """
    logits, labels = predict_logits(model, batches, device, amp=amp)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                           label_smoothing=float(getattr(loss_fn, "label_smoothing", 0.0))).item()
    pred = logits.argmax(1)
    return {"loss": loss, "accuracy": float((pred == labels).mean()), "macro_f1": macro_f1(labels, pred, logits.shape[1])}


def save_checkpoint(path: Path, **state) -> Path:
    """Write a checkpoint atomically (a crash never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    except BaseException:  # Ctrl-C or a full disk mid-write: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_last(path: Path) -> dict:
    """A ``last.pt`` written by :func:`fit`, on the CPU (its RNG state must stay there).

    Raises:
        ValueError: the file is not a readable resume checkpoint; the message names it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError (zip), EOFError, ValueError, ...
        raise ValueError(f"cannot resume from {str(path)!r}: not a readable checkpoint ({type(err).__name__}: {err})"
                         ) from None
    missing = [k for k in ("model", "optimizer", "history", "best", "since_best", "torch_rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"cannot resume from {str(path)!r}: not a btc training checkpoint (lacks {', '.join(missing)})")
    return state


def check_resumable(state: dict | Path, epochs: int, where: Path | None = None) -> None:
    """Refuse to resume a ``last.pt`` (or its loaded ``state``) with another epoch count: the
    one-cycle learning-rate schedule is planned over the run's own epochs."""
    if isinstance(state, Path):
        where, state = state, load_last(state)
    saved = state.get("epochs", epochs)
    if saved != epochs:
        raise ValueError(f"{where} was saved by a run of {saved} epochs, and its learning-rate schedule is planned "
                         f"over them; resume it with epochs={saved}, not {epochs}")


def fit(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epochs: int,
    loss_fn: nn.Module,
    augment: Augment,
    checkpoint_dir: Path,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    patience: int = 5,
    min_epochs: int = 0,
    resume: bool = False,
    progress: bool = True,
    amp: bool = True,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train with early stopping on validation macro-F1 (mixed precision on CUDA when ``amp``).

    Early stopping waits for ``min_epochs``: under a one-cycle schedule validation swings
    while the learning rate is high, and the best epochs come as it anneals.

    Writes ``last.pt`` (everything needed to resume: weights, optimizer, schedule, gradient
    scaler, the batches' shuffling state and the RNG, so a resumed run repeats an unbroken one
    on the CPU) after every epoch and ``best.pt`` (the
    weights with the best validation macro-F1) whenever it improves.

    Returns:
        One dict per epoch: ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
        ``val_accuracy``, ``val_macro_f1``, ``lr``, ``images_per_s``, ``seconds``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    model.to(device, memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    history: list[dict] = []
    best, since_best, start_epoch = -1.0, 0, 1
    last = checkpoint_dir / "last.pt"
    if resume and last.is_file():
        state = load_last(last)
        if scheduler is not None:
            check_resumable(state, epochs, last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if hasattr(train_batches, "load_state_dict") and state.get("batches"):
            train_batches.load_state_dict(state["batches"])
        history, best, since_best = state["history"], state["best"], state["since_best"]
        start_epoch = len(history) + 1
        torch.set_rng_state(state["torch_rng"])
    for epoch in range(start_epoch, epochs + 1):
        if since_best >= patience and epoch > min_epochs:
            break
        tr = train_one_epoch(model, train_batches, optimizer, device, loss_fn=loss_fn, augment=augment,
                             scheduler=scheduler, scaler=scaler, progress=progress, desc=f"epoch {epoch}/{epochs}",
                             amp=amp)
        va = evaluate_batches(model, val_batches, device, loss_fn, amp=amp)
        if not math.isfinite(va["loss"]):  # the weights broke (a skipped mixed-precision step alone does not)
            raise ValueError(f"training diverged in epoch {epoch} (train loss {tr['loss']}, validation loss "
                             f"{va['loss']}); train again into a new folder (--out NEW) with a lower learning rate "
                             "(train.lr) or weight decay (train.weight_decay): resuming this run repeats its settings")
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_macro_f1": va["macro_f1"],
               "lr": tr["lr"], "images_per_s": tr["images_per_s"], "seconds": tr["seconds"]}
        history.append(row)
        if va["macro_f1"] > best:
            best, since_best = va["macro_f1"], 0
            save_checkpoint(checkpoint_dir / "best.pt", model=model.state_dict(), epoch=epoch, val_macro_f1=best)
        else:
            since_best += 1
        save_checkpoint(last, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict() if scheduler else None,
                        scaler=scaler.state_dict() if scaler else None,
                        batches=train_batches.state_dict() if hasattr(train_batches, "state_dict") else None,
                        epochs=epochs, history=history, best=best, since_best=since_best, torch_rng=torch.get_rng_state())
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {tr['loss']:.4f} acc {tr['accuracy']:.4f} | val loss {va['loss']:.4f} "
                       f"acc {va['accuracy']:.4f} macro-F1 {va['macro_f1']:.4f} | {tr['images_per_s']:.0f} img/s")
        if on_epoch_end is not None:
            on_epoch_end(row)
    return history
