"""Image statistics: a few numbers per image that tell an MRI slice from a photo or a CT.

Data validation compares them with ranges learned from a reference dataset, monitoring
compares their distributions over time, and serving can flag an upload that looks unlike
the training data. All statistics are computed from one 256-bin histogram (plus the border
band), on a copy downsized to at most :data:`MAX_SIDE` pixels a side, so thousands of images
take seconds.

Intensities are the grayscale values divided by 255, in [0, 1]:

* ``mean``, ``std``: mean and standard deviation of the intensity;
* ``p05``, ``p50``, ``p95``: intensity percentiles;
* ``contrast``: ``p95 - p05``;
* ``entropy``: Shannon entropy of the 256-bin histogram, in bits (0 to 8);
* ``black_border_share``: share of the pixels of the outer band (:data:`BORDER_FRACTION` of
  the side on each edge) darker than :data:`DARK_THRESHOLD`. An MRI slice is a head on an
  almost black background, so its border band is mostly dark (typically above 0.6); a photo
  fills the frame and its border is rarely dark. The band, rather than the whole image, is
  used because the head's own dark regions (ventricles, CSF) vary with the slice;
* ``width``, ``height`` (of the original image, px) and ``aspect`` (width / height).

A *reference* holds the accepted range of each intensity statistic, learned from images
known to be good (:func:`learn_reference`, percentile ranges) and kept as JSON
(:func:`save_reference`, :func:`load_reference`); ``expectations/reference_stats.json`` is
the one shipped, made by ``expectations/make_reference.py``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from btc.data.images import ImageDecodeError, decode_gray

STAT_COLUMNS = (
    "mean", "std", "p05", "p50", "p95", "contrast", "entropy", "black_border_share", "width", "height", "aspect",
)
MAX_SIDE = 256
BORDER_FRACTION = 0.1
# MRI background is noise around 0-20 of 255 (higher after a JPEG's brightness shift); tissue
# starts well above 40.
DARK_THRESHOLD = 40 / 255

_LEVELS = np.arange(256, dtype=np.float64) / 255.0


def _downsized(gray: np.ndarray) -> np.ndarray:
    """A copy whose longer side is at most :data:`MAX_SIDE` (statistics barely change)."""
    height, width = gray.shape
    step = int(np.ceil(max(height, width) / MAX_SIDE))
    return gray[::step, ::step] if step > 1 else gray


def _percentile(cdf: np.ndarray, q: float) -> float:
    """The lowest intensity at which the cumulative share reaches ``q``."""
    return float(_LEVELS[np.searchsorted(cdf, q)])


def _border_band(gray: np.ndarray) -> np.ndarray:
    height, width = gray.shape
    by, bx = max(1, round(height * BORDER_FRACTION)), max(1, round(width * BORDER_FRACTION))
    inner = np.zeros(gray.shape, dtype=bool)
    inner[by:height - by, bx:width - bx] = True
    return gray[~inner]


def image_statistics(gray: np.ndarray) -> dict[str, float]:
    """The statistics of one grayscale image (see the module docstring for their meaning).

    Args:
        gray: a 2-D uint8 array, as :func:`btc.data.images.decode_gray` returns.

    Returns:
        A dict with one float per name of :data:`STAT_COLUMNS`.

    Raises:
        ValueError: ``gray`` is not a non-empty 2-D uint8 array.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        raise ValueError(
            f"image of shape {gray.shape} and dtype {gray.dtype} is not supported; expected a non-empty 2-D uint8 array"
        )
    height, width = gray.shape
    small = _downsized(gray)
    counts = np.bincount(small.ravel(), minlength=256).astype(np.float64)
    share = counts / counts.sum()
    cdf = np.cumsum(share)
    mean = float(share @ _LEVELS)
    nonzero = share[share > 0]
    p05, p95 = _percentile(cdf, 0.05), _percentile(cdf, 0.95)
    return {
        "mean": mean,
        "std": float(np.sqrt(max(share @ (_LEVELS - mean) ** 2, 0.0))),
        "p05": p05,
        "p50": _percentile(cdf, 0.5),
        "p95": p95,
        "contrast": p95 - p05,
        "entropy": float(-(nonzero * np.log2(nonzero)).sum()),
        "black_border_share": float((_border_band(small) < DARK_THRESHOLD * 255).mean()),
        "width": float(width),
        "height": float(height),
        "aspect": width / height,
    }


def _statistics_of(source: np.ndarray | Path | str) -> dict[str, float]:
    if isinstance(source, np.ndarray):
        return image_statistics(source)
    try:
        gray, _ = decode_gray(source)
    except ImageDecodeError:
        return dict.fromkeys(STAT_COLUMNS, np.nan)
    return image_statistics(gray)


