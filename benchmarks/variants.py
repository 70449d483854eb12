"""Train configuration variants on one split; print each one's validation and test macro-F1.

Each ``--variant`` is a name, then ``=`` and the config overrides ``btc train -s`` takes, separated
by spaces (a bare name trains the defaults). ``-s`` overrides apply to every variant. All variants
share one leakage-free split of DATA (a dataset folder, a manifest or a split ``.parquet``), so
the split settings (``data.seed``, ``data.val_fraction``, ...) go in ``-s``, not in a variant.
Example (the table in the README's "on a GPU" section; a variant that starts after
``--time-budget`` seconds is skipped and listed as such)::

    python benchmarks/variants.py ../shared/data/brain-tumor-mri -s train.device=cuda \\
        --variant default \\
        --variant "resnet18_224=model.arch=resnet18 data.image_size=224 train.epochs=40 train.lr=1e-3"

Choose on the validation column. The test columns are there to report the chosen variant, and
every other, without choosing on them: a variant picked for its test score is tuned on the test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from btc.config import ConfigError, load_config
from btc.evaluate import evaluate_predictor, rows_to_evaluate
from btc.predict import Predictor
from btc.training import check_new_run_folder, train_model

SPLIT_SETTINGS = ("val_fraction", "test_fraction", "near_duplicate_distance", "seed")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME`` or ``NAME=key=value key=value``: the name and its overrides; a clear error otherwise."""
    name, _, rest = text.partition("=")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "._-" for c in name):
        raise argparse.ArgumentTypeError(f"{text!r}: a variant starts with a name of letters, digits, '.', '_' "
                                         "or '-', then '=' and its overrides")
    try:
        overrides = shlex.split(rest)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"variant {name!r}: {err}") from None
    return name, overrides


def variant_configs(variants: list[tuple[str, list[str]]], shared: list[str], out: Path) -> dict:
    """Each variant's config, all checked before anything trains: valid, one split, a new run folder each."""
    try:
        base = load_config(None, shared)
    except ConfigError as err:
        raise SystemExit(f"-s: {err}") from None
    configs = {}
    for name, overrides in variants:
        try:
            cfg = load_config(None, [f"output_dir={out}", *shared, *overrides])
        except ConfigError as err:
            raise SystemExit(f"variant {name!r}: {err}") from None
        changed = [k for k in SPLIT_SETTINGS if getattr(cfg.data, k) != getattr(base.data, k)]
        if changed:
            raise SystemExit(f"variant {name!r} changes data.{', data.'.join(changed)}: variants share one split; "
                             "give split settings with -s")
        try:
            check_new_run_folder(out / name)
        except ValueError as err:
            raise SystemExit(f"variant {name!r}: {err}") from None
        configs[name] = cfg
    return configs


def load_split(data: Path, base, shared: list[str]):
    """The split of ``data`` and the config with the split settings it was made with, as ``btc train`` has
    them: a split file as it is (its own settings; ``-s`` ones that differ are refused), a folder or
    manifest split by ``base.data``. A bad path or file exits with ``btc train``'s message."""
    import typer

    from btc.cli import prepare_split

    try:
        return prepare_split(data, base, shared)
    except typer.Exit as stop:  # the message is printed already
        raise SystemExit(stop.exit_code) from None


def run_variant(cfg, split: pd.DataFrame, run_dir: Path) -> dict:
    """Train one variant and score it on validation and test (test for reporting, never for choosing)."""
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_model(cfg, split, run_dir, progress=False)
    seconds = time.perf_counter() - start
    best = max(result.history, key=lambda h: h["val_macro_f1"])
    test = evaluate_predictor(Predictor.from_checkpoint(result.model_path, device=str(result.device)),
                              rows_to_evaluate(split, "test"))
    clean = test.get("clean")
    return {"epochs_run": len(result.history), "best_epoch": best["epoch"], "train_s": round(seconds, 1),
            "images_per_s": round(max(h["images_per_s"] for h in result.history)),
            "val_macro_f1": round(best["val_macro_f1"], 4), "test_macro_f1": round(test["macro_f1"], 4),
            "clean_test_macro_f1": round(clean["macro_f1"], 4) if clean else None,
            "test_ece_raw": round(test["ece_before_temperature"], 4), "test_ece": round(test["ece"], 4),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="dataset folder, manifest or split .parquet")
    parser.add_argument("--variant", dest="variants", type=parse_variant, action="append", required=True,
                        metavar="NAME[=OVERRIDES]", help="repeat for each variant")
    parser.add_argument("-s", "--set", dest="shared", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every variant (repeatable)")
    parser.add_argument("--out", type=Path, help="keep the runs in OUT/<variant> (default: a temporary folder)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no variant after this many seconds; later ones are listed as skipped")
    parser.add_argument("--jsonl", type=Path, help="also append each finished variant's row to this file")
    args = parser.parse_args()
    names = [name for name, _ in args.variants]
    if len(set(names)) < len(names):
        parser.error(f"variant names must differ: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time-budget: {args.time_budget}: expected a number of seconds above 0")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        configs = variant_configs(args.variants, args.shared, out)
        split, base = load_split(args.data, load_config(None, args.shared), args.shared)
        made_with = {k: getattr(base.data, k) for k in SPLIT_SETTINGS}  # a split file's own, recorded by each run
        configs = {name: cfg.model_copy(update={"data": cfg.data.model_copy(update=made_with)})
                   for name, cfg in configs.items()}
        rows = []
        for name, overrides in args.variants:
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                rows.append({"variant": name, "overrides": " ".join(overrides), "skipped": True})
                continue
            row = {"variant": name, "overrides": " ".join(overrides) or "(none)",
                   **run_variant(configs[name], split, out / name)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    shared = " ".join(args.shared) or "none"
    print(f"\n{len(split)} images in the split | shared overrides: {shared} | chosen on validation\n")
    print("| variant | overrides | epochs (best) | train s | train img/s | val macro-F1 | test macro-F1 "
          "| clean test macro-F1 | test ECE raw / calibrated | peak GPU MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("skipped"):
            print(f"| {r['variant']} | {r['overrides']} | skipped: past --time-budget | | | | | | | |")
            continue
        clean = "n/a" if r["clean_test_macro_f1"] is None else f"{r['clean_test_macro_f1']:.4f}"
        gpu = "n/a" if r["peak_gpu_mib"] is None else r["peak_gpu_mib"]
        print(f"| {r['variant']} | {r['overrides']} | {r['epochs_run']} ({r['best_epoch']}) | {r['train_s']} "
              f"| {r['images_per_s']} | {r['val_macro_f1']:.4f} | {r['test_macro_f1']:.4f} | {clean} "
              f"| {r['test_ece_raw']:.4f} / {r['test_ece']:.4f} | {gpu} |")


if __name__ == "__main__":
    main()
