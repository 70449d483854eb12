"""Monitoring: reference, drift reports on logged predictions, dashboard, acting on drift, refusals.

The predictions are made by the tiny model of ``trained_run`` on the synthetic images and
written to a real prediction log exactly as the service writes them (``log_records``).
Every image is used once: even-numbered images build the reference, odd-numbered ones
are "the service's traffic".
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import requests

from btc.data.images import decode_gray
from btc.data.stats import image_statistics
from btc.predict import Predictor
from btc.predlog import SCHEMA, PredictionLog
from btc.reference import (REFERENCE_FORMAT, MonitoringError, build_reference, features_from_log, load_reference,
                           log_records, prediction_record, probability_entropy, records_frame, reference_from_records)
from monitoring.actions import RETRAIN_DEPLOYMENT, act_on_drift
from monitoring.dashboard import PROJECT, ensure_project, snapshot_points
from monitoring.drift import drift_report
from monitoring.run import log_to_mlflow, run_monitoring

DAY1 = datetime(2025, 3, 1, tzinfo=timezone.utc)
DAY2 = DAY1 + timedelta(days=1)


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.load(trained_run.model_path)


@pytest.fixture(scope="module")
def grays(synth_root):
    """All synthetic images as grayscale arrays (even: reference, odd: traffic)."""
    return [decode_gray(p)[0] for p in sorted(synth_root.glob("*/*/*.jpg"))]


@pytest.fixture(scope="module")
def reference_dir(predictor, grays, tmp_path_factory):
    return build_reference(predictor, grays[0::2], pca_components=8).save(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def traffic(predictor, grays):
    """Records of the odd-numbered images, as the service logs them."""
    return log_records(predictor, grays[1::2])


def _stamped(records: list[dict], start: datetime) -> list[dict]:
    return [{**r, "ts": (start + timedelta(minutes=i)).isoformat()} for i, r in enumerate(records)]


def _shift(name: str, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = gray.astype(np.float64)
    shifted = {"brighter": lambda: g * 1.2, "noisier": lambda: g + rng.normal(0, 20, g.shape),
               "rotated": lambda: np.rot90(g), "inverted": lambda: 255 - g}[name]()
    return np.clip(shifted, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def monitored(predictor, grays, traffic, reference_dir, tmp_path_factory):
    """Two daily windows through run_monitoring: day 1 like the reference, day 2 inverted (CT-like) images.

    Module-scoped, so it sets its own MLflow store (the autouse isolation is per test).
    """
    root = tmp_path_factory.mktemp("monitored")
    rng = np.random.default_rng(0)
    inverted = log_records(predictor, [_shift("inverted", g, rng) for g in grays[1::2]])
    log = PredictionLog(root / "predictions.sqlite")
    log.append(_stamped(traffic, DAY1 + timedelta(hours=1)) + _stamped(inverted, DAY2 + timedelta(hours=1)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(root / "mlartifacts"))
        mp.setenv("BTC_HOME", str(root / "btc_home"))
        kw = dict(window_hours=24, min_predictions=30, threshold=0.3, out_dir=root / "reports",
                  workspace=root / "evidently")
        day1 = run_monitoring(log.path, reference_dir, until=DAY2, **kw)
        day2 = run_monitoring(log.path, reference_dir, until=DAY2 + timedelta(days=1), **kw)
        for verdict in (day1, day2):
            log_to_mlflow(verdict)
    return {"root": root, "log": log.path, "day1": day1, "day2": day2, "inverted": inverted,
            "reference_dir": reference_dir}


def test_log_records_have_the_service_record_shape(predictor, grays, tmp_path):
    images = grays[:6]
    records = log_records(predictor, images, ts=DAY1)
    log = PredictionLog(tmp_path / "log.sqlite")
    log.append(records)
    back = log.read()
    assert set(back.columns) - {"id"} == set(records_frame(records).columns)
    probs = predictor.predict_proba(images)
    np.testing.assert_allclose(back["confidence"], probs.max(1), rtol=1e-6)
    np.testing.assert_allclose(back["prob_entropy"], probability_entropy(probs), rtol=1e-6)
    assert back["prob_entropy"].between(0, np.log2(len(predictor.classes))).all()
    assert list(back["predicted"]) == [predictor.classes[i] for i in probs.argmax(1)]
    assert (back["ts"] == DAY1).all() and back["model_version"].eq(str(predictor.version)).all()
    assert len(back["embedding"][0]) == predictor.embed(images[:1]).shape[1]
    # what the service builds from its own forward pass is the same record (a naive time is UTC)
    single = prediction_record(predictor, images[0], probs[0], predictor.embed(images[:1])[0], ts=DAY1.replace(tzinfo=None))
    assert {k: v for k, v in single.items() if k != "embedding"} == {k: v for k, v in records[0].items() if k != "embedding"}
    # statistics of the upload at its own size (96 px), not of the model's 64-px input
    assert image_statistics(images[0]) == records[0]["stats"] and back["width"][0] == 96
    with pytest.raises(ValueError, match="6 images but 2 timestamps"):
        log_records(predictor, images, ts=[DAY1, DAY2])


def test_rotating_a_log_while_workers_append_loses_no_row(predictor, grays, tmp_path):
    """btc rotate-log under load: every appended row ends in the log or in the archive, exactly once."""
    import threading

    records = log_records(predictor, grays[:2], ts=DAY1)
    path, archive = tmp_path / "predictions.sqlite", tmp_path / "archive" / "old.sqlite"
    PredictionLog(path).append(records[:1])
    appended, errors = [1], []

    def worker():
        log = PredictionLog(path)  # each worker its own, as each service worker has
        try:
            for _ in range(60):
                log.append(records)
                appended.append(len(records))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    moved = [PredictionLog(path).rotate(archive) for _ in range(8)]
    for t in threads:
        t.join()
    moved.append(PredictionLog(path).rotate(archive))
    assert not errors
    assert sum(moved) == sum(appended) == PredictionLog(archive).count() and PredictionLog(path).count() == 0
    with pytest.raises(ValueError, match="is the prediction log itself"):
        PredictionLog(path).rotate(path)
    with pytest.raises(ValueError, match="does not exist; nothing to rotate"):
        PredictionLog(tmp_path / "none.sqlite").rotate(archive)


def test_cli_rotate_log_moves_the_rows_and_names_what_it_cannot_use(predictor, grays, tmp_path):
    from typer.testing import CliRunner

    from btc.cli import app

    log = PredictionLog(tmp_path / "predictions.sqlite")
    log.append(log_records(predictor, grays[:3], ts=DAY1))
    done = CliRunner().invoke(app, ["rotate-log", str(tmp_path / "a.sqlite"), "--log", str(log.path)])
    assert done.exit_code == 0 and f"moved 3 predictions from {log.path} to {tmp_path / 'a.sqlite'}" in done.output
    assert log.count() == 0 and PredictionLog(tmp_path / "a.sqlite").count() == 3
    (tmp_path / "notes.txt").write_text("not a log")
    for archive, message in ((tmp_path / "notes.txt", "is not a prediction log"), (tmp_path, "is a folder")):
        refused = CliRunner().invoke(app, ["rotate-log", str(archive), "--log", str(log.path)])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert (tmp_path / "notes.txt").read_text() == "not a log"
    refused = CliRunner().invoke(app, ["rotate-log", str(tmp_path / "new" / "b.sqlite"), "--log",
                                       str(tmp_path / "notes.txt")])
    assert refused.exit_code == 2 and "is not a prediction log" in refused.output
    assert not (tmp_path / "new").exists()  # a refused rotation makes no archive
    log.append(log_records(predictor, grays[:1], ts=DAY1))
    unopenable = CliRunner().invoke(app, ["rotate-log", "/proc/no.sqlite", "--log", str(log.path)])
    assert unopenable.exit_code == 2 and "cannot rotate" in unopenable.output and log.count() == 1


def test_a_rotation_cut_short_after_the_copy_is_finished_without_copying_twice(predictor, grays, tmp_path):
    import sqlite3

    log, archive = PredictionLog(tmp_path / "predictions.sqlite"), PredictionLog(tmp_path / "archive.sqlite")
    log.append(log_records(predictor, grays[:4], ts=DAY1))
    archive.append([])  # made, empty
    with sqlite3.connect(log.path) as con:  # what the first transaction leaves when the delete then fails
        con.execute("ATTACH DATABASE ? AS archive", (str(archive.path),))
        con.execute("INSERT INTO archive.predictions SELECT * FROM main.predictions WHERE id <= 3")
    assert log.rotate(archive.path) == 4
    assert archive.count() == 4 and log.count() == 0 and list(archive.read()["id"]) == [1, 2, 3, 4]
    other = PredictionLog(tmp_path / "other.sqlite")  # another log's ids collide with those in the archive
    other.append(log_records(predictor, grays[4:6], ts=DAY2))
    with pytest.raises(ValueError, match="already holds another prediction with id 1.*new archive file"):
        other.rotate(archive.path)
    assert other.count() == 2 and archive.count() == 4


def test_a_log_moved_away_while_in_use_is_started_afresh(predictor, grays, tmp_path):
    """A log moved or deleted between appends: the next append makes a new log, none is dropped."""
    records = log_records(predictor, grays[:3], ts=DAY1)
    log = PredictionLog(tmp_path / "logs" / "log.sqlite")
    log.append(records[:1])
    log.path.rename(tmp_path / "archived.sqlite")
    log.append(records[1:2])
    assert log.count() == 1 and PredictionLog(tmp_path / "archived.sqlite").count() == 1
    shutil.rmtree(tmp_path / "logs")
    log.append(records[2:])
    assert log.count() == 1 and list(log.read()["predicted"]) == [records[2]["predicted"]]


def test_a_reference_mixed_from_two_builds_is_refused(predictor, grays, reference_dir, tmp_path):
    """A monitor reading while the pipeline rewrites the reference gets an error, not one build's PCA with another's features."""
    import shutil

    mixed = Path(shutil.copytree(reference_dir, tmp_path / "mixed"))
    other = build_reference(predictor, grays[1::2], pca_components=8).save(tmp_path / "other")
    assert load_reference(mixed).metadata == load_reference(reference_dir).metadata  # a copy reads as the original
    shutil.copy(other / "pca.npz", mixed / "pca.npz")  # the new PCA is in place, reference.json still the old one
    with pytest.raises(MonitoringError, match=r"mixed/pca\.npz' is not the file reference\.json was written with"):
        load_reference(mixed)
    build_reference(predictor, grays[1::2], pca_components=8).save(mixed)  # a whole rewrite in place
    assert sorted(p.name for p in mixed.iterdir()) == ["features.parquet", "pca.npz", "reference.json"]
    np.testing.assert_array_equal(load_reference(mixed).components, load_reference(other).components)


def test_features_of_service_records_equal_those_of_log_records(predictor, synth_root, reference_dir):
    """The service builds its records with btc.serving_logic; monitoring must see the same features."""
    from btc.ood import OodRule
    from btc.serving_logic import decode_upload, log_record, model_inputs, model_outputs, prediction

    paths = sorted(synth_root.glob("*/*/*.jpg"))[1:24:4]
    uploads = [decode_upload(p.read_bytes(), p.name, max_bytes=10**7, max_pixels=10**7) for p in paths]
    outputs = model_outputs(predictor, model_inputs(uploads, predictor.image_size))
    service = [log_record(u, prediction(u, o, classes=list(predictor.classes), model_name=predictor.name,
                                        model_version=str(predictor.version), rule=OodRule(), elapsed_ms=0.0), o)
               for u, o in zip(uploads, outputs)]
    reference = load_reference(reference_dir)
    theirs = features_from_log(records_frame(service), reference)
    ours = features_from_log(records_frame(log_records(predictor, paths)), reference)
    assert list(theirs.columns) == list(ours.columns) and (theirs["predicted"] == ours["predicted"]).all()
    numeric = ours.columns.drop("predicted")
    np.testing.assert_allclose(theirs[numeric], ours[numeric], atol=1e-4)  # the service rounds to 6 decimals


def test_reference_round_trips_and_logged_features_match_it(predictor, grays, reference_dir, traffic, tmp_path):
    reference = load_reference(reference_dir)
    assert reference.metadata["model_name"] == predictor.name and reference.metadata["images"] == len(grays[0::2])
    assert reference.components.shape == (8, len(reference.mean))
    assert list(reference.features.columns) == (reference.image_columns + reference.prediction_columns
                                                + [f"emb_pc{i}" for i in range(1, 9)])
    np.testing.assert_allclose(reference.features[reference.embedding_columns].mean(), 0, atol=1e-6)
    assert not reference.features.isna().any().any()
    # the same images logged by the service give the same features (embeddings are stored to 5 decimals)
    log = PredictionLog(tmp_path / "log.sqlite")
    log.append(log_records(predictor, grays[0::2]))
    again = features_from_log(log.read(), reference)
    assert list(again.columns) == list(reference.features.columns)
    numeric = again.columns.drop("predicted")
    np.testing.assert_allclose(again[numeric], reference.features[numeric], atol=1e-3)
    assert (again["predicted"] == reference.features["predicted"]).all()
    with pytest.raises(ValueError, match="pca_components=80 with 80 reference images"):
        build_reference(predictor, grays[0::2], pca_components=80)
    with pytest.raises(ValueError, match="records by 2 models"):
        reference_from_records(traffic[:10] + [{**r, "model_version": "v9"} for r in traffic[:10]], pca_components=4)
    with pytest.raises(ValueError, match="only 1 distinct embeddings among 5 reference images"):
        build_reference(predictor, [grays[0]] * 5, pca_components=1)  # copies: the PCA's ratios would be NaN


def test_images_like_the_reference_show_no_drift(monitored):
    day1 = monitored["day1"]
    assert not day1.drifted and day1.share < day1.threshold and not day1.drifted_groups
    # the window holds day 1 only: day 2's inverted images were logged too but are outside it
    assert day1.n_current == 80 and day1.window[1] == DAY2.isoformat()
    html = day1.html.read_text()
    assert all(column in html for column in ("black_border_share", "p_glioma", "emb_pc8"))
    assert day1.html.with_suffix(".verdict.json").is_file()
    calls = []
    assert act_on_drift(day1, trigger=calls.append).startswith("no drift") and calls == []


def test_verdicts_are_logged_to_mlflow(monitored):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{monitored['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("btc-monitoring")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.metrics["drift_share"] for r in runs] == [monitored["day1"].share, monitored["day2"].share]
    assert runs[1].data.metrics["drifted"] == 1.0 and runs[1].data.metrics["predictions"] == 80
    artifacts = [a.path for a in client.list_artifacts(runs[1].info.run_id, "drift")]
    assert "drift/verdict.json" in artifacts and any(a.endswith(".html") for a in artifacts)
    reference = load_reference(monitored["reference_dir"])
    assert runs[1].data.tags["model_name"] == reference.metadata["model_name"] == monitored["day2"].model["name"]
    assert runs[1].data.tags["model_version"] == str(reference.metadata["model_version"])
    assert runs[1].data.params["window_since"] == monitored["day2"].window[0]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_ct_like_images_drift_and_trigger_retraining(monitored, caplog):
    day2 = monitored["day2"]
    assert day2.drifted and day2.share >= day2.threshold
    assert {"image", "prediction", "embedding"} <= set(day2.drifted_groups)
    calls = []
    with caplog.at_level(logging.WARNING):
        message = act_on_drift(day2, trigger=lambda v: calls.append(v) or "flow-run-1")
    assert calls == [day2] and message == f"triggered deployment {RETRAIN_DEPLOYMENT}: flow-run-1"
    assert any(r.message.startswith("DRIFT ALERT: DRIFT") for r in caplog.records)
    with caplog.at_level(logging.WARNING):
        assert act_on_drift(day2, trigger=None).startswith(f"would trigger deployment {RETRAIN_DEPLOYMENT}")


@pytest.mark.parametrize(("shift", "group"), [("brighter", "image"), ("noisier", "image"), ("rotated", "embedding")])
def test_shifted_images_drift_and_trigger_retraining(shift, group, predictor, grays, reference_dir, tmp_path):
    reference = load_reference(reference_dir)
    rng = np.random.default_rng(0)
    shifted = [_shift(shift, g, rng) for g in grays[1::2]]
    current = features_from_log(records_frame(log_records(predictor, shifted)), reference)
    verdict = drift_report(reference.features, current, out_html=tmp_path / "drift.html", threshold=0.3)
    assert verdict.drifted and group in verdict.drifted_groups, verdict.summary()
    calls = []
    act_on_drift(verdict, trigger=calls.append)
    assert calls == [verdict]


def test_class_mix_shift_is_prediction_drift(predictor, traffic, reference_dir, tmp_path):
    """Only patients of one kind arrive: the answers' class mix shifts.

    The tiny test model is close to chance (it calls most images notumor), so "one class's
    images" is realised as the images it assigns to one minority class.
    """
    reference = load_reference(reference_dir)
    reference_mix = reference.features["predicted"].value_counts(normalize=True)
    answered = records_frame(traffic)
    counts = answered["predicted"].value_counts()
    minority = [c for c in counts.index if reference_mix.get(c, 0) < 0.5 and counts[c] >= 5]
    assert minority, f"the model answers {counts.to_dict()}; no minority class with 5 images"
    current = features_from_log(answered[answered["predicted"] == minority[0]], reference)
    verdict = drift_report(reference.features, current, out_html=tmp_path / "mix.html", threshold=0.3)
    assert "predicted" in verdict.drifted_columns and verdict.group_shares["prediction"] > 0, verdict.summary()


def test_no_meaningful_report_is_refused(reference_dir, traffic, tmp_path):
    kw = dict(window_hours=24, until=DAY2, min_predictions=30, out_dir=tmp_path / "reports")
    log = tmp_path / "predictions.sqlite"
    with pytest.raises(MonitoringError, match="does not exist"):
        run_monitoring(log, reference_dir, **kw)
    with pytest.raises(MonitoringError, match=r"nope.*lacks features\.parquet"):
        run_monitoring(log, tmp_path / "nope", **kw)
    with sqlite3.connect(log) as con:
        con.executescript(SCHEMA)
    with pytest.raises(MonitoringError, match="is empty"):
        run_monitoring(log, reference_dir, **kw)
    PredictionLog(log).append(_stamped(traffic[:5], DAY1 + timedelta(hours=1)))
    with pytest.raises(MonitoringError, match="^5 predictions .* at least 30 are needed"):
        run_monitoring(log, reference_dir, **kw)
    with pytest.raises(MonitoringError, match="no predictions between"):
        run_monitoring(log, reference_dir, **{**kw, "until": DAY1})
    PredictionLog(log).append(_stamped([{**r, "model_version": "v9"} for r in traffic], DAY1 + timedelta(hours=2)))
    with pytest.raises(MonitoringError, match="^5 predictions"):  # other models' predictions do not count
        run_monitoring(log, reference_dir, **kw)
    assert not (tmp_path / "reports").exists()


def test_dashboard_holds_one_point_per_window(monitored):
    points = snapshot_points(monitored["root"] / "evidently")
    assert [p["timestamp"] for p in points] == [DAY2.replace(tzinfo=None), (DAY2 + timedelta(days=1)).replace(tzinfo=None)]
    for point, verdict in zip(points, [monitored["day1"], monitored["day2"]]):
        assert point["predictions"] == verdict.n_current
        assert sum(point["class_mix"].values()) == pytest.approx(1.0)
    # Evidently's own drifted-column count agrees with the verdict's
    assert points[0]["drift_share"] == pytest.approx(monitored["day1"].share, abs=1e-4)
    assert points[1]["drift_share"] == pytest.approx(monitored["day2"].share, abs=1e-4)
    day2_confidence = np.mean([r["confidence"] for r in monitored["inverted"]])
    assert points[1]["mean_confidence"] == pytest.approx(day2_confidence, rel=1e-6)
    _, project = ensure_project(monitored["root"] / "evidently")  # found again, not duplicated
    titles = [p.title for p in project.dashboard.model().panels]
    assert titles == ["Drift share (latest window)", "Predictions (latest window)", "Drift share", "Class mix",
                      "Mean confidence"]


def test_cli_monitor_exit_codes(monitored, reference_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from btc.cli_monitor import EXIT_DRIFT, monitor_command

    app = typer.Typer()
    app.command("monitor")(monitor_command)
    app.command("unused")(lambda: None)  # two commands: typer keeps "monitor" as a sub-command name
    base = ["monitor", "--log", str(monitored["log"]), "--reference", str(reference_dir), "--out", str(tmp_path),
            "--no-mlflow", "--no-dashboard"]
    drifted = CliRunner().invoke(app, base + ["--until", "2025-03-03T00:00:00"])
    assert drifted.exit_code == EXIT_DRIFT, drifted.output
    assert "DRIFT in" in drifted.output and f"would trigger deployment {RETRAIN_DEPLOYMENT}" in drifted.output
    too_few = CliRunner().invoke(app, base + ["--until", "2025-03-01T00:30:00"])
    assert too_few.exit_code == 1 and "no predictions between" in too_few.output
    # An unreachable MLflow store costs the MLflow copy, not the verdict or its exit code.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the socket closes
    offline = CliRunner().invoke(app, [a for a in base if a != "--no-mlflow"] + ["--until", "2025-03-03T00:00:00"],
                                 env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert offline.exit_code == EXIT_DRIFT and "DRIFT in" in offline.output, offline.output
    assert f"cannot reach MLflow tracking server at http://127.0.0.1:{port}" in offline.output
    assert "the verdict is kept in" in offline.output and "Traceback" not in offline.output
    # A store file that is no database at all: the same, not a traceback and exit 1.
    not_a_db = tmp_path / "not_a_store.db"
    not_a_db.write_text("these are not the tables you are looking for")
    garbage = CliRunner().invoke(app, [a for a in base if a != "--no-mlflow"] + ["--until", "2025-03-03T00:00:00"],
                                 env={"MLFLOW_TRACKING_URI": f"sqlite:///{not_a_db}"})
    assert garbage.exit_code == EXIT_DRIFT and "the drift verdict could not be logged to MLflow" in garbage.output
    assert "Traceback" not in garbage.output, garbage.output
    # A damaged dashboard workspace (a snapshot cut short) costs the dashboard point, not the verdict.
    workspace = tmp_path / "evidently"
    shutil.copytree(monitored["root"] / "evidently", workspace)
    snapshot = next(workspace.rglob("snapshots/*.json"))
    snapshot.write_bytes(snapshot.read_bytes()[:1000])
    damaged = CliRunner().invoke(app, [a for a in base if a != "--no-dashboard"] + [
        "--until", "2025-03-03T00:00:00", "--workspace", str(workspace)])
    assert damaged.exit_code == EXIT_DRIFT and "DRIFT in" in damaged.output, damaged.output
    assert f"warning: the snapshot was not added to the dashboard workspace {str(workspace)!r}" in damaged.output
    verdicts = sorted(tmp_path.glob("drift-*.verdict.json"))
    assert "dashboard workspace" in json.loads(verdicts[-1].read_text())["dashboard_error"]


def test_cli_monitor_reference_builds_from_the_validation_split(trained_run, synth_split, tmp_path):
    import typer
    from typer.testing import CliRunner

    from btc.cli_monitor import reference_command

    app = typer.Typer()
    app.command("monitor-reference")(reference_command)
    app.command("unused")(lambda: None)
    synth_split.to_parquet(tmp_path / "split.parquet")
    args = ["monitor-reference", str(trained_run.model_path), "--split", str(tmp_path / "split.parquet"),
            "--out", str(tmp_path / "ref"), "-s", "monitoring.pca_components=4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    reference = load_reference(tmp_path / "ref")
    assert reference.metadata["images"] == int((synth_split["split"] == "val").sum())
    assert reference.embedding_columns == ["emb_pc1", "emb_pc2", "emb_pc3", "emb_pc4"]
    wrong = CliRunner().invoke(app, args + ["--split-name", "holdout"])
    assert wrong.exit_code == 2 and "no rows with split 'holdout'" in wrong.output
    beside = CliRunner().invoke(app, ["monitor-reference", str(trained_run.model_path), "--out", str(tmp_path / "r2")])
    assert beside.exit_code == 0 and load_reference(tmp_path / "r2").metadata["source"].startswith(
        f"{trained_run.out_dir / 'split.parquet'}:val"), beside.output  # the run's own split, beside its model.pt
    (tmp_path / "alone").mkdir()
    shutil.copy(trained_run.model_path, tmp_path / "alone" / "model.pt")
    alone = CliRunner().invoke(app, ["monitor-reference", str(tmp_path / "alone" / "model.pt"), "--out", str(tmp_path / "r3")])
    assert alone.exit_code == 2 and "no --split given and no split.parquet beside" in alone.output


def _cli(name: str, command):
    import typer

    app = typer.Typer()
    app.command(name)(command)
    app.command("unused")(lambda: None)  # two commands: typer keeps the name as a sub-command name
    return app


def _unreadable_reference(folder: Path, broken: str) -> Path:
    """A reference folder with all three files, ``broken`` of them not in its format."""
    folder.mkdir()
    metadata = {"format": REFERENCE_FORMAT, "model_name": "m", "model_version": "1", "image_columns": ["mean"],
                "prediction_columns": ["predicted"]}
    (folder / "reference.json").write_text(json.dumps(metadata))
    np.savez(folder / "pca.npz", components=np.eye(2), mean=np.zeros(2))
    (folder / "features.parquet").write_bytes(b"PAR1 not really")
    (folder / broken).write_text('{"format": "btc-monitoring-reference/1",' if broken.endswith(".json") else "garbage")
    return folder


def test_prediction_log_names_a_file_that_is_not_one(tmp_path):
    text = tmp_path / "x.txt"
    text.write_text("ts,predicted\n2025-03-01,glioma\n")
    for call in (lambda log: log.count(), lambda log: log.read(), lambda log: log.append([])):
        with pytest.raises(ValueError, match=r"x\.txt' is not a prediction log \(SQLite\): file is not a database"):
            call(PredictionLog(text))
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE predictions (id INTEGER, ts TEXT)")
    with pytest.raises(ValueError, match=r"other\.sqlite' is not a prediction log \(SQLite\): no such column"):
        PredictionLog(foreign).read()
    assert text.read_text().startswith("ts,predicted")  # refused, not converted
    another = tmp_path / "another.sqlite"
    with sqlite3.connect(another) as con:
        con.execute("CREATE TABLE patients (id INTEGER)")
    before = another.read_bytes()
    for call in (lambda log: log.count(), lambda log: log.append([])):
        with pytest.raises(ValueError, match=r"another\.sqlite' is not a prediction log: a SQLite database of other "
                                             r"tables \(patients\); it is left as it was"):
            call(PredictionLog(another))
    assert another.read_bytes() == before  # no table added, not switched to WAL


def test_windows_ending_together_keep_their_own_reports(traffic, reference_dir, tmp_path):
    log = PredictionLog(tmp_path / "log.sqlite")
    log.append(_stamped(traffic, DAY1))
    until = DAY1 + timedelta(minutes=len(traffic))
    kw = dict(until=until, min_predictions=10, threshold=0.3, out_dir=tmp_path / "reports")
    six, one = run_monitoring(log.path, reference_dir, window_hours=6, **kw), \
        run_monitoring(log.path, reference_dir, window_hours=0.25, **kw)
    assert six.html != one.html and six.html.is_file() and one.html.is_file()
    assert six.html.name == f"drift-{until - timedelta(hours=6):%Y%m%dT%H%M%SZ}-{until:%Y%m%dT%H%M%SZ}.html"
    assert json.loads(six.html.with_suffix(".verdict.json").read_text())["n_current"] == len(traffic)
    assert json.loads(one.html.with_suffix(".verdict.json").read_text())["n_current"] == 15


def test_every_form_of_a_time_lands_in_its_utc_window(traffic, tmp_path, monkeypatch):
    """A datetime, another UTC offset and a "Z" all mean 11:30 UTC; naive bounds mean UTC, whatever TZ says."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        log = PredictionLog(tmp_path / "log.sqlite")
        at = datetime(2025, 3, 2, 11, 30, tzinfo=timezone.utc)
        stamps = [at, at.replace(tzinfo=None), "2025-03-02T12:30:00+01:00", "2025-03-02T11:30:00Z", at.isoformat()]
        log.append([{**r, "ts": ts} for r, ts in zip(traffic, stamps)])
        assert len(log.read(datetime(2025, 3, 2, 11), datetime(2025, 3, 2, 12))) == len(stamps)
        assert len(log.read(at.replace(hour=11, minute=31), at.replace(hour=13))) == 0
        with pytest.raises(ValueError, match=r"ts='yesterday' is not an ISO-8601 time"):
            log.append([{**traffic[0], "ts": "yesterday"}])
        assert log.count() == len(stamps)  # the refused batch wrote nothing
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("hours", [float("inf"), float("nan"), -1.0, 0.0, 1e12])
def test_run_monitoring_refuses_a_window_before_reading_anything(hours, tmp_path):
    # the reference folder does not exist: had it been read first, this would be a MonitoringError about it
    with pytest.raises(ValueError, match=r"^window_hours=") as refused:
        run_monitoring(tmp_path / "predictions.sqlite", tmp_path / "no_reference", window_hours=hours,
                       until=DAY2, out_dir=tmp_path / "reports")
    assert not isinstance(refused.value, MonitoringError)


