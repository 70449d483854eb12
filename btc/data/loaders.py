"""Batches of uint8 images and labels, from the decoded cache or (for comparison) from disk."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from btc.data.cache import load_resized


class ArrayBatches:
    """Iterate ``(uint8 [B, H, W], int64 [B])`` batches over in-memory images.

    Args:
        images: ``uint8 [N, H, W]`` (a memory-mapped cache is fine).
        labels: class indices ``[N]``.
        batch_size: images per batch.
        shuffle: reshuffle every epoch.
        sample_weights: draw N images per epoch with replacement, with these weights
            (balanced sampling); None: each image once.
        seed: seed of the shuffling, so CPU runs repeat.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, shuffle: bool = False,
                 sample_weights: np.ndarray | None = None, seed: int = 0, drop_last: bool = False):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.sample_weights = None if sample_weights is None else sample_weights / sample_weights.sum()
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict:
        """The shuffling generator's state, so a resumed run draws the same batches as an unbroken one."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> np.ndarray:
        n = len(self.labels)
        if self.sample_weights is not None:
            return self.rng.choice(n, size=n, replace=True, p=self.sample_weights)
        return self.rng.permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self):
        order = self._order()
        for b in range(len(self)):
            idx = np.sort(order[b * self.batch_size:(b + 1) * self.batch_size])  # sorted: faster mmap reads
            yield torch.from_numpy(np.ascontiguousarray(self.images[idx])), torch.from_numpy(self.labels[idx])


class DecodingDataset(Dataset):
    """Decodes each file every time it is read: the slow path the cache replaces (for benchmarks)."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int):
        self.paths, self.labels, self.size = paths, np.asarray(labels, dtype=np.int64), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(load_resized(self.paths[i], self.size))), int(self.labels[i])  # writable copy
