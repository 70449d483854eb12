"""Decoded-image cache: every image is decoded and resized once, then kept as uint8.

Training reads batches straight from one ``uint8 [N, size, size]`` array (memory-mapped from
``.npy``), so no epoch decodes a JPEG again. The cache file's name is a digest of the files'
hashes, the size and the decoder's version, so a changed dataset, size or decoder never reuses a
stale cache; the bytes decoded into it, and the files again on every cache hit, are checked against
those hashes.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from btc.data.images import DECODER_VERSION, ImageDecodeError, decode_gray, read_image_file, resize_gray


def load_resized(path: str | Path, size: int, sha256: str | None = None) -> np.ndarray:
    """Decode one file to grayscale and resize it to ``size`` x ``size`` (uint8).

    Args:
        sha256: the file's hash in the manifest; when given, other bytes are refused.

    Raises:
        ImageDecodeError: the file cannot be used, or is not the file the manifest hashed; the
            message names it (it may have changed or moved since the manifest was built).
    """
    data = _bytes_of(path, sha256)
    try:
        return resize_gray(decode_gray(data)[0], size)
    except ImageDecodeError as err:
        raise ImageDecodeError(f"{path}: {err}") from None


def _bytes_of(path: str | Path, sha256: str | None) -> bytes:
    """The file's bytes, refused (naming the file) when unreadable or not those ``sha256`` names."""
    try:
        data = read_image_file(path)
    except ImageDecodeError as err:
        raise ImageDecodeError(f"{path}: {err}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ImageDecodeError(f"{path}: changed since the manifest was built (its SHA-256 differs); build the "
                               "manifest and split again (btc data manifest / btc data split)")
    return data


def decode_all(paths: list[str], size: int, *, workers: int = 4, progress: bool = True,
               sha256: list[str] | None = None) -> np.ndarray:
    """Decode and resize ``paths`` into one ``uint8 [N, size, size]`` array (checked against ``sha256`` if given)."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    hashes = sha256 if sha256 is not None else [None] * len(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda job: load_resized(job[0], size, job[1]), zip(paths, hashes))
        for i, img in enumerate(tqdm(jobs, total=len(paths), desc=f"decode {size}px", unit="img", disable=not progress)):
            out[i] = img
    return out


def decode_rows(rows: pd.DataFrame, size: int, *, progress: bool = True) -> np.ndarray:
    """Decode manifest or split rows (in order), each checked against its ``sha256`` when the rows have one.

    Raises:
        ImageDecodeError: a file cannot be used or is not the one the manifest hashed (named in the message).
    """
    hashes = list(rows["sha256"]) if "sha256" in rows else None
    return decode_all(list(rows["path"]), size, progress=progress, sha256=hashes)


def check_unchanged(rows: pd.DataFrame, *, workers: int = 4) -> None:
    """Refuse, as decoding would, when a file's bytes are no longer those its row's ``sha256`` names.

    Hashing is far cheaper than decoding (0.42 s for the 4,677 real train and val images here), so a cache hit
    keeps its speed and never trains on pixels of files that have since changed without a word.

    Raises:
        ImageDecodeError: a file that cannot be read or changed since the manifest was built (named).
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda job: _bytes_of(*job), zip(rows["path"], rows["sha256"])))


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
        check_unchanged(rows)  # a warm cache answers as a cold one would: a changed file is named either way
        return np.load(target, mmap_mode="r")
    # The bytes must be those the manifest hashed: the cache is named by those hashes.
    images = decode_rows(rows, size, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}-{uuid.uuid4().hex}.tmp.npy")  # one per writer
    try:
        np.save(tmp, images)
        tmp.replace(target)  # atomic: a crash never leaves a half-written cache behind
    finally:
        tmp.unlink(missing_ok=True)
    return images