@pytest.mark.parametrize("broken", ["reference.json", "pca.npz", "features.parquet"])
def test_an_unreadable_reference_is_named(broken, tmp_path):
    from typer.testing import CliRunner

    from btc.cli_monitor import monitor_command

    folder = _unreadable_reference(tmp_path / "ref", broken)
    with pytest.raises(MonitoringError, match=f"ref/{broken}' cannot be read as .*; rebuild the reference"):
        load_reference(folder)
    result = CliRunner().invoke(_cli("monitor", monitor_command), [
        "monitor", "--reference", str(folder), "--log", str(tmp_path / "predictions.sqlite"), "--out",
        str(tmp_path / "reports"), "--no-mlflow", "--no-dashboard"])
    assert result.exit_code == 1, result.output
    assert f"ref/{broken}' cannot be read as" in result.output and "Traceback" not in result.output



def test_a_reference_json_without_what_monitoring_reads_is_named(reference_dir, tmp_path):
    folder = Path(shutil.copytree(reference_dir, tmp_path / "ref"))
    metadata = json.loads((folder / "reference.json").read_text())
    del metadata["image_columns"], metadata["model_name"]
    (folder / "reference.json").write_text(json.dumps(metadata))
    with pytest.raises(MonitoringError, match=r"ref/reference.json' lacks model_name, image_columns; rebuild"):
        load_reference(folder)


