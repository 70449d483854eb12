"""The Prefect flows end to end on tiny generated data, against a real (temporary) Prefect server.

One ``prefect_test_harness`` server for the module (it takes 20-50 s to start here); each
pipeline run gets its own MLflow store and ``$BTC_HOME`` under ``tmp_path``. Prefect
artifacts are read back through the client, as the UI would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from btc.data.synth import generate_synthetic_dataset

TINY = ["data.image_size=64", "model.width=8", "train.epochs=2", "train.batch_size=16", "train.lr=0.005",
        "eval.gradcam_per_class=1"]
LENIENT = ["registry.gates.min_macro_f1=0", "registry.gates.min_tumour_recall={glioma: 0, meningioma: 0, pituitary: 0}",
           "registry.gates.max_ece=1", "registry.gates.max_flip_change=1", "registry.gates.max_intensity_change=1",
           "registry.gates.min_margin_over_champion=-1"]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server and database; Prefect's home under tmp too."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect_home"),
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=180):
            yield


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("flows") / "data", per_class=18, seed=3, size=64)


def overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path / 'runs'}", *TINY, *extra]


def flow_run_artifacts(flow_run_id) -> dict:
    """The artifacts of a flow run by key, read back from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def stores(root: Path) -> dict[str, str]:
    """The environment of one isolated MLflow store, BentoML home and ``$BTC_HOME`` under ``root``."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "MLFLOW_ARTIFACTS_DESTINATION": str(root / "mlartifacts"),
            "BENTOML_HOME": str(root / "bentoml"), "BTC_HOME": str(root / "btc_home")}


def aliases(client: MlflowClient) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model("btc-classifier").aliases.items()}


@pytest.fixture(scope="module")
def promoted(prefect_server, tiny_data, tmp_path_factory):
    """One pipeline run with lenient gates (so it is promoted), shared by the tests below.

    Returns ``(flow run state, store environment, run root)``; a test that uses the store sets the
    environment with ``monkeypatch`` (the autouse ``isolated_stores`` gives every test its own).
    """
    from flows.training_pipeline import training_pipeline

    root = tmp_path_factory.mktemp("promoted")
    env = stores(root)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        state = training_pipeline(str(tiny_data), overrides=overrides(root, *LENIENT), return_state=True)
    return state, env, root


def use(monkeypatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_pipeline_registers_gates_deploys_and_publishes(promoted, tiny_data, monkeypatch):
    from flows.training_pipeline import training_pipeline

    state, env, root = promoted
    use(monkeypatch, env)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["version"] == "1" and summary["promoted"], summary["decision"]

    client = MlflowClient()
    assert aliases(client) == {"challenger": "1", "champion": "1"}
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["test_macro_f1"] == pytest.approx(summary["metrics"]["macro_f1"])
    assert Path(summary["paths"]["model"]).is_file() and Path(summary["paths"]["data_docs"]).is_file()

    record = json.loads(Path(summary["paths"]["serving_record"]).read_text())
    assert record["model_version"] == "1" and record["model_uri"] == "models:/btc-classifier@champion"
    reference = json.loads((Path(summary["paths"]["monitoring_reference"]) / "reference.json").read_text())
    assert (reference["model_name"], reference["model_version"]) == ("btc-classifier", "1")

    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"data-validation", "data-docs", "training-summary", "mlflow-run", "evaluation-report"} <= set(artifacts)
    table = artifacts["training-summary"].data
    assert summary["run_id"] in table and "| macro_f1 |" in table and "PROMOTED" in table
    assert f"/runs/{summary['run_id']}" in artifacts["mlflow-run"].data
    assert "PASSED" in artifacts["data-validation"].data

    # A second run that cannot beat the champion by a full point of macro-F1: challenger moves, champion stays.
    strict = [o for o in LENIENT if "margin" not in o] + ["registry.gates.min_margin_over_champion=1.0"]
    second = training_pipeline(str(tiny_data), overrides=overrides(root, *strict))
    assert second["version"] == "2" and not second["promoted"]
    assert second["decision"].startswith("REJECTED") and "beats_champion" in second["decision"]
    assert aliases(client) == {"challenger": "2", "champion": "1"}
    assert "serving_record" not in second["paths"]
    assert json.loads(Path(summary["paths"]["serving_record"]).read_text())["model_version"] == "1"


def test_a_failure_after_the_promotion_says_the_champion_moved_and_how_to_undo_it(prefect_server, tiny_data, tmp_path,
                                                                                  monkeypatch):
    from flows.training_pipeline import PipelineStepError, training_pipeline

    use(monkeypatch, stores(tmp_path))
    monkeypatch.setenv("BTC_HOME", str(tmp_path / "a_file"))  # serving.json cannot be written under it
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PipelineStepError) as failed:
        training_pipeline(str(tiny_data), overrides=overrides(tmp_path, *LENIENT))
    message = str(failed.value)
    assert message.startswith("step 'deploy-service' failed: ")
    assert "The champion of 'btc-classifier' is already v1 (was none)" in message
    run_config = message.split("btc monitor-reference models:/btc-classifier/1 -c ")[1].rstrip(")")
    assert Path(run_config).name == "config.yaml" and Path(run_config).is_file()  # the run's settings, its folders
    assert f"btc registry rollback --name btc-classifier -c {run_config}" in message
    assert aliases(MlflowClient())["champion"] == "1"


def test_invalid_data_stops_before_training(prefect_server, tiny_data, tmp_path):
    import shutil

    from flows.training_pipeline import DataValidationError, training_pipeline

    bad = Path(shutil.copytree(tiny_data, tmp_path / "bad"))
    for split in ("Training", "Testing"):
        shutil.rmtree(bad / split / "pituitary")
    victim = next((bad / "Training" / "glioma").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated JPEG

    state = training_pipeline(str(bad), overrides=overrides(tmp_path, *LENIENT), return_state=True)
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, DataValidationError)
    message = str(err)
    assert message.startswith("step 'validate-data' failed") and "Nothing was trained" in message
    docs = Path(message.split("Data Docs: ")[1].strip())
    assert docs.name == "index.html" and docs.is_file()
    assert "files_readable" in message and "all_classes_present" in message
    assert "'validation.warn_only=[no_exact_duplicates_within_source_split, given_test_has_no_near_copies_of_training, no_label_conflicts, all_classes_present, files_readable]'" in message

    assert not list((tmp_path / "runs").rglob("*.pt")), "a model file was written although validation failed"
    client = MlflowClient()
    experiment = client.get_experiment_by_name("btc")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert "FAILED" in artifacts["data-validation"].data and "training-summary" not in artifacts


def test_monitoring_skips_without_reference(prefect_server, tmp_path):
    from flows.monitoring_flow import monitoring

    result = monitoring(window_hours=1)
    assert result["status"] == "skipped" and "reference" in result["summary"]
    elsewhere = tmp_path / "elsewhere"  # the config's reference folder, as `btc monitor` reads it
    result = monitoring(window_hours=1, overrides=[f"monitoring.reference_dir={elsewhere}"])
    assert result["status"] == "skipped" and f"monitoring reference {str(elsewhere)!r} lacks" in result["summary"]


def test_monitoring_refuses_bad_settings_before_it_writes_anything(prefect_server, tmp_path):
    from btc.paths import reports_dir
    from flows.monitoring_flow import monitoring

    with pytest.raises(ValueError, match=r"window_hours=0(\.0)?; expected a finite number of hours above 0"):
        monitoring(window_hours=0)  # not the config's 24 h
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=f"cannot use {tmp_path / 'a_file'} as the Evidently workspace "
                                         r"\(monitoring.workspace\)"):
        monitoring(window_hours=1, overrides=[f"monitoring.workspace={tmp_path / 'a_file'}"])
    assert not (reports_dir() / "monitoring").exists()


def test_monitoring_fails_when_the_reference_is_for_another_model(prefect_server, trained_run, synth_split, tmp_path):
    """After a rollback or a promotion without a new reference the served model goes unwatched: a failed run, not "skipped"."""
    from btc.evaluate import rows_to_evaluate
    from btc.data.cache import decode_rows
    from btc.predict import Predictor
    from btc.predlog import PredictionLog
    from btc.reference import ReferenceMismatch, build_reference, log_records
    from flows.monitoring_flow import monitoring

    predictor = Predictor.load(trained_run.model_path)
    rows = rows_to_evaluate(synth_split, "val")
    reference = build_reference(predictor, rows, pca_components=2).save(tmp_path / "reference")
    images = list(decode_rows(rows_to_evaluate(synth_split, "test"), 96))
    records = [{**r, "model_version": "other"} for r in log_records(predictor, images)]  # stamped now
    PredictionLog(tmp_path / "log.sqlite").append(records)
    with pytest.raises(ReferenceMismatch, match=f"the reference is for model {predictor.name} v{predictor.version}, "
                                                f"but the predictions between .* are by {predictor.name} vother"):
        monitoring(window_hours=1, log_path=str(tmp_path / "log.sqlite"), reference_dir=str(reference), retrain=False)


def test_drift_triggers_the_retrain_deployment(promoted, tiny_data, monkeypatch):
    """Shifted predictions of the promoted model: the monitoring flow schedules ``training-pipeline/retrain``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from btc.paths import prediction_log_path
    from btc.predict import Predictor
    from btc.predlog import PredictionLog
    from btc.reference import log_records
    from flows.monitoring_flow import RETRAIN_DEPLOYMENT, monitoring, retrain_deployment_available
    from flows.serve import deployments

    use(monkeypatch, promoted[1])
    predictor = Predictor.load("models:/btc-classifier@champion")
    rng = np.random.default_rng(0)
    shifted = [rng.integers(180, 256, size=(64, 64), dtype=np.uint8) for _ in range(24)]  # bright noise, not MRI
    PredictionLog(prediction_log_path()).append(log_records(predictor, shifted))

    assert not retrain_deployment_available()[0]
    retrain = next(d for d in deployments(str(tiny_data)) if d.name == "retrain")
    deployment_id = retrain.apply()
    assert retrain_deployment_available() == (True, "")

    workspace = Path(prediction_log_path()).parent / "my-dashboard"
    result = monitoring(overrides=["monitoring.min_predictions=20", "monitoring.window_hours=1",
                                   f"monitoring.workspace={workspace}"])  # the window and workspace from the config
    assert result["status"] == "drift", result["summary"]
    assert workspace.is_dir() and any(workspace.rglob("*.json"))
    experiment = MlflowClient().get_experiment_by_name("btc-monitoring")  # logged by its own task
    logged = MlflowClient().search_runs([experiment.experiment_id])
    assert [r.data.tags["drifted"] for r in logged] == ["True"] and logged[0].data.params["window_until"]
    assert result["action"].startswith(f"triggered deployment {RETRAIN_DEPLOYMENT}: flow run"), result["action"]
    assert Path(result["html"]).is_file()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert len(runs) == 1 and "drift" in runs[0].tags


