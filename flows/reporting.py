"""What the flows publish as Prefect artifacts: markdown tables and links, built from btc's results.

The builders are plain functions of btc objects (tested without Prefect); ``publish_*`` turn
them into artifacts of the current flow run. Artifact keys are stable, so the Prefect UI's
Artifacts page shows the history of each (``training-summary``, ``data-validation``, ...).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def file_link(path: str | Path) -> str:
    return Path(path).resolve().as_uri()


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server, or on ``mlflow ui`` (default port) for a local store."""
    base = tracking_uri.rstrip("/") if urlparse(tracking_uri).scheme in ("http", "https") else MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def validation_markdown(report) -> str:
    """One row per expectation of a :class:`btc.validation.ValidationReport`, and the verdict."""
    verdict = "PASSED" if report.success else f"FAILED: {', '.join(report.failures)}"
    rows = [[o.name, o.status, o.observed] for o in report.outcomes]
    return "\n\n".join([f"## Data validation {verdict}", f"{report.rows} images, suite `{report.suite_name}`",
                        _table(["expectation", "result", "observed"], rows),
                        f"Data Docs: [{report.data_docs_index}]({file_link(report.data_docs_index)})"])


def metrics_markdown(report: dict) -> str:
    """Test metrics (whole test split and its clean subset) and per-class scores of an evaluation report."""
    clean = report.get("clean") or {}
    keys = ["n_images", "accuracy", "macro_f1", "macro_roc_auc", "ece", "ece_before_temperature"]
    summary = _table(["metric", "test", "test (clean)"], [[k, _number(report.get(k)), _number(clean.get(k))] for k in keys])
    per_class = _table(["class", "precision", "recall", "f1", "support"],
                       [[c, _number(m["precision"]), _number(m["recall"]), _number(m["f1"]), m["support"]]
                        for c, m in report["per_class"].items()])
    return f"{summary}\n\n{per_class}"


def gates_markdown(promotion) -> str:
    """The gate table of a :class:`btc.tracking.registry.PromotionResult` and its decision."""
    rows = [[g.name, g.threshold, g.value, "pass" if g.passed else "**FAIL**"] for g in promotion.gates]
    table = _table(["gate", "threshold", "value", "result"], rows) if rows else "(no gates evaluated)"
    notes = "".join(f"\n\nnote: {n}" for n in promotion.notes)
    return f"{table}\n\n**{promotion.reason}**\n\nevaluation set: {promotion.eval_set}{notes}"


def links_markdown(links: dict[str, str]) -> str:
    return "\n".join(f"- {name}: [{target}]({target})" for name, target in links.items())


def summary_markdown(*, version: str | None, run_id: str, report: dict, promotion, links: dict[str, str],
                     mlflow_ui: str = "") -> str:
    """The pipeline's one-page summary: model, metrics, gates and where everything is."""
    head = f"# Training pipeline: MLflow run `{run_id}`" + (f", registered version {version}" if version else "")
    parts = [head, "## Test metrics", metrics_markdown(report)]
    if promotion is not None:
        parts += ["## Promotion gates", gates_markdown(promotion)]
    parts += ["## Where the results are", links_markdown(links)]
    if mlflow_ui:
        parts.append(f"MLflow UI: `{mlflow_ui}`")
    return "\n\n".join(parts)


def publish_validation(report) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    create_markdown_artifact(validation_markdown(report), key="data-validation",
                             description="Great Expectations suite on the manifest and split")
    create_link_artifact(file_link(report.data_docs_index), link_text="Great Expectations Data Docs", key="data-docs",
                         description="open in a browser")


def publish_summary(*, version: str | None, run_id: str, run_url: str, report: dict, promotion,
                    links: dict[str, str], mlflow_ui: str = "") -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    create_markdown_artifact(summary_markdown(version=version, run_id=run_id, report=report, promotion=promotion,
                                              links=links, mlflow_ui=mlflow_ui), key="training-summary",
                             description="test metrics, promotion gates and links")
    create_link_artifact(run_url, link_text=f"MLflow run {run_id}", key="mlflow-run",
                         description=f"start the UI first: {mlflow_ui}" if mlflow_ui else None)
    create_link_artifact(links["evaluation report"], link_text="evaluation report (metrics.json and plots)",
                         key="evaluation-report")
