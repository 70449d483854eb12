"""What leakage is worth: the same model trained and tested on a leakage-free and on a leaky split.

For each near-duplicate threshold it splits the same images with ``split_without_leakage``
(40 bits: the default; 0 bits: only identical pHashes linked, i.e. a random split stratified
by class, exact copies still dropped) after pooling every image (a ``Testing`` folder
included, so both splits draw their own test set), trains the configured model on it and evaluates on its
test split. Prints a markdown table: test images that have a training or validation image
within 40 bits, best validation macro-F1, test accuracy and macro-F1, and the accuracy by bits
to the nearest training image. Example (the notebook baseline the issue quotes)::

    .venv/bin/python benchmarks/leakage.py ../shared/data/brain-tumor-mri --arch plain_cnn --epochs 12

Test numbers are reported, never used to choose anything.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from arguments import positive_int
from btc.config import load_config
from btc.data.manifest import build_manifest
from btc.data.split import split_without_leakage
from btc.evaluate import evaluate_predictor, format_bands, rows_to_evaluate
from btc.predict import Predictor
from btc.training import train_model


def run(manifest, threshold: int, cfg, work: Path) -> dict:
    near = cfg.data.near_duplicate_distance  # a test image this close to a training image is a near duplicate of it
    start = time.perf_counter()
    split = split_without_leakage(manifest, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                                  near_duplicate_distance=threshold, seed=cfg.data.seed)
    result = train_model(cfg, split, work / f"bits-{threshold}", progress=False)
    test = rows_to_evaluate(split, "test")
    report = evaluate_predictor(Predictor.load(result.model_path), test)
    share = (test["train_distance"] <= near).mean()
    return {"threshold (bits)": threshold, f"test images within {near} bits of training": f"{share:.1%}",
            "val macro-F1": f"{max(h['val_macro_f1'] for h in result.history):.3f}",
            "test accuracy": f"{report['accuracy']:.3f}", "test macro-F1": f"{report['macro_f1']:.3f}",
            "accuracy by bits to training": format_bands(report["by_train_distance"]),
            "minutes": f"{(time.perf_counter() - start) / 60:.1f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="dataset folder")
    parser.add_argument("--thresholds", type=int, nargs="+", help="default: data.near_duplicate_distance and 0 "
                        "(each once: the same threshold twice would train the same run twice)")
    parser.add_argument("--arch", default="compact_cnn")
    parser.add_argument("--epochs", type=positive_int, help="default: the config's")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[],
                        help="config override section.key=value (repeatable)")
    args = parser.parse_args()
    if args.thresholds and (bad := [t for t in args.thresholds if not 0 <= t <= 256]):
        parser.error(f"--thresholds {bad[0]}: expected bits between 0 and 256")
    thresholds = list(dict.fromkeys(args.thresholds or []))  # each once, in the order given

    overrides = [f"model.arch={args.arch}", *args.overrides] + (
        [f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    # Every image into one pool: a dataset's own Testing folder would otherwise be the test set of every
    # threshold, and the "random" split would be tested on the same images as the leakage-free one.
    manifest = build_manifest(args.data, progress=False).assign(source_split="")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, overrides + [f"output_dir={tmp}"])
        for t in thresholds or [cfg.data.near_duplicate_distance, 0]:
            rows.append(run(manifest, t, cfg, Path(tmp)))
            print(f"threshold {t}: done in {rows[-1]['minutes']} min", flush=True)
    print(f"\n{args.arch}, {cfg.train.epochs} epochs, {cfg.data.image_size} px\n")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(map(str, row.values())) + " |")


if __name__ == "__main__":
    main()
