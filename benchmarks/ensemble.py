"""What averaging trained models is worth: validation macro-F1 of each run and of their average.

Give it run folders written by ``btc train`` (each holds ``model.pt`` and ``split.parquet``); all
must share one split. It predicts the validation images with each model (calibrated
probabilities, each at its own input size) and prints a markdown table: each model alone, all of
them averaged, and, with ``--subsets``, the best-scoring subset (picked on validation itself, so
flattered by it: a ceiling, not an estimate). Example::

    .venv/bin/python benchmarks/ensemble.py /tmp/run_a /tmp/run_b /tmp/run_c --subsets

Run it from the folder the runs were trained from (a split names images by the path it was
given). Only validation is read; the test split is never used to choose.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from btc.data.cache import decode_all
from btc.evaluate import rows_to_evaluate
from btc.predict import Predictor
from btc.training import labels_of


def shared_split(runs: list[Path]) -> pd.DataFrame:
    """The one split every run was trained on; a clear error names the first that differs."""
    splits = [pd.read_parquet(run / "split.parquet") for run in runs]
    # by content, not path: the same images may be named relative to different folders
    key = lambda s: s.sort_values(["sha256", "split"])[["sha256", "split"]].reset_index(drop=True)  # noqa: E731
    first = key(splits[0])
    for run, split in zip(runs[1:], splits[1:]):
        if not key(split).equals(first):
            raise SystemExit(f"{run} was trained on another split than {runs[0]}; averaging needs one split")
    return splits[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with model.pt and split.parquet")
    parser.add_argument("--subsets", action="store_true", help="also report the best subset (2^n - n - 1 of them)")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "model.pt").is_file() or not (run / "split.parquet").is_file():
            raise SystemExit(f"{run} is not a run folder: it needs model.pt and split.parquet")
    if len({run.resolve() for run in args.runs}) < len(args.runs):
        raise SystemExit("a run folder is given twice; each model should count once")
    rows = rows_to_evaluate(shared_split(args.runs), "val")
    y = labels_of(rows)
    probs, images = {}, {}
    for run in args.runs:
        predictor = Predictor.load(run / "model.pt")
        size = predictor.image_size
        if size not in images:
            images[size] = list(decode_all(list(rows["path"]), size, progress=False))
        probs[str(run)] = predictor.predict_proba(images[size])
    score = lambda names: f1_score(y, np.mean([probs[n] for n in names], 0).argmax(1), average="macro")  # noqa: E731
    print(f"{len(rows)} validation images\n\n| models | validation macro-F1 |\n|---|---|")
    for name in probs:
        print(f"| {name} | {score([name]):.4f} |")
    print(f"| all {len(probs)} averaged | {score(list(probs)):.4f} |")
    if args.subsets and len(probs) <= 2:
        print(f"\n--subsets: with {len(probs)} runs the only subset of two or more is all of them (above); "
              "it needs 3 or more runs")
    if args.subsets and len(probs) > 2:
        combos = [c for r in range(2, len(probs) + 1) for c in itertools.combinations(probs, r)]
        best = max(combos, key=score)
        print(f"| best of {len(combos)} subsets, picked on validation: {', '.join(best)} | {score(best):.4f} |")


if __name__ == "__main__":
    main()
