"""``btc data validate DIR``: Great Expectations checks before any training, as a command.

Registered by :mod:`btc.cli` with ``data_app.command("validate")(validate_command)``. It
builds the manifest, splits it without leakage (unless ``--no-split``), runs
:func:`btc.validation.validate_dataset`, prints one line per expectation and the Data Docs
path. Exit codes: 0 the data passed (warnings allowed), 1 it failed (an expectation, or a
folder layout that cannot be read as a dataset, e.g. an unknown class folder), 2 the command
was misused (missing reference file or one whose ranges cannot be checked against, e.g. min
above max; unknown ``--warn-only`` name; ``--workers`` below 1; a ``--docs-dir`` that cannot be
a folder; invalid config). These are checked before the dataset is read.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer

OBSERVED_WIDTH = 90


from btc.cli_common import config_or_fail as _load_config  # noqa: E402
from btc.cli_common import fail as _error  # noqa: E402
from btc.cli_common import writable_folder  # noqa: E402


def _dataset_frame(data_dir: Path, data_config, *, split: bool, workers: int) -> pd.DataFrame:
    """The manifest of ``data_dir``, split without leakage when ``split``."""
    from btc.data.manifest import build_manifest, unreadable
    from btc.data.split import split_without_leakage

    try:
        manifest = build_manifest(data_dir, workers=workers, progress=sys.stderr.isatty())
    except ValueError as err:  # DatasetLayoutError and unknown class folders
        raise _error(f"{data_dir} is not a valid dataset: {err}", 1) from None
    for row in unreadable(manifest).itertuples():  # files_readable names some; here is every one and why
        typer.secho(f"unreadable file {row.path}: {row.error}", fg=typer.colors.YELLOW, err=True)
    _name_label_conflicts(manifest)
    if not split:
        return manifest
    d = data_config
    try:
        return split_without_leakage(manifest, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                     near_duplicate_distance=d.near_duplicate_distance, seed=d.seed)
    except ValueError as err:  # no usable image at all, or a class with none
        raise _error(f"{data_dir} cannot be split: {err}", 1) from None


def _name_label_conflicts(manifest: pd.DataFrame) -> None:
    """Every file whose bytes are also filed under another class (no_label_conflicts names some)."""
    from btc.validation import label_conflicts

    sha256 = manifest["sha256"].astype(str).where(manifest["readable"].astype(bool))
    conflicting = manifest[label_conflicts(manifest["label"].astype(str), sha256).to_numpy()]
    for sha, rows in conflicting.groupby("sha256", sort=False):
        filed = ", ".join(f"{path} ({label})" for path, label in zip(rows["path"], rows["label"]))
        typer.secho(f"label conflict, the same image under {rows['label'].nunique()} classes: {filed}",
                    fg=typer.colors.YELLOW, err=True)


def _dataset_summary(frame: pd.DataFrame) -> list[str]:
    """Counts a person checks first: images, readability, classes and (when split) splits."""
    shares = frame["label"].value_counts(normalize=True).sort_index()
    counts = frame["label"].value_counts().sort_index()
    lines = [
        f"{len(frame)} images, {int((~frame['readable']).sum())} unreadable",
        "classes: " + ", ".join(f"{c} {counts[c]} ({shares[c]:.1%})" for c in counts.index),
    ]
    if "split" in frame:
        train = frame.loc[frame["split"] == "train", "label"].value_counts()
        lines.append("train split: " + ", ".join(f"{c} {train.get(c, 0)} ({train.get(c, 0) / max(train.sum(), 1):.1%})"
                                                 for c in counts.index))
        split_counts = frame["split"].value_counts()
        duplicates = int(frame["excluded_reason"].str.startswith("exact duplicate").sum())
        conflicts = int(frame["excluded_reason"].str.startswith("label conflict").sum())
        counts_text = ", ".join(f"{s} {split_counts.get(s, 0)}" for s in ("train", "val", "test", "excluded"))
        lines.append(f"split: {counts_text} ({duplicates} exact duplicates, {conflicts} label conflicts, "
                     f"{int((frame['split'] == 'excluded').sum()) - duplicates - conflicts} unreadable excluded)")
        lines.append(f"test images with a near duplicate in train/val: {int(frame['near_dup_in_train'].sum())}")
    return lines


def _table(report) -> list[str]:
    width = max(len(o.name) for o in report.outcomes)
    lines = [f"{'expectation':{width}}  result  observed"]
    for o in report.outcomes:
        observed = o.observed if len(o.observed) <= OBSERVED_WIDTH else o.observed[:OBSERVED_WIDTH - 3] + "..."
        lines.append(f"{o.name:{width}}  {o.status:6}  {observed}")
    return lines


def validate_command(
    data_dir: Annotated[Path, typer.Argument(
        help="dataset folder: Training/ and Testing/ class folders, or <class>/ folders"
    )],
    reference: Annotated[Optional[Path], typer.Option(
        "--reference",
        help="image-statistics reference JSON; default validation.reference or expectations/reference_stats.json",
    )] = None,
    warn_only: Annotated[Optional[list[str]], typer.Option(
        "--warn-only", help="expectation whose failure is only a warning (repeatable)"
    )] = None,
    docs_dir: Annotated[Optional[Path], typer.Option(
        "--docs-dir", help="folder for the Data Docs site; default $BTC_HOME/reports/data_docs"
    )] = None,
    split: Annotated[bool, typer.Option(
        "--split/--no-split", help="validate the leakage-free split (default) or the folders as delivered"
    )] = True,
    workers: Annotated[int, typer.Option(min=1, help="decoding threads")] = 4,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="override, e.g. -s validation.min_class_share=0.05 (repeatable)"
    )] = None,
) -> None:
    """Validate a dataset with Great Expectations; exit 0 if it passes, 1 if it fails."""
    from btc.data.stats import load_reference
    from btc.paths import reports_dir
    from btc.validation import DEFAULT_REFERENCE_PATH, check_warn_only, reference_ranges, validate_dataset

    started = time.perf_counter()
    cfg = _load_config(config, set_)
    docs_dir = writable_folder(docs_dir or reports_dir() / "data_docs", "Data Docs folder (--docs-dir)")
    reference = reference or cfg.validation.reference or DEFAULT_REFERENCE_PATH
    try:  # a reference whose ranges cannot be checked against is a configuration error, told before any work
        ref = load_reference(reference)
        reference_ranges(ref, Path(reference))
        check_warn_only(set(cfg.validation.warn_only) | set(warn_only or ()))
    except ValueError as err:
        raise _error(str(err), 2) from None
    frame = _dataset_frame(data_dir, cfg.data, split=split, workers=workers)
    for line in _dataset_summary(frame):
        typer.echo(line)

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    try:
        report = validate_dataset(frame, reference=ref, config=cfg.validation, warn_only=warn_only or (),
                                  data_docs_dir=docs_dir, near_duplicate_distance=cfg.data.near_duplicate_distance,
                                  workers=workers)
    except ValueError as err:
        raise _error(str(err), 2) from None
    for line in _table(report):
        typer.echo(line)
    typer.echo(f"Data Docs: {report.data_docs_index}")
    seconds = time.perf_counter() - started
    if report.success:
        warned = f" with warnings: {', '.join(report.warnings)}" if report.warnings else ""
        typer.secho(f"data validation passed{warned} ({seconds:.1f}s)", fg=typer.colors.GREEN)
        return
    typer.secho(f"data validation FAILED: {', '.join(report.failures)} ({seconds:.1f}s)", fg=typer.colors.RED)
    accept = " ".join(f"--warn-only {name}" for name in report.failures)
    typer.echo(f"if a failure is a known, accepted issue, make it a warning: {accept}")
    raise typer.Exit(1)
