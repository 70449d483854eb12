"""Data validation with Great Expectations: is this folder fit to train on?

One function, :func:`validate_dataset`, checks a manifest (or a split of it) before any
training: labels, class balance, decodability, image size and mode, exact duplicates inside
a source folder, exact or near duplicates leaking across train/val/test, and per-image
statistics against ranges learned from reference MRI (:mod:`btc.data.stats`), so a folder
of photos or CT-like images is caught. It returns a :class:`ValidationReport` and writes
Great Expectations Data Docs (HTML) a person can read.

Why the suite is a JSON file with ``$PARAMETER`` placeholders: the checks are versioned
as data (``expectations/mri_manifest.json``, reviewed like code, shown verbatim in the Data
Docs), while thresholds that belong to a deployment (class share, size bounds, modes,
reference ranges) stay in :class:`btc.config.ValidationConfig` and the reference JSON. GX
fills the placeholders at run time (``expectation_parameters``), so changing a threshold
never means editing the suite. Each expectation carries ``meta.name``, the stable name used
by ``warn_only`` and in the report.

GX sees a *validation frame*, not the raw manifest: columns derived here so that each
check is one plain expectation (``label_share``, ``leaks_across_splits``, the statistics;
width, height, mode and statistics are null for unreadable files, which GX skips, so a
corrupt file fails ``files_readable`` only). Great Expectations is imported lazily: it takes
seconds to import and the CLI imports this module for every command.

Two expectations guard frames built outside btc's manifest more than its own output:
``labels_known`` (discovery already refuses an unknown class folder) and ``mode_supported``
(with the default ``allowed_modes``, a file of another mode is unreadable, so it fails
``files_readable``); narrowing ``validation.allowed_modes`` makes the latter bite.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from btc.config import ValidationConfig
from btc.data.manifest import phash_words
from btc.data.split import SPLITS, given_test_rows, pairs_within
from btc.data.stats import load_reference, statistics_frame
from btc.labels import CLASSES

EXPECTATIONS_DIR = Path(__file__).resolve().parents[1] / "expectations"
SUITE_PATH = EXPECTATIONS_DIR / "mri_manifest.json"
DEFAULT_REFERENCE_PATH = EXPECTATIONS_DIR / "reference_stats.json"
# Statistics whose ranges the suite checks (parameters <name>_min / <name>_max).
CHECKED_STATISTICS = ("mean", "contrast", "black_border_share", "entropy")
DOCS_SITE = "btc_data_docs"


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one expectation of the suite."""

    name: str
    expectation_type: str
    description: str
    success: bool
    warning_only: bool
    observed: str
    details: dict = field(default_factory=dict, repr=False)

    @property
    def status(self) -> str:
        """``PASS``, ``WARN`` (failed but accepted as a warning) or ``FAIL``."""
        if self.success:
            return "PASS"
        return "WARN" if self.warning_only else "FAIL"


