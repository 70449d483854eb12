"""Splitting without leakage: near-duplicate clusters never straddle train, validation and test.

The real Kaggle data holds exact copies and near duplicates (adjacent slices of one patient,
re-encodings). A random split puts near-identical images on both sides and inflates accuracy.
Here:

1. unreadable files are excluded (and listed in the manifest);
2. exact duplicates (same sha256) are dropped, keeping the copy in a Testing folder if there is
   one, else the first path; copies filed under
   different classes are all dropped (``label conflict``): nobody knows which label is right;
3. images whose 256-bit pHashes differ by at most ``near_duplicate_distance`` bits are
   linked, and connected components become clusters; a whole cluster goes to one split;
4. clusters are assigned greedily, largest first, to the split furthest below its share of
   the cluster's majority class, so every split is stratified by class;
5. where the data came with its own Testing folder, that split is kept as the test set and
   test images with a near duplicate in training are flagged (``near_dup_in_train``) so
   evaluation can report the clean subset separately; the clusters holding those near copies
   are kept in train, never in validation (which chooses the epoch and fits the temperature);
6. every test image gets ``train_distance``, the bits to its nearest train or validation
   image, so evaluation can show how accuracy depends on closeness to training.

The threshold of 40 bits (of 256) was chosen on the real data: it groups re-encodings and
adjacent slices while the largest cluster stays at 18 images; above it, links start to chain
different patients together (``benchmarks/split_threshold.py`` and the README).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from btc.data.manifest import phash_words

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def _distance_blocks(words: np.ndarray, other: np.ndarray, chunk: int = 512):
    """Yield (start, Hamming distances ``[chunk, len(other)]``) for blocks of rows of ``words``."""
    for start in range(0, len(words), chunk):
        block = words[start:start + chunk]
        dist = np.zeros((len(block), len(other)), dtype=np.int32)
        for w in range(words.shape[1]):
            dist += np.bitwise_count(block[:, None, w] ^ other[None, :, w])
        yield start, dist


def pairs_within(words: np.ndarray, other: np.ndarray, max_distance: int, chunk: int = 512):
    """Yield (i, j) index arrays of rows of ``words`` and ``other`` within ``max_distance`` bits."""
    for start, dist in _distance_blocks(words, other, chunk):
        i, j = np.nonzero(dist <= max_distance)
        yield i + start, j


def nearest(words: np.ndarray, other: np.ndarray, *, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``words``: the index of and the distance in bits to the nearest row of ``other``.

    ``exclude_self``: ``words`` and ``other`` are the same rows; an image is not its own neighbour.
    """
    index, distance = [], []
    for start, dist in _distance_blocks(words, other):
        if exclude_self:
            rows = np.arange(len(dist))
            dist[rows, rows + start] = np.iinfo(dist.dtype).max
        index.append(dist.argmin(1))
        distance.append(dist.min(1))
    return np.concatenate(index), np.concatenate(distance)


def near_duplicate_clusters(phashes: pd.Series, max_distance: int) -> np.ndarray:
    """Cluster ids: connected components of the "within ``max_distance`` bits" graph."""
    n = len(phashes)
    if n == 0:
        return np.zeros(0, dtype=int)
    words = phash_words(phashes)
    rows, cols = [], []
    for i, j in pairs_within(words, words, max_distance):
        rows.append(i)
        cols.append(j)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _assign_clusters(frame: pd.DataFrame, shares: dict[str, float], seed: int,
                     placed: pd.DataFrame | None = None) -> pd.Series:
    """Assign each cluster of ``frame`` to a split so that each class is split by ``shares``.

    ``placed``: rows whose split is already fixed (column ``split``); they count towards each
    class's shares, so the rest make up the difference.
    """
    rng = np.random.default_rng(seed)
    clusters = frame.groupby("cluster").agg(size=("label", "size"), label=("label", lambda s: s.mode().iloc[0]))
    clusters["tiebreak"] = rng.permutation(len(clusters))
    clusters = clusters.sort_values(["size", "tiebreak"], ascending=[False, True])
    placed = placed if placed is not None else frame.iloc[:0].assign(split="")
    totals = pd.concat([frame["label"], placed["label"]]).value_counts()
    filled = {(lab, s): 0 for lab in totals.index for s in shares}
    for (lab, s), n in placed.groupby(["label", "split"]).size().items():
        filled[(lab, s)] += int(n)
    assignment = {}
    for cid, row in clusters.iterrows():
        # The split with the largest remaining deficit for this class takes the cluster.
        deficits = {s: shares[s] * totals[row.label] - filled[(row.label, s)] for s in shares}
        best = max(deficits, key=lambda s: (deficits[s], shares[s]))
        assignment[cid] = best
        filled[(row.label, best)] += row["size"]
    return frame["cluster"].map(assignment)


