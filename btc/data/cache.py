"""Decoded-image cache: every image is decoded and resized once, then kept as uint8.

Training reads batches straight from one ``uint8 [N, size, size]`` array (memory-mapped from
``.npy``), so no epoch decodes a JPEG again. The cache file's name is a digest of the files'
hashes, the size and the decoder's version, so a changed dataset, size or decoder never reuses a
stale cache.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from btc.data.images import DECODER_VERSION, ImageDecodeError, decode_gray, resize_gray


def load_resized(path: str | Path, size: int) -> np.ndarray:
    """Decode one file to grayscale and resize it to ``size`` x ``size`` (uint8).

    Raises:
        ImageDecodeError: the file cannot be used; the message names it (it may have changed
            or moved since the manifest was built).
    """
    try:
        return resize_gray(decode_gray(path)[0], size)
    except ImageDecodeError as err:
        raise ImageDecodeError(f"{path}: {err}") from None


def decode_all(paths: list[str], size: int, *, workers: int = 4, progress: bool = True) -> np.ndarray:
    """Decode and resize ``paths`` into one ``uint8 [N, size, size]`` array."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda p: load_resized(p, size), paths)
        for i, img in enumerate(tqdm(jobs, total=len(paths), desc=f"decode {size}px", unit="img", disable=not progress)):
            out[i] = img
    return out


def cache_key(rows: pd.DataFrame, size: int) -> str:
    """Digest naming the cache of these rows (in order) at this size."""
    digest = hashlib.sha256(f"{size}\ndecoder {DECODER_VERSION}\n".encode() + "\n".join(rows["sha256"]).encode())
    return digest.hexdigest()[:20]


def cached_images(rows: pd.DataFrame, size: int, cache_dir: Path, *, progress: bool = True) -> np.ndarray:
    """The decoded images of ``rows`` (in order), from the cache or decoded once and cached.

    Args:
        rows: manifest rows with ``path`` and ``sha256``; all must be readable.
        size: square side in pixels.
        cache_dir: folder for ``<key>.npy`` files.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"images-{cache_key(rows, size)}.npy"
    if target.is_file():
        return np.load(target, mmap_mode="r")
    images = decode_all(list(rows["path"]), size, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.npy")
    np.save(tmp, images)
    tmp.replace(target)  # atomic: a crash never leaves a half-written cache behind
    return images