@dataclass(frozen=True)
class ValidationReport:
    """Every expectation's outcome, the overall verdict and where the Data Docs are."""

    suite_name: str
    outcomes: tuple[ExpectationOutcome, ...]
    data_docs_index: Path
    rows: int

    @property
    def success(self) -> bool:
        """True when every expectation passed or is accepted as a warning."""
        return all(o.status != "FAIL" for o in self.outcomes)

    @property
    def failures(self) -> list[str]:
        """Names of the expectations that failed and are not accepted as warnings."""
        return [o.name for o in self.outcomes if o.status == "FAIL"]

    @property
    def warnings(self) -> list[str]:
        """Names of the expectations that failed but are accepted as warnings."""
        return [o.name for o in self.outcomes if o.status == "WARN"]

    def outcome(self, name: str) -> ExpectationOutcome:
        """The outcome of the expectation called ``name``."""
        for o in self.outcomes:
            if o.name == name:
                return o
        raise KeyError(f"no expectation named {name!r}; the suite has {', '.join(o.name for o in self.outcomes)}")

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (for logging as an artifact)."""
        return {
            "suite": self.suite_name, "success": self.success, "rows": self.rows,
            "data_docs_index": str(self.data_docs_index),
            "expectations": [
                {"name": o.name, "status": o.status, "success": o.success, "warning_only": o.warning_only,
                 "observed": o.observed}
                for o in self.outcomes
            ],
        }


# --- the suite ---------------------------------------------------------------------------------


def load_suite_spec(path: Path = SUITE_PATH) -> dict:
    """Read the suite JSON (GX's ExpectationSuite format) and check every expectation is named."""
    path = Path(path)
    spec = json.loads(path.read_text())
    unnamed = [e.get("type") for e in spec.get("expectations", []) if not (e.get("meta") or {}).get("name")]
    if unnamed:
        raise ValueError(f"suite {str(path)!r}: expectations without meta.name: {', '.join(map(str, unnamed))}")
    return spec


def expectation_names(path: Path = SUITE_PATH) -> list[str]:
    """The names of the suite's expectations, in the file's order."""
    return [e["meta"]["name"] for e in load_suite_spec(path)["expectations"]]


def suite_parameters(config: ValidationConfig, reference: dict,
                     source: str | Path = "the statistics reference") -> dict:
    """The values of the suite's ``$PARAMETER`` placeholders, from the config and the reference.

    Args:
        config: thresholds.
        reference: statistics ranges.
        source: where ``reference`` came from (its file), named when one of its ranges is unusable.

    Raises:
        ValueError: a range of the reference is unusable (see :func:`reference_ranges`). (Sides out
            of order are refused by :class:`~btc.config.ValidationConfig` itself.)
    """
    parameters = {
        "classes": list(CLASSES),
        "min_class_share": config.min_class_share,
        "min_side_px": config.min_side_px,
        "max_side_px": config.max_side_px,
        "allowed_modes": list(config.allowed_modes),
        "stats_mostly": config.stats_mostly,
    }
    for name, (low, high) in reference_ranges(reference, source).items():
        parameters[f"{name}_min"], parameters[f"{name}_max"] = low, high
    return parameters


def reference_ranges(reference: dict, source: str | Path = "the statistics reference") -> dict[str, tuple[float, float]]:
    """The ``(min, max)`` of each checked statistic, once it is known that every range can be checked against.

    A reference whose range is missing, not numeric, not finite or upside down (min above max)
    would make GX fail an expectation for a reason unrelated to the data, so it is refused
    as a configuration error instead.

    Args:
        reference: a statistics reference (:func:`btc.data.stats.load_reference`).
        source: the reference file, named in the error.

    Raises:
        ValueError: a range of :data:`CHECKED_STATISTICS` is missing or unusable; the message
            names ``source`` and the statistic.
    """
    source = f"statistics reference {str(source)!r}" if isinstance(source, Path) else source
    ranges = reference.get("ranges") if isinstance(reference, dict) else None
    ranges = ranges if isinstance(ranges, dict) else {}
    missing = [name for name in CHECKED_STATISTICS
               if not isinstance(ranges.get(name), (list, tuple)) or len(ranges[name]) != 2]
    if missing:
        raise ValueError(f"{source} lacks a [min, max] range for {', '.join(missing)}")
    checked = {}
    for name in CHECKED_STATISTICS:
        try:
            low, high = (float(v) for v in ranges[name])
        except (TypeError, ValueError):
            raise ValueError(f"{source}: the range of {name} is {ranges[name]!r}; "
                             "expected two numbers [min, max]") from None
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            why = "not finite" if not (math.isfinite(low) and math.isfinite(high)) else "min above max"
            raise ValueError(f"{source}: the range of {name} is [{low}, {high}] ({why}); "
                             "expected finite numbers with min <= max")
        checked[name] = (low, high)
    return checked


# --- the frame GX validates --------------------------------------------------------------------


def leaks_across_splits(splits: pd.Series, phashes: pd.Series, max_distance: int) -> np.ndarray:
    """Flag rows of train, val or test with an exact or near duplicate in another of them.

    Args:
        splits: the split of each row; rows not in train/val/test are never flagged.
        phashes: the rows' pHash hex strings (an exact copy has distance 0).
        max_distance: Hamming distance (bits) at or below which two images are near duplicates.

    Returns:
        A boolean array aligned with the rows.
    """
    splits = splits.to_numpy()
    flags = np.zeros(len(splits), dtype=bool)
    in_split = np.isin(splits, SPLITS) & (phashes.fillna("").to_numpy() != "")
    if len(set(splits[in_split])) < 2:
        return flags
    words = phash_words(phashes[in_split])
    members = splits[in_split]
    rows = np.flatnonzero(in_split)
    for name in set(members):
        mine, others = members == name, members != name
        for i, _ in pairs_within(words[mine], words[others], max_distance):
            flags[rows[mine][i]] = True
    return flags


def _label_share(labels: pd.Series, training: pd.Series) -> pd.Series:
    """Share of each row's class among the training rows with a known class (0 for a class with none;
    NaN for a row of an unknown class, left to ``labels_known``).

    Training rows are those training would see: readable, in the train split (in a manifest, the first
    of each set of identical files in the Training folder), so neither test images nor copies can prop
    up a class that is short of training images, and a class all of whose files are unusable scores 0.
    """
    shares = labels[training & labels.isin(CLASSES)].value_counts(normalize=True)
    return labels.map(shares).fillna(0.0).where(labels.isin(CLASSES)).astype(float)


def _class_missing_from_a_split(labels: pd.Series, splits: pd.Series, used: pd.Series) -> pd.Series:
    """True for each row of a known class that has no used image in train, val or test."""
    present = {(label, split) for label, split in zip(labels[used], splits[used])}
    missing = {c for c in CLASSES if any((c, s) not in present for s in SPLITS)}
    return labels.isin(missing)


def label_conflicts(labels: pd.Series, sha256: pd.Series) -> pd.Series:
    """True for each readable file whose bytes are also filed under another class."""
    classes_of = labels.groupby(sha256).nunique()
    return sha256.map(classes_of).gt(1).fillna(False).astype(bool)


def validation_frame(
    manifest_or_split: pd.DataFrame, *, near_duplicate_distance: int = 40, workers: int = 4
) -> pd.DataFrame:
    """The columns the suite checks, derived from a manifest or a split.

    Without a ``split`` column (a manifest), the dataset's own Training/Testing folders are
    the splits checked for leaks. Statistics columns are computed from the files unless the
    frame already has them.

    Args:
        manifest_or_split: rows of :func:`btc.data.manifest.build_manifest`, optionally with
            the columns :func:`btc.data.split.split_without_leakage` adds.
        near_duplicate_distance: pHash distance (of 256 bits) for a near duplicate.
        workers: decoding threads for the statistics.
    """
    df = manifest_or_split.reset_index(drop=True)
    readable = df["readable"].astype(bool)
    splits = df["split"] if "split" in df else df["source_split"].where(readable, "")
    # A dataset's own Testing images stay its test set, and the split marks those with a near copy in
    # training (near_dup_in_train) so evaluation reports them apart: a declared overlap, reported by its
    # own expectation (a warning by default), not an undeclared leak.
    given_test = given_test_rows(df)
    # unread bytes are no image: no hash, no copy (a zero-byte or truncated file has a sha256 all the same)
    sha256 = df["sha256"].astype(str).where(readable & (df["sha256"].astype(str) != ""))
    labels = df["label"].astype(str)
    if "split" in df:
        used = readable & splits.isin(SPLITS)
        training = used & (splits == "train")
        missing = _class_missing_from_a_split(labels, splits, used)
    else:  # the folders as delivered: training would read the first of each set of copies in Training/
        used = readable & ~sha256.duplicated()
        source = df["source_split"].astype(str)
        training = used & (source == "train") if (source == "train").any() else used
        missing = pd.Series(False, index=df.index)  # nothing is split yet
    frame = pd.DataFrame({
        "path": df["path"].astype(str),
        "label": labels,
        "label_share": _label_share(labels, training),
        "class_missing_from_a_split": missing,
        "label_conflict": label_conflicts(labels, sha256),
        "source_split": df["source_split"].astype(str),
        "split": splits.astype(str),
        "readable": readable,
        "width": df["width"].astype(float).where(readable),
        "height": df["height"].astype(float).where(readable),
        "mode": df["mode"].astype(object).where(readable),
        "sha256": sha256,
        "leaks_across_splits": leaks_across_splits(splits.where(~given_test, ""), df["phash"].where(readable, ""),
                                                   near_duplicate_distance),
        "given_test_near_copy_of_training": given_test & (df["near_dup_in_train"].fillna(False).astype(bool)
                                                          if "near_dup_in_train" in df else False),
    })
    if all(c in df for c in CHECKED_STATISTICS):
        stats = df[list(CHECKED_STATISTICS)].astype(float)
    else:
        stats = pd.DataFrame(np.nan, index=df.index, columns=list(CHECKED_STATISTICS))
        computed = statistics_frame(df.loc[readable, "path"], workers=workers)
        stats.loc[readable, :] = computed[list(CHECKED_STATISTICS)].to_numpy()
    for name in CHECKED_STATISTICS:
        frame[name] = stats[name].where(readable)
    return frame


# --- running GX --------------------------------------------------------------------------------


def _gx_context(data_docs_dir: Path):
    """An ephemeral GX context, quiet, whose only Data Docs site is ``data_docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(context.list_data_docs_sites()):  # the default site writes to a temp folder
        context.delete_data_docs_site(site)
    context.add_data_docs_site(DOCS_SITE, {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    return context


def _run_suite(context, frame: pd.DataFrame, spec: dict, parameters: dict, warn: set[str]):
    import great_expectations as gx

    spec = json.loads(json.dumps(spec))  # our copy: severities are set per run
    for expectation in spec["expectations"]:
        expectation["severity"] = "warning" if expectation["meta"]["name"] in warn else "critical"
    suite = context.suites.add(gx.ExpectationSuite(**spec))
    batch = context.data_sources.add_pandas("btc").add_dataframe_asset("images").add_batch_definition_whole_dataframe(
        "all_images"
    )
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="btc_data", data=batch, suite=suite))
    result_format = {
        "result_format": "SUMMARY", "unexpected_index_column_names": ["path"], "partial_unexpected_count": 5,
    }
    return definition.run(
        batch_parameters={"dataframe": frame}, expectation_parameters=parameters, result_format=result_format
    )


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_short(v) for v in value)
    return str(value)


def _error_message(exception_info: dict | None) -> str | None:
    """GX's exception message(s) for an expectation that could not be evaluated, else None."""
    info = exception_info or {}
    candidates = [info, *(v for v in info.values() if isinstance(v, dict))]  # top level or per metric
    messages = [c.get("exception_message") or "unknown error" for c in candidates if c.get("raised_exception")]
    return "; ".join(messages) or None


def _observed(result: dict, exception_info: dict | None) -> str:
    """A one-line, human-readable observed value of one expectation's result."""
    error = _error_message(exception_info)
    if error:
        return f"error: {error}"
    if "partial_missing_list" in result:
        missing = result["partial_missing_list"]
        return f"missing {_short(missing)}" if missing else "all present"
    if result.get("observed_value") is not None:
        return _short(result["observed_value"])
    if "unexpected_count" in result:
        checked = result.get("element_count", 0) - result.get("missing_count", 0)
        text = f"{result['unexpected_count']} of {checked} unexpected"
        counts = result.get("partial_unexpected_counts") or []
        # compound-column values (a split and a 64-hex hash) say less than the file names do
        values = [c["value"] for c in counts if not isinstance(c["value"], (list, tuple, dict))][:3]
        if values:
            text += f" (values {_short(values)})"
        examples = [r.get("path") for r in result.get("partial_unexpected_index_list") or []][:2]
        if examples:
            text += f", e.g. {', '.join(Path(p).name for p in examples if p)}"
        return text
    return "-"


def _outcomes(results, spec: dict, warn: set[str]) -> tuple[ExpectationOutcome, ...]:
    by_name = {r.expectation_config.meta["name"]: r for r in results.results}
    outcomes = []
    for expectation in spec["expectations"]:  # the suite file's order, not GX's
        name = expectation["meta"]["name"]
        r = by_name[name]
        details = json.loads(json.dumps(r.result, default=str))
        outcomes.append(ExpectationOutcome(
            name=name, expectation_type=expectation["type"], description=expectation.get("description", ""),
            success=bool(r.success), warning_only=name in warn,
            observed=_observed(r.result, r.exception_info), details=details,
        ))
    return tuple(outcomes)


def _build_docs(context, data_docs_dir: Path, suite_name: str) -> Path:
    context.build_data_docs(site_names=[DOCS_SITE])
    index = Path(data_docs_dir) / "index.html"
    if not index.is_file() or suite_name not in index.read_text(errors="replace"):
        raise RuntimeError(f"Data Docs were not written: {str(index)!r} is missing or does not mention {suite_name!r}")
    return index


def check_warn_only(warn: set[str] | list[str], suite_path: Path = SUITE_PATH) -> set[str]:
    """``warn`` as a set, when every name in it is an expectation of the suite.

    Raises:
        ValueError: a name is not in the suite; the message lists the names there are.
    """
    names = expectation_names(suite_path)
    unknown = sorted(set(warn) - set(names))
    if unknown:
        raise ValueError(
            f"unknown expectation {', '.join(map(repr, unknown))} in warn-only; expected one of {', '.join(names)}"
        )
    return set(warn)


def validate_dataset(
    manifest_or_split: pd.DataFrame,
    *,
    reference: dict | None = None,
    config: ValidationConfig | None = None,
    warn_only: Iterable[str] = (),
    data_docs_dir: Path,
    near_duplicate_distance: int = 40,
    suite_path: Path = SUITE_PATH,
    workers: int = 4,
) -> ValidationReport:
    """Validate a dataset with the GX suite and write Data Docs.

    Args:
        manifest_or_split: a manifest, or a split of one (see :func:`validation_frame`).
        reference: statistics ranges (:func:`btc.data.stats.learn_reference`); None: the
            file ``config.reference`` or else the shipped ``expectations/reference_stats.json``.
        config: thresholds; None: the defaults.
        warn_only: names of expectations whose failure is a warning, added to ``config.warn_only``.
        data_docs_dir: folder for the Data Docs site (``index.html`` at its top).
        near_duplicate_distance: pHash distance (of 256 bits) for a near duplicate.
        suite_path: the suite JSON.
        workers: decoding threads for the statistics.

    Returns:
        The report; ``report.success`` is False when an expectation not accepted as a warning failed.

    Raises:
        ValueError: a ``warn_only`` name is not in the suite, or a reference or threshold is invalid.
    """
    config = config or ValidationConfig()
    spec = load_suite_spec(suite_path)
    warn = check_warn_only(set(config.warn_only) | set(warn_only), suite_path)
    source = "the statistics reference"
    if reference is None:
        source = Path(config.reference or DEFAULT_REFERENCE_PATH)
        reference = load_reference(source)
    parameters = suite_parameters(config, reference, source)
    frame = validation_frame(manifest_or_split, near_duplicate_distance=near_duplicate_distance, workers=workers)
    data_docs_dir = Path(data_docs_dir).resolve()
    data_docs_dir.mkdir(parents=True, exist_ok=True)
    context = _gx_context(data_docs_dir)
    results = _run_suite(context, frame, spec, parameters, warn)
    index = _build_docs(context, data_docs_dir, spec["name"])
    return ValidationReport(spec["name"], _outcomes(results, spec, warn), index, len(frame))
