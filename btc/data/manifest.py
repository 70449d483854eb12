"""The manifest: one row per image file with what data validation and splitting need.

Columns: ``path, label, source_split, width, height, mode, format, bytes, sha256, phash,
readable, error``. Unreadable files stay in the manifest with ``readable=False`` and the
reason in ``error``, so they are counted and reported rather than silently lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from btc.data.discover import FoundImage, find_images
from btc.data.images import ImageDecodeError, decode_gray, read_image_file
from btc.tables import read_parquet

# 256-bit pHash: the 64-bit default puts most MRI slices within a few bits of each other
# (dark background, one head), so near-duplicate clusters percolate across the dataset.
PHASH_SIZE = 16

COLUMNS = [
    "path", "label", "source_split", "width", "height", "mode", "format", "bytes",
    "sha256", "phash", "readable", "error",
]


def _describe(item: FoundImage) -> dict:
    row = {"path": str(item.path), "label": item.label, "source_split": item.source_split,
           "width": 0, "height": 0, "mode": "", "format": "", "bytes": 0, "sha256": "",
           "phash": "", "readable": False, "error": ""}
    try:
        data = read_image_file(item.path)
    except ImageDecodeError as err:
        row["error"] = str(err)
        return row
    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        gray, info = decode_gray(data)
        phash = phash_hex(gray)
    except ImageDecodeError as err:
        row["error"] = str(err)
        return row
    except Exception as err:  # a decoder's own bug must not stop a run halfway: the file is listed instead
        row["error"] = f"cannot be decoded ({type(err).__name__}: {err})"
        return row
    row.update(width=info.width, height=info.height, mode=info.mode, format=info.format, readable=True, phash=phash)
    return row


def phash_hex(gray: np.ndarray) -> str:
    """The 256-bit perceptual hash of a decoded grayscale image, as hex (the manifest's ``phash``)."""
    return str(imagehash.phash(Image.fromarray(gray), hash_size=PHASH_SIZE))


def build_manifest(root: Path, *, workers: int = 4, progress: bool = True) -> pd.DataFrame:
    """Find, hash and probe every image under ``root``.

    Args:
        root: a dataset folder in one of the layouts of :mod:`btc.data.discover`.
        workers: decoding threads (PIL releases the GIL while decoding).
        progress: show a progress bar.

    Returns:
        The manifest, one row per file, sorted by path.
    """
    items = find_images(root)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(tqdm(pool.map(_describe, items), total=len(items), desc="manifest", unit="img",
                         disable=not progress))
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values("path", ignore_index=True)


def unreadable(manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows whose file could not be decoded, with the reason."""
    return manifest.loc[~manifest["readable"], ["path", "label", "error"]]


def manifest_digest(manifest: pd.DataFrame) -> str:
    """A short content digest of the dataset (files' hashes and labels), its version."""
    keyed = manifest.sort_values("path")[["sha256", "label"]].astype(str).agg(":".join, axis=1)
    return hashlib.sha256("\n".join(keyed).encode()).hexdigest()[:16]


def save_manifest(manifest: pd.DataFrame, path: Path) -> Path:
    """Write the manifest as Parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(path, index=False)
    return path


def load_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest (or a split, which is a manifest with more columns) written by btc.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a Parquet file, or a table without the manifest's columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist; build it with `btc data manifest DIR`")
    try:
        table = read_parquet(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise ValueError(f"{str(path)!r} is not a readable Parquet file ({type(err).__name__}: {err})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{str(path)!r} is not a btc manifest or split: it lacks the columns {', '.join(missing)}")
    return table


def phash_words(phashes: Iterable[str]) -> np.ndarray:
    """Perceptual hashes (hex strings) as rows of uint64 words, for fast Hamming distances."""
    return np.stack([np.frombuffer(bytes.fromhex(h), dtype=">u8").astype(np.uint64) for h in phashes])