def split_without_leakage(
    manifest: pd.DataFrame,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    near_duplicate_distance: int = 40,
    seed: int = 0,
) -> pd.DataFrame:
    """Add ``split``, ``cluster``, ``excluded_reason``, ``near_dup_in_train`` and ``train_distance`` to a manifest.

    Args:
        manifest: rows from :func:`btc.data.manifest.build_manifest`.
        val_fraction: share of each class for validation.
        test_fraction: share of each class for test, when the data has no Testing folder.
        near_duplicate_distance: pHash Hamming distance (of 256 bits) that makes two images near duplicates.
        seed: tie-break seed; the same seed gives the same split.

    Returns:
        A copy of the manifest; ``split`` is ``train``, ``val``, ``test`` or ``excluded``.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in (0, 1) and sum below 1"
        )
    df = manifest.sort_values("path", ignore_index=True).copy()
    df["split"] = "excluded"
    df["excluded_reason"] = np.where(df["readable"], "", "unreadable: " + df["error"].astype(str))
    df["cluster"] = -1
    df["near_dup_in_train"] = False
    df["train_distance"] = pd.array([pd.NA] * len(df), dtype="Int64")

    usable = df["readable"].to_numpy().copy()
    labels_of_sha = df[usable].groupby("sha256")["label"].agg(lambda s: sorted(set(s)))
    conflicting = labels_of_sha[labels_of_sha.map(len) > 1]
    conflict = usable & df["sha256"].isin(conflicting.index).to_numpy()
    if conflict.any():
        filed_as = df.loc[conflict, "sha256"].map(conflicting.map(" and ".join))
        df.loc[conflict, "excluded_reason"] = "label conflict: the same image is filed as " + filed_as
    usable &= ~conflict
    _require_images_per_class(df, usable)
    # the copy in a given Testing folder is kept, so the dataset's own test set stays whole; else the first path
    candidates = df[usable]
    first_of_sha = candidates.iloc[np.lexsort((candidates["path"], candidates["source_split"] != "test"))] \
        .drop_duplicates("sha256")
    dup = usable & ~df.index.isin(first_of_sha.index)
    keeper = df.loc[first_of_sha.index].set_index("sha256")["path"]
    df.loc[dup, "excluded_reason"] = "exact duplicate of " + df.loc[dup, "sha256"].map(keeper)
    usable &= ~dup

    kept = df[usable]
    df.loc[usable, "cluster"] = near_duplicate_clusters(kept["phash"], near_duplicate_distance)
    has_test_folder = (kept["source_split"] == "test").any()
    if has_test_folder and not (kept["source_split"] != "test").any():
        raise ValueError("every usable image comes from a Testing folder: there is nothing to train on")
    if has_test_folder:
        given_test = usable & (df["source_split"] == "test")
        df.loc[given_test, "split"] = "test"
        pool = usable & ~given_test
        # A cluster that reaches into the given test set cannot be moved there; keep it in train
        # (never in val, which chooses the epoch and fits the temperature) and flag the test images
        # it touches instead.
        touching = pool & df["cluster"].isin(df.loc[given_test, "cluster"])
        df.loc[touching, "split"] = "train"
        rest = pool & ~touching
        df.loc[rest, "split"] = _assign_clusters(
            df[rest], {"train": 1 - val_fraction, "val": val_fraction}, seed, placed=df[touching]
        )
    else:
        df.loc[usable, "split"] = _assign_clusters(
            df[usable], {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}, seed
        )
    _distances_to_training(df, near_duplicate_distance)
    _warn_empty_splits(df)
    return df


def given_test_rows(split: pd.DataFrame) -> pd.Series:
    """Rows of a dataset's own Testing folder kept as its test split (their near copies of training images
    are flagged ``near_dup_in_train``, not moved); all False for a manifest or a split btc made itself."""
    if not {"source_split", "split"} <= set(split.columns):
        return pd.Series(False, index=split.index)
    return (split["source_split"].astype(str) == "test") & (split["split"] == "test")


def _require_images_per_class(df: pd.DataFrame, usable: np.ndarray) -> None:
    """Stop, naming the class, when a class (or the whole dataset) has no image left to split."""
    counts = df.loc[usable, "label"].value_counts()
    if counts.empty:
        reasons = df["excluded_reason"].str.split(":").str[0].value_counts()
        raise ValueError("no usable image to split: " + ", ".join(f"{n} {why}" for why, n in reasons.items()))
    empty = sorted(set(df["label"]) - set(counts.index))
    if empty:
        rows = df[df["label"] == empty[0]]
        raise ValueError(
            f"class {empty[0]!r} has no usable image: all {len(rows)} of its files are excluded "
            f"(first: {rows['path'].iloc[0]}: {rows['excluded_reason'].iloc[0]})")


def _warn_empty_splits(df: pd.DataFrame) -> None:
    counts = pd.crosstab(df["label"], df["split"]).reindex(columns=list(SPLITS), fill_value=0)
    counts = counts[counts.sum(axis=1) > 0]
    given_test = given_test_rows(df).any()  # the test split is the dataset's Testing folder (its usable images)
    for label, row in counts.iterrows():
        for split in SPLITS:
            if row[split] == 0:
                why = ("(the dataset's Testing folder has none)" if split == "test" and given_test
                       else f"({int(row.sum())} usable images in all): too few to split")
                log.warning("class %r has no images in %s %s", label, split, why)


def _distances_to_training(df: pd.DataFrame, max_distance: int) -> None:
    """``train_distance``: bits from each test image to the nearest train/val image; a near duplicate at or under ``max_distance``."""
    test = df["split"] == "test"
    if not test.any() or not df["split"].isin(["train", "val"]).any():
        return
    flagged = flag_near_duplicates(df[test], df, max_distance)
    df.loc[test, "train_distance"] = flagged["train_distance"]
    df.loc[test, "near_dup_in_train"] = flagged["near_dup_in_train"]


def flag_near_duplicates(rows: pd.DataFrame, split: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """``rows`` from elsewhere (a held-out folder, say) with ``train_distance`` and ``near_dup_in_train``
    measured against the train and validation images of ``split``, the split a model was trained on.

    Evaluation then reports the clean subset and accuracy by distance for them too.
    """
    if "split" not in split:
        raise ValueError("not a split (no 'split' column): pass the split.parquet the model was trained on")
    seen = split[split["split"].isin(["train", "val"])]
    if seen.empty:
        raise ValueError("the split has no train or val images to compare against")
    out = rows.copy()
    _, distance = nearest(phash_words(out["phash"]), phash_words(seen["phash"]))
    out["train_distance"] = pd.array(distance, dtype="Int64")
    out["near_dup_in_train"] = distance <= max_distance
    return out


def split_summary(split: pd.DataFrame) -> pd.DataFrame:
    """Counts per split and class (the table ``btc data split`` prints)."""
    return pd.crosstab(split["split"], split["label"], margins=True, margins_name="total")