def statistics_frame(sources: Iterable[np.ndarray | Path | str], *, workers: int = 4) -> pd.DataFrame:
    """The statistics of many images, one row per image in the order given.

    Args:
        sources: grayscale uint8 arrays, or paths of image files.
        workers: decoding threads for paths (PIL releases the GIL while decoding).

    Returns:
        A frame with the columns :data:`STAT_COLUMNS` and a 0..n-1 index; a file that
        cannot be decoded gets a row of NaN (the manifest says why).
    """
    sources = list(sources)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(_statistics_of, sources))
    return pd.DataFrame(rows, columns=list(STAT_COLUMNS), dtype=float)



# --- reference ranges ------------------------------------------------------------------------

# The statistics a reference keeps ranges for (size is checked against fixed bounds instead).
REFERENCE_COLUMNS = ("mean", "std", "p05", "p50", "p95", "contrast", "entropy", "black_border_share")
_NATURAL_BOUNDS = {"entropy": (0.0, 8.0)}  # every other reference statistic lies in [0, 1]
REFERENCE_FORMAT = "btc-image-statistics-reference/1"


def learn_reference(
    stats: pd.DataFrame, *, lower: float = 0.5, upper: float = 99.5, margin: float = 0.05, source: str = ""
) -> dict:
    """Learn the accepted range of each statistic from images known to be good.

    Each range is the ``[lower, upper]`` percentile interval of the reference images, widened
    on both sides by ``margin`` times its width and clipped to the statistic's natural bounds.

    Args:
        stats: rows from :func:`statistics_frame` (NaN rows, from unreadable files, are ignored).
        lower: lower percentile, 0-100.
        upper: upper percentile, 0-100.
        margin: widening, as a fraction of the interval's width.
        source: where the images came from, recorded in the reference.

    Returns:
        A JSON-serialisable dict: ``format``, ``sources`` and ``ranges`` (name -> [min, max]).

    Raises:
        ValueError: no usable rows, or a percentile or margin out of range.
    """
    if not 0 <= lower < upper <= 100 or margin < 0:
        raise ValueError(
            f"lower={lower}, upper={upper}, margin={margin}: expected 0 <= lower < upper <= 100 and margin >= 0"
        )
    missing = [c for c in REFERENCE_COLUMNS if c not in stats.columns]
    if missing:
        raise ValueError(f"statistics frame lacks the columns {', '.join(missing)}; build it with statistics_frame")
    usable = stats[list(REFERENCE_COLUMNS)].dropna()
    if usable.empty:
        raise ValueError("no readable images to learn a reference from")
    ranges = {}
    for column in REFERENCE_COLUMNS:
        lo, hi = np.percentile(usable[column], [lower, upper])
        low_bound, high_bound = _NATURAL_BOUNDS.get(column, (0.0, 1.0))
        pad = margin * (hi - lo)
        ranges[column] = [round(max(low_bound, lo - pad), 4), round(min(high_bound, hi + pad), 4)]
    return {
        "format": REFERENCE_FORMAT,
        "sources": [{"source": source, "images": int(len(usable)), "percentiles": [lower, upper], "margin": margin}],
        "ranges": ranges,
    }


def merge_references(references: Iterable[dict]) -> dict:
    """One reference accepting whatever any of ``references`` accepts (the union of the ranges)."""
    references = list(references)
    if not references:
        raise ValueError("no references to merge")
    ranges = {
        column: [min(r["ranges"][column][0] for r in references), max(r["ranges"][column][1] for r in references)]
        for column in references[0]["ranges"]
    }
    return {"format": REFERENCE_FORMAT, "sources": [s for r in references for s in r["sources"]], "ranges": ranges}


def save_reference(reference: dict, path: Path) -> Path:
    """Write a reference as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reference, indent=2) + "\n")
    return path


def load_reference(path: Path) -> dict:
    """Read a reference written by :func:`save_reference`.

    Raises:
        ValueError: the file is missing, is not JSON or lacks a range of :data:`REFERENCE_COLUMNS`.
    """
    path = Path(path)
    try:
        reference = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"reference file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"reference file {str(path)!r} is not valid JSON ({err})") from None
    except OSError as err:  # a folder, no permission
        raise ValueError(f"reference file {str(path)!r} cannot be read ({err.strerror or err})") from None
    ranges = reference.get("ranges") if isinstance(reference, dict) else None

    def is_range(value) -> bool:
        return isinstance(value, (list, tuple)) and len(value) == 2

    missing = [c for c in REFERENCE_COLUMNS if not isinstance(ranges, dict) or not is_range(ranges.get(c))]
    if missing:
        raise ValueError(
            f"reference file {str(path)!r} lacks a [min, max] range for {', '.join(missing)}; "
            "learn one with expectations/make_reference.py"
        )
    return reference