def test_a_naive_snapshot_time_is_utc_whatever_the_local_zone(reference_dir, traffic, tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        reference = load_reference(reference_dir)
        verdict = drift_report(reference.features, features_from_log(records_frame(traffic), reference),
                               out_html=tmp_path / "r.html", timestamp=datetime(2025, 3, 2))
        assert json.loads(Path(verdict.snapshot).read_text())["timestamp"].startswith("2025-03-02T00:00:00")
    finally:
        monkeypatch.undo()
        time.tzset()


def test_monitor_reference_names_the_image_it_cannot_read(trained_run, synth_split, tmp_path):
    from typer.testing import CliRunner

    from btc.cli_monitor import reference_command

    split = synth_split.copy()
    victim = split.index[split["split"] == "val"][3]
    split.loc[victim, "path"] = str(tmp_path / "gone.jpg")
    split.to_parquet(tmp_path / "split.parquet")
    result = CliRunner().invoke(_cli("monitor-reference", reference_command), [
        "monitor-reference", str(trained_run.model_path), "--split", str(tmp_path / "split.parquet"),
        "--out", str(tmp_path / "ref"), "-s", "monitoring.pca_components=4"])
    assert result.exit_code == 2 and f"{tmp_path / 'gone.jpg'}: cannot read file" in result.output, result.output


def test_cli_monitor_refuses_misuse_before_reading_the_reference(tmp_path):
    """Each misuse exits 2 with its reason; the (unreadable) reference is never reached."""
    from typer.testing import CliRunner

    from btc.cli_monitor import monitor_command

    app = _cli("monitor", monitor_command)
    a_file, text_log = tmp_path / "a_file", tmp_path / "x.txt"
    a_file.write_text("")
    text_log.write_text("not a database")
    base = ["monitor", "--reference", str(_unreadable_reference(tmp_path / "ref", "features.parquet")),
            "--log", str(tmp_path / "predictions.sqlite"), "--out", str(tmp_path / "reports"), "--no-mlflow",
            "--no-dashboard"]
    cases = {
        "--window-hours inf": (["--window-hours", "inf"], "invalid --window-hours: window_hours=inf; expected a finite"),
        "--window-hours nan": (["--window-hours", "nan"], "invalid --window-hours: window_hours=nan; expected a finite"),
        "--window-hours -1": (["--window-hours", "-1"], "invalid --window-hours: window_hours=-1.0"),
        "config window": (["-s", "monitoring.window_hours=inf"], "window_hours=inf; expected a finite"),
        "since after until": (["--since", "2025-03-02", "--until", "2025-03-01"], "is not before until"),
        "--log text": (["--log", str(text_log)], "x.txt' is not a prediction log (SQLite): file is not a database"),
        "--log folder": (["--log", str(tmp_path)], "is a folder; expected the SQLite file"),
        "--out file": (["--out", str(a_file)], "report folder (--out) "),
        "--out under a file": (["--out", str(a_file / "reports")], "cannot be made: "),
        "--workspace file": (["--dashboard", "--workspace", str(a_file)], "Evidently workspace (--workspace) "),
    }
    for case, (extra, message) in cases.items():
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2, f"{case}: {result.exit_code} {result.output}"
        assert message in " ".join(result.output.split()), f"{case}: {result.output}"
        assert "features.parquet" not in result.output and "Traceback" not in result.output, case
    assert not (tmp_path / "reports").exists()


def test_cli_monitor_reference_refuses_a_split_that_is_not_parquet_and_an_out_that_is_a_file(tmp_path):
    from typer.testing import CliRunner

    from btc.cli_monitor import reference_command

    app = _cli("monitor-reference", reference_command)
    (tmp_path / "x.txt").write_text("path,label,split\n")
    (tmp_path / "a_file").write_text("")
    args = ["monitor-reference", str(tmp_path / "model.pt"), "--split", str(tmp_path / "x.txt")]
    not_parquet = CliRunner().invoke(app, args + ["--out", str(tmp_path / "ref")])
    assert not_parquet.exit_code == 2, not_parquet.output
    assert "split file" in not_parquet.output and "x.txt' cannot be read as Parquet" in not_parquet.output
    out_is_file = CliRunner().invoke(app, args + ["--out", str(tmp_path / "a_file")])
    assert out_is_file.exit_code == 2 and "reference folder (--out)" in out_is_file.output
    assert "exists and is not a folder" in out_is_file.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_evidently_ui_serves_the_dashboard(monitored):
    port = _free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "evidently"), "ui", "--workspace",
                           str(monitored["root"] / "evidently"), "--host", "127.0.0.1", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, response = time.monotonic() + 90, None
        while time.monotonic() < deadline and ui.poll() is None:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/api/projects", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert response is not None, f"evidently ui did not answer on port {port} (exit code {ui.poll()})"
        assert response.status_code == 200 and [p["name"] for p in response.json()] == [PROJECT]
    finally:
        ui.terminate()
        ui.wait(timeout=30)


