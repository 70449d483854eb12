"""The monitoring dashboard: drift snapshots in an Evidently local workspace, shown by ``evidently ui``.

Each monitoring run adds its snapshot (timestamped with the window's end) to the project
``btc`` of a local workspace (default ``$BTC_HOME/evidently``). The project's dashboard plots
one point per snapshot: share of drifted columns, class mix (share of each predicted class),
mean confidence and predictions per window. Open it with::

    evidently ui --workspace .btc/evidently --port 8000
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path

from btc.paths import btc_home

PROJECT = "btc"
DESCRIPTION = "Brain MRI classifier in service: drift of image statistics, predictions and embeddings per window"


def default_workspace() -> Path:
    return btc_home() / "evidently"


def workspace_of(cfg) -> Path:
    """The dashboard workspace of a :class:`btc.config.Config`: ``monitoring.workspace``, else the default."""
    return Path(cfg.monitoring.workspace or default_workspace())


def _panels():
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel

    share = PanelMetric(legend="share of drifted columns", metric="DriftedColumnsCount", metric_labels={"value_type": "share"})
    return [
        counter_panel("Drift share (latest window)", [share], size="half", aggregation="last",
                      description="drifted feature columns / all groups together; btc's verdict also calls a window "
                                  "drifted when one group (image, prediction, embedding) reaches the threshold"),
        counter_panel("Predictions (latest window)", [PanelMetric(legend="predictions", metric="RowCount")],
                      size="half", aggregation="last"),
        line_plot_panel("Drift share", [share], size="full",
                        description="image statistics, predictions and embedding PCA columns together"),
        bar_plot_panel("Class mix", [PanelMetric(legend="{{label}}", metric="UniqueValueCount",
                                                 metric_labels={"column": "predicted", "value_type": "share"})],
                       size="half", stacked=True, description="share of each predicted class per window"),
        line_plot_panel("Mean confidence", [PanelMetric(legend="mean confidence", metric="MeanValue",
                                                        metric_labels={"column": "confidence"})], size="half"),
    ]


def ensure_project(workspace: str | Path, name: str = PROJECT):
    """The workspace's project ``name``, created with its dashboard panels on first use."""
    from evidently.ui.workspace import Workspace

    Path(workspace).mkdir(parents=True, exist_ok=True)
    ws = Workspace(str(workspace))
    found = ws.search_project(name)
    if found:
        return ws, found[0]
    project = ws.create_project(name, description=DESCRIPTION)
    for panel in _panels():
        project.dashboard.add_panel(panel, tab="Drift")
    return ws, project


def add_snapshot(workspace: str | Path, snapshot) -> str:
    """Add a drift snapshot (a ``Snapshot`` or the JSON path :func:`monitoring.drift.drift_report` wrote).

    Returns:
        The snapshot's id in the workspace.

    Raises:
        FileNotFoundError: ``snapshot`` is a path that does not exist.
    """
    from evidently.core.report import Snapshot

    if isinstance(snapshot, (str, Path)):
        if not Path(snapshot).is_file():
            raise FileNotFoundError(f"snapshot {str(snapshot)!r} does not exist; drift_report writes it next to the HTML")
        snapshot = Snapshot.load(str(snapshot))
    with _workspace_lock(workspace):  # two runs at once: neither reads the other's half-written snapshot
        ws, project = ensure_project(workspace)
        return str(ws.add_run(project.id, snapshot).id)


@contextmanager
def _workspace_lock(workspace: str | Path):
    """An exclusive lock on ``workspace`` among btc's writers, held in a file beside it."""
    lock = Path(workspace).parent / f".{Path(workspace).name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def snapshot_points(workspace: str | Path, name: str = PROJECT) -> list[dict]:
    """What the dashboard plots: per snapshot, its time, drift share, class shares and mean confidence."""
    from evidently.ui.workspace import Workspace

    ws = Workspace(str(workspace))
    found = ws.search_project(name)
    if not found:
        return []
    points = []
    for snapshot_id in ws.list_runs(found[0].id):
        model = ws.get_run(found[0].id, snapshot_id)
        point = {"id": str(snapshot_id), "timestamp": model.timestamp, "metadata": dict(model.metadata)}
        for result in model.metric_results.values():
            kind = result.metric_value_location.metric.params["type"].rsplit(":", 1)[-1]
            if kind == "DriftedColumnsCount":
                point["drift_share"] = float(result.share.value)
            elif kind == "UniqueValueCount":
                point["class_mix"] = {k: float(v.value) for k, v in result.shares.items()}
            elif kind == "MeanValue":
                point["mean_confidence"] = float(result.value)
            elif kind == "RowCount":
                point["predictions"] = int(result.value)
        points.append(point)
    return sorted(points, key=lambda p: p["timestamp"])