def test_retries_only_for_failures_that_may_pass():
    from prefect.states import Failed

    from btc.config import ConfigError
    from btc.tracking.store import TrackingError
    from flows.tasks import transient

    def retried(err: Exception) -> bool:
        return transient(None, None, Failed(data=err))

    assert retried(OSError("disk busy")) and retried(TrackingError("server down")) and retried(RuntimeError("x"))
    assert not retried(ValueError("unknown class folder")) and not retried(ConfigError("bad override"))


def test_flows_serve_takes_the_server_from_the_prefect_profile(tmp_path):
    """`prefect config set PREFECT_API_URL=...` (what prefect.yaml and the docs suggest) is as good as the variable."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    prefect_cli = str(Path(sys.executable).with_name("prefect"))
    unset = subprocess.run([sys.executable, "-m", "flows.serve", "--no-schedule"], env=env, capture_output=True,
                           text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert unset.returncode == 2 and "PREFECT_API_URL is not set" in unset.stderr, unset.stderr
    subprocess.run([prefect_cli, "config", "set", "PREFECT_API_URL=http://127.0.0.1:9/api"], env=env, check=True,
                   capture_output=True, timeout=120)
    served = subprocess.run([sys.executable, "-m", "flows.serve", "--no-schedule"], env=env, capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).parents[1])
    # it went on to register the deployments on the profile's server (nothing listens on port 9)
    assert served.returncode != 0 and "is not set" not in served.stderr and "ConnectError" in served.stderr, served.stderr


def test_build_bento_labels_the_champion_version(tmp_path):
    """``bentoml build`` of the service (a bentofile written here: the repository has none yet)."""
    import subprocess
    import sys

    from flows.service import build_bento

    bentofile = tmp_path / "bentofile.yaml"
    bentofile.write_text('service: "serving.service:BrainTumorClassifier"\ninclude: ["serving/*.py", "btc/**/*.py"]\n')
    tag = build_bento("7", bentofile)
    assert tag.startswith("btc-classifier:")
    shown = subprocess.run([sys.executable, "-m", "bentoml", "get", tag, "-o", "json"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["labels"] == {"model_version": "7"}
    with pytest.raises(FileNotFoundError, match="no Bento build file"):
        build_bento("7", tmp_path / "missing.yaml")
