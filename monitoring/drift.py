"""Drift reports with Evidently 0.7: reference features against the features of a window of predictions.

One Evidently ``Report`` per window: ``DataDriftPreset`` over every feature column (one
``ValueDrift`` per column, tested by default with the K-S test for numbers and chi-square
for the predicted class, drift at p < 0.05), plus the class mix (``UniqueValueCount`` of ``predicted``), the mean
confidence and the row count for the dashboard. The columns fall into three groups, each
reported with its own drift share:

* ``image``: image statistics (intensity, contrast, border, size): the scanner or the
  upload path changed;
* ``prediction``: predicted class, confidence, probability entropy, ``p_<class>``: what the
  model answers changed (class mix, certainty);
* ``embedding``: the frozen-PCA projection of the penultimate layer: what the model *sees*
  changed, even when intensity statistics do not (a rotated or differently cut slice).

Why p-values rather than Evidently's automatic choice: Evidently picks the test from the
*reference* size alone (normed Wasserstein / Jensen-Shannon distances with a fixed 0.1
threshold above 1,000 reference rows), but a monitoring window may hold 30 predictions or
thousands, and a distance's sampling noise grows as the window shrinks. On the real data,
200 images drawn from the same distribution as a 2,854-image reference were called
drifted by the distances; a p-value accounts for both sample sizes.

The window is called drifted when the share of drifted columns reaches the threshold
(``monitoring.drift_share_threshold``, default 0.3) over all columns *or within one group*.
The groups differ in size (11 image statistics, 7 prediction columns, 8 embedding
components): a brightness change moves half of the image statistics but neither the
predictions nor the embedding (the network standardises intensities), and would stay under
the threshold over all 26 columns. With the default 8 PCA components every group has at
least 7 columns; at a 5 % per-column test level such a group reaches 0.3 by chance in under
1 % of windows if its columns were independent (they are partly correlated, so somewhat
more often).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from btc.predlog import utc
from btc.reference import CATEGORICAL_COLUMNS, EMBEDDING_PREFIX, PREDICTION_COLUMNS, PROBABILITY_PREFIX, MonitoringError

GROUPS = ("image", "prediction", "embedding")


@dataclass
class DriftVerdict:
    """What one drift report concluded.

    Args:
        drifted: ``share >= threshold`` or some group's share ``>= threshold``.
        share: drifted columns / all feature columns.
        threshold: the share at or above which the window is drifted.
        group_shares: drift share per group (``image``, ``prediction``, ``embedding``).
        drifted_columns: the columns whose distribution changed.
        drifted_groups: the groups whose share reached the threshold.
        scores: per column, the drift score Evidently computed (a p-value or a distance).
        methods: per column, the test that produced the score.
        n_reference: reference rows.
        n_current: rows in the window.
        html: the Evidently HTML report.
        snapshot: the Evidently snapshot JSON (what the dashboard workspace stores).
        window: ``[since, until]`` as ISO-8601 strings, when the rows came from the prediction log.
        model: ``name`` and ``version`` of the model whose predictions were judged, when from the log.
        other_models: predictions in the window by other models than ``model`` (``"<name> v<version>"``:
            count), left out of the report: the summary names them, since a verdict that leaves out the
            served model's predictions is about a model that is no longer served.
    """

    drifted: bool
    share: float
    threshold: float
    group_shares: dict[str, float]
    drifted_columns: list[str]
    drifted_groups: list[str]
    scores: dict[str, float]
    methods: dict[str, str]
    n_reference: int
    n_current: int
    html: Path | None = None
    snapshot: Path | None = None
    window: list[str] = field(default_factory=list)
    model: dict[str, str] = field(default_factory=dict)
    other_models: dict[str, int] = field(default_factory=dict)
    dashboard_error: str | None = None  # why the snapshot could not be added to the dashboard workspace

    def to_dict(self) -> dict:
        data = asdict(self)
        data["html"] = str(self.html) if self.html else None
        data["snapshot"] = str(self.snapshot) if self.snapshot else None
        return data

    def summary(self) -> str:
        """One line a person reads first: the share, the threshold, the groups and the drifted columns."""
        groups = ", ".join(f"{g} {s:.2f}" for g, s in self.group_shares.items())
        verdict = f"DRIFT in {', '.join(self.drifted_groups) or 'all columns'}" if self.drifted else "no drift"
        columns = ", ".join(self.drifted_columns) or "none"
        line = (f"{verdict}: drift share {self.share:.2f} (by group: {groups}; threshold {self.threshold:.2f}) over "
                f"{self.n_current} predictions vs {self.n_reference} reference images; drifted columns: {columns}")
        if self.other_models:
            judged = f"{self.model['name']} v{self.model['version']}" if self.model else "the reference's model"
            others = ", ".join(f"{m} ({n})" for m, n in self.other_models.items())
            line += (f"; LEFT OUT {sum(self.other_models.values())} predictions by other models than {judged}: "
                     f"{others} (if one of them is served now, build its reference: btc monitor-reference)")
        return line


def feature_groups(columns) -> dict[str, list[str]]:
    """Split feature columns into ``image``, ``prediction`` and ``embedding`` by name."""
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for column in columns:
        if column in PREDICTION_COLUMNS or str(column).startswith(PROBABILITY_PREFIX):
            groups["prediction"].append(column)
        elif str(column).startswith(EMBEDDING_PREFIX):
            groups["embedding"].append(column)
        else:
            groups["image"].append(column)
    return groups


def _check_frames(reference_df: pd.DataFrame, current_df: pd.DataFrame) -> list[str]:
    if reference_df.empty or current_df.empty:
        raise MonitoringError(f"drift needs rows on both sides; got {len(reference_df)} reference and "
                              f"{len(current_df)} current rows")
    missing = [c for c in reference_df.columns if c not in current_df.columns]
    if missing:
        raise MonitoringError(f"current features lack the reference columns {', '.join(map(str, missing))}; "
                              "build them with btc.reference.features_from_log")
    return list(reference_df.columns)


def _data_definition(frame: pd.DataFrame, columns: list[str]):
    from evidently import DataDefinition

    categorical = [c for c in columns if c in CATEGORICAL_COLUMNS or not pd.api.types.is_numeric_dtype(frame[c])]
    return DataDefinition(numerical_columns=[c for c in columns if c not in categorical], categorical_columns=categorical)


def build_report(columns: list[str], threshold: float, *, num_method: str | None = "ks",
                 cat_method: str | None = "chisquare"):
    """The Evidently report monitoring runs on each window (drift per column, class mix, confidence, count).

    Args:
        columns: the feature columns to test.
        threshold: drift share for Evidently's own dataset-level test.
        num_method: Evidently stat test for numeric columns; None lets Evidently choose.
        cat_method: Evidently stat test for categorical columns; None lets Evidently choose.
    """
    from evidently import Report
    from evidently.metrics import MeanValue, RowCount, UniqueValueCount
    from evidently.presets import DataDriftPreset

    # tests=[] on the summary metrics: their default tests (mean within 10 % of the
    # reference…) are not drift decisions and would only add noise to the report.
    return Report(include_tests=True, metrics=[
        DataDriftPreset(columns=columns, drift_share=threshold, num_method=num_method, cat_method=cat_method),
        UniqueValueCount(column="predicted", tests=[]),
        MeanValue(column="confidence", tests=[]),
        RowCount(tests=[]),
    ])


def _column_results(snapshot_dict: dict) -> tuple[dict[str, float], dict[str, str], list[str]]:
    scores, methods, drifted = {}, {}, []
    for metric in snapshot_dict["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            scores[config["column"]] = float(metric["value"])
            methods[config["column"]] = str(config.get("method"))
    for test in snapshot_dict["tests"]:
        params = test["metric_config"]["params"]
        if params["type"].endswith(":ValueDrift") and test["status"] == "FAIL":
            drifted.append(params["column"])
    return scores, methods, drifted


def drift_report(reference_df: pd.DataFrame, current_df: pd.DataFrame, *, out_html: str | Path,
                 threshold: float = 0.3, timestamp: datetime | None = None,
                 metadata: dict[str, str] | None = None, num_method: str | None = "ks",
                 cat_method: str | None = "chisquare") -> DriftVerdict:
    """Compare current features with the reference, save the HTML report and the snapshot JSON.

    Args:
        reference_df: reference features (:attr:`btc.reference.Reference.features`).
        current_df: current features with the same columns (:func:`btc.reference.features_from_log`).
        out_html: the HTML report to write; the snapshot goes next to it as ``.json``.
        threshold: drifted-column share at or above which the window is drifted.
        timestamp: the time the snapshot stands for on the dashboard (default now), e.g. the window's end.
        metadata: strings stored with the snapshot (model, window).
        num_method: Evidently stat test for numeric columns (``"ks"``, ``"wasserstein"``, ``"psi"``…);
            None lets Evidently choose by reference size.
        cat_method: Evidently stat test for the categorical columns (``"chisquare"``, ``"jensenshannon"``…).

    Raises:
        MonitoringError: a side is empty or the current features lack reference columns.
        ValueError: ``threshold`` is outside (0, 1].
    """
    from evidently import Dataset

    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}; expected a share in (0, 1]")
    columns = _check_frames(reference_df, current_df)
    current_df = current_df[columns]
    definition = _data_definition(reference_df, columns)
    when = utc(timestamp or datetime.now(timezone.utc)).replace(tzinfo=None)  # naive means UTC, as in the log
    with np.errstate(divide="ignore", invalid="ignore"):  # constant columns (image size) in Evidently's correlations
        snapshot = build_report(columns, threshold, num_method=num_method, cat_method=cat_method).run(
            Dataset.from_pandas(current_df.reset_index(drop=True), data_definition=definition),
            Dataset.from_pandas(reference_df.reset_index(drop=True), data_definition=definition),
            timestamp=when, metadata=dict(metadata or {}), tags=["btc", "drift"],
        )
    scores, methods, drifted = _column_results(snapshot.dict())
    groups = feature_groups(columns)
    group_shares = {g: round(sum(c in drifted for c in cols) / len(cols), 4) for g, cols in groups.items() if cols}
    share = len(drifted) / len(columns)
    drifted_groups = [g for g, s in group_shares.items() if s >= threshold]
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out_html))
    snapshot_path = out_html.with_suffix(".json")
    snapshot_path.write_text(snapshot.dumps())  # the full form Snapshot.load reads (save_json writes results only)
    return DriftVerdict(
        drifted=share >= threshold or bool(drifted_groups), share=round(share, 4), threshold=threshold,
        group_shares=group_shares,
        drifted_columns=[c for c in columns if c in drifted], drifted_groups=drifted_groups, scores=scores, methods=methods,
        n_reference=len(reference_df), n_current=len(current_df), html=out_html, snapshot=snapshot_path,
    )


def save_verdict(verdict: DriftVerdict, path: str | Path) -> Path:
    """Write a verdict as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(verdict.to_dict(), indent=2) + "\n")
    return path