def test_predictions_by_other_models_left_out_of_a_verdict_are_named(reference_dir, traffic, tmp_path):
    """After a rollback the served model's predictions are not the reference's: the verdict must say so."""
    log = PredictionLog(tmp_path / "predictions.sqlite")
    log.append(_stamped(traffic, DAY1 + timedelta(hours=1)))
    log.append(_stamped([{**r, "model_version": "9"} for r in traffic[:12]], DAY1 + timedelta(hours=3)))
    verdict = run_monitoring(log.path, reference_dir, window_hours=24, until=DAY2, min_predictions=30,
                             threshold=0.3, out_dir=tmp_path / "reports")
    name = load_reference(reference_dir).metadata["model_name"]
    assert verdict.n_current == len(traffic) and verdict.other_models == {f"{name} v9": 12}
    assert f"LEFT OUT 12 predictions by other models than {name} v" in verdict.summary()
    assert f"{name} v9 (12)" in verdict.summary()
    saved = json.loads(next((tmp_path / "reports").glob("*.verdict.json")).read_text())
    assert saved["other_models"] == {f"{name} v9": 12}


def test_a_window_of_the_references_model_alone_leaves_nothing_out(monitored):
    assert monitored["day1"].other_models == {} and "LEFT OUT" not in monitored["day1"].summary()
    assert act_on_drift(monitored["day1"]).startswith("no drift: drift share")


def test_cli_monitor_reference_lowers_the_components_to_what_few_images_allow(trained_run, synth_split, tmp_path):
    """As the training pipeline does, so the command it prints after a failure finishes the job."""
    import typer
    from typer.testing import CliRunner

    from btc.cli_monitor import reference_command

    app = typer.Typer()
    app.command("monitor-reference")(reference_command)
    app.command("unused")(lambda: None)
    synth_split.to_parquet(tmp_path / "split.parquet")
    n_val = int((synth_split["split"] == "val").sum())
    assert n_val <= 64
    result = CliRunner().invoke(app, ["monitor-reference", str(trained_run.model_path), "--split",
                                      str(tmp_path / "split.parquet"), "--out", str(tmp_path / "ref"),
                                      "-s", "monitoring.pca_components=64"])
    assert result.exit_code == 0, result.output
    assert f"monitoring.pca_components=64 lowered to {n_val - 1}: only {n_val} val images" in result.output
    assert len(load_reference(tmp_path / "ref").embedding_columns) == n_val - 1
