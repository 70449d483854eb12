"""Measure what the drift report says on real data: same-distribution, shifted and source-split windows.

    python -m monitoring.measure_drift --data /work/shared/data/brain-tumor-mri/Training \\
        --model /tmp/real_run1/model.pt --out reports/drift_measure

A random half of the images (``<class>/*.jpg``) is the reference. The current sets are:

* the other half;
* windows of 200 and 50 images from it (the false-alarm rate at service-sized windows);
* the other half 20 % brighter;
* tumour images only (class mix, and a different source in the Kaggle data);
* reference notumor only against current tumour only, and against current notumor only.

Prints one JSON line per case and writes ``results.json`` and the HTML reports into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from btc.data.images import decode_gray
from btc.predict import Predictor
from btc.reference import features_from_log, log_records, records_frame, reference_from_records
from monitoring.drift import drift_report


def _brighter(gray: np.ndarray) -> np.ndarray:
    return np.clip(gray.astype(np.float64) * 1.2, 0, 255).astype(np.uint8)


def _records(predictor, paths: list[Path], transform=None, chunk: int = 256) -> list[dict]:
    out = []
    for start in range(0, len(paths), chunk):
        grays = [decode_gray(p)[0] for p in paths[start:start + chunk]]
        out += log_records(predictor, [transform(g) for g in grays] if transform else grays)
    return out


def measure(data: Path, model: str, out: Path, *, per_class: int | None = None, windows: int = 8,
            seed: int = 0) -> dict:
    """Run every case and return its verdict fields, keyed by case name."""
    start = time.time()
    predictor = Predictor.load(model)
    paths = sorted(data.glob("*/*.jpg"))
    if per_class:
        by_class: dict[str, list[Path]] = {}
        for path in paths:
            by_class.setdefault(path.parent.name, []).append(path)
        paths = [p for c in sorted(by_class) for p in by_class[c][:per_class]]
    if not paths:
        raise SystemExit(f"no <class>/*.jpg images under {data}")
    labels = np.array([p.parent.name for p in paths])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    ref_idx, cur_idx = np.sort(order[:len(paths) // 2]), np.sort(order[len(paths) // 2:])
    ref = _records(predictor, [paths[i] for i in ref_idx])
    cur = _records(predictor, [paths[i] for i in cur_idx])
    bright = _records(predictor, [paths[i] for i in cur_idx], _brighter)
    inference_s = time.time() - start
    full = reference_from_records(ref, source="random half")
    notumor_ref = reference_from_records([r for r, i in zip(ref, ref_idx) if labels[i] == "notumor"], source="notumor")
    tumour = [r for r, i in zip(cur, cur_idx) if labels[i] != "notumor"]
    notumor = [r for r, i in zip(cur, cur_idx) if labels[i] == "notumor"]
    shuffled = [cur[i] for i in rng.permutation(len(cur))]
    cases = [("other_half", full, cur), ("brightness_plus20", full, bright), ("tumour_only", full, tumour),
             ("ref_notumor_vs_tumour", notumor_ref, tumour), ("ref_notumor_vs_notumor", notumor_ref, notumor)]
    cases += [(f"window{size}_{k}", full, shuffled[k * size:(k + 1) * size])
              for size in (200, 50) for k in range(windows) if (k + 1) * size <= len(shuffled)]
    accuracy = float(np.mean([r["predicted"] == labels[i] for r, i in zip(cur, cur_idx)]))
    results = {"model": model, "images": len(paths), "accuracy_current_half": round(accuracy, 4),
               "inference_seconds": round(inference_s)}
    for name, reference, records in cases:
        t = time.time()
        verdict = drift_report(reference.features, features_from_log(records_frame(records), reference),
                               out_html=out / f"{name}.html")
        results[name] = {"n_reference": verdict.n_reference, "n_current": verdict.n_current, "share": verdict.share,
                         "groups": verdict.group_shares, "drifted": verdict.drifted,
                         "drifted_columns": verdict.drifted_columns, "seconds": round(time.time() - t, 1)}
        print(name, json.dumps(results[name]), flush=True)
    results["total_seconds"] = round(time.time() - start)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of <class>/*.jpg images")
    parser.add_argument("--model", required=True, help="model.pt path or MLflow model URI")
    parser.add_argument("--out", type=Path, default=Path("reports/drift_measure"))
    parser.add_argument("--per-class", type=int, default=None, help="use only the first N images of each class")
    parser.add_argument("--windows", type=int, default=8, help="windows of 200 and of 50 images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(args.data, args.model, args.out, per_class=args.per_class, windows=args.windows)
    print(f"accuracy {results['accuracy_current_half']}, total {results['total_seconds']} s -> {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
