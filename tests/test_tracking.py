"""MLflow tracking on a real SQLite store: what a training run logs, the exported model, the default store.

One tiny trained model (conftest's ``trained_run``) is logged once per module into the
*embedded default* store (no ``MLFLOW_TRACKING_URI``; ``BTC_HOME`` in a temporary folder), so
the tests also show that tracking needs no setup and writes nothing outside ``$BTC_HOME``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from btc.cli import app
from btc.data.cache import decode_all
from btc.data.manifest import manifest_digest
from btc.evaluate import rows_to_evaluate
from btc.predict import Predictor
from btc.tracking import store
from btc.tracking.model_io import CHECKPOINT, load_predictor
from btc.tracking.run_logging import class_counts, find_requirements_lock, flatten_config, git_commit, log_training_run
from btc.tracking.store import TrackingError

STORE_ENV_UNSET = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ARTIFACTS_DESTINATION")


def _point_at(mp: pytest.MonkeyPatch, home: Path) -> None:
    for var in STORE_ENV_UNSET:
        mp.delenv(var, raising=False)
    mp.setenv("BTC_HOME", str(home))


@pytest.fixture(scope="module")
def logged(tmp_path_factory, trained_run, synth_split, tiny_config):
    """The trained tiny model logged once into the embedded default store of a temporary BTC_HOME."""
    from btc.reports import evaluation_artifacts

    home = tmp_path_factory.mktemp("tracking") / "btc_home"
    stray = [p for p in (Path("mlflow.db"), Path("mlruns"), Path(".btc")) if not p.exists()]
    with pytest.MonkeyPatch.context() as mp:
        _point_at(mp, home)
        predictor = Predictor.from_checkpoint(trained_run.model_path)
        rows = rows_to_evaluate(synth_split, "test")
        eval_dir = home.parent / "evaluation"
        report = evaluation_artifacts(predictor, rows, eval_dir, history=trained_run.history, gradcam_per_class=0)
        run_id = log_training_run(tiny_config, trained_run, synth_split, report, artifacts_dir=eval_dir)
        yield SimpleNamespace(home=home, run_id=run_id, report=report, rows=rows, predictor=predictor)
    assert not [str(p) for p in stray if p.exists()], "tracking wrote outside BTC_HOME (into the working directory)"


@pytest.fixture
def embedded(logged, isolated_stores, monkeypatch):
    """Each test sees the module's embedded store (conftest's autouse fixture points elsewhere)."""
    _point_at(monkeypatch, logged.home)
    return logged


def _client() -> mlflow.MlflowClient:
    return store.client()


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_default_store_is_sqlite_under_btc_home(embedded):
    home = embedded.home.resolve()
    assert store.tracking_uri() == f"sqlite:///{home / 'mlflow.db'}"
    assert (home / "mlflow.db").is_file()
    experiment = _client().get_experiment_by_name("btc")
    assert experiment.artifact_location == (home / "mlartifacts").as_uri()
    run = _client().get_run(embedded.run_id)
    assert run.info.artifact_uri.startswith((home / "mlartifacts").as_uri())
    assert "mlflow ui --backend-store-uri sqlite:///" in store.ui_hint(store.tracking_uri())


def test_mlflow_env_vars_override_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert store.registry_uri() == store.tracking_uri()
    assert store.local_artifact_root(store.tracking_uri()) == tmp_path.resolve() / "mlartifacts"
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "arts"))
    assert store.local_artifact_root(store.tracking_uri()) == (tmp_path / "arts").resolve()
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://registry.invalid:5000")
    assert store.registry_uri() == "http://registry.invalid:5000"


def test_run_logs_config_data_epochs_and_test_metrics(embedded, trained_run, synth_split, tiny_config):
    client = _client()
    run = client.get_run(embedded.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params == flatten_config(tiny_config)
    assert params["train.epochs"] == "3" and params["model.width"] == "8"
    assert params["registry.gates.min_tumour_recall.glioma"] == "0.75"

    for key in ("train_loss", "val_macro_f1", "val_accuracy"):
        history = client.get_metric_history(embedded.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [h["epoch"] for h in trained_run.history]
        values = [m.value for m in sorted(history, key=lambda m: m.step)]
        assert values == pytest.approx([h[key] for h in trained_run.history])

    metrics, report = run.data.metrics, embedded.report
    assert metrics["test_macro_f1"] == pytest.approx(report["macro_f1"])
    assert metrics["test_ece"] == pytest.approx(report["ece"])
    assert metrics["test_recall_glioma"] == pytest.approx(report["per_class"]["glioma"]["recall"])
    assert metrics["test_clean_macro_f1"] == pytest.approx(report["clean"]["macro_f1"])
    assert metrics["test_clean_n_images"] == report["clean"]["n_images"]
    assert metrics["temperature"] == pytest.approx(trained_run.temperature)

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == manifest_digest(synth_split)
    tags = {t.key: t.value for t in dataset_input.tags}
    assert json.loads(tags["class_counts"]) == class_counts(synth_split)
    assert tags["mlflow.data.context"] == "training"
    assert run.data.tags["btc.dataset_digest"] == manifest_digest(synth_split)


def test_run_logs_artifacts_environment_and_commit(embedded, tmp_path):
    client = _client()
    run = client.get_run(embedded.run_id)
    files = _artifacts(client, embedded.run_id)
    assert {"config.yaml", "history.json", "data/split.parquet", "data/class_counts.json", "evaluation/metrics.json",
            "evaluation/confusion_matrix.png", "evaluation/reliability.png", "evaluation/roc_curves.png",
            "evaluation/training_curves.png", "environment/environment.json", "model_card.json",
            "model_card.md"} <= files
    assert find_requirements_lock() is not None and "environment/requirements.lock" in files
    env_file = client.download_artifacts(embedded.run_id, "environment/environment.json", str(tmp_path))
    env = json.loads(Path(env_file).read_text())
    assert torch.__version__.startswith(env["packages"]["torch"])
    assert run.data.tags["python_version"] == env["python"]
    commit = git_commit()
    assert run.data.tags.get("git_commit") == (commit[0] if commit else None)


def test_logged_model_is_exported_graph_with_signature_and_card(embedded, tmp_path):
    from mlflow.models import Model

    with store.fluent_tracking(store.tracking_uri()):  # MLflow resolves a run's model with its global URI
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{embedded.run_id}/model", dst_path=str(tmp_path)))
    assert (local / "data" / "model.pt2").is_file() and not (local / "data" / "model.pth").exists()  # no pickle
    model = Model.load(local / "MLmodel")
    (spec,) = model.signature.inputs.inputs
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, 64, 64)
    assert model.signature.outputs.inputs[0].shape == (-1, 4)
    example = json.loads((local / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"]).shape == (2, 64, 64)
    meta = model.metadata
    assert meta["image_size"] == 64 and meta["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert meta["temperature"] == pytest.approx(embedded.predictor.spec.temperature)
    assert "standardisation" in meta["normalisation"] and meta["checkpoint"]["path"] == CHECKPOINT
    card = json.loads((local / "extra_files" / "model_card.json").read_text())
    assert "not a diagnosis" in card["intended_use"].lower()
    assert card["input"]["value_range"] == [0, 255] and card["input"]["kind"] == "grayscale MRI slice"
    assert card["metrics"]["macro_f1"] == pytest.approx(embedded.report["macro_f1"])
    assert embedded.report["n_images"] == card["metrics"]["n_images"]
    assert card["training_data"]["digest"] in card["metrics"]["test_set"]
    bands = card["metrics"]["by_train_distance"]
    assert bands == embedded.report["by_train_distance"] and sum(b["n_images"] for b in bands) == card["metrics"]["n_images"]
    markdown = (local / "extra_files" / "model_card.md").read_text()
    assert "# Model card" in markdown and "accuracy by bits (256-bit pHash) to the nearest training image" in markdown


def test_exported_model_equals_in_memory_model_for_any_batch(embedded):
    images = decode_all(list(embedded.rows["path"][:7]), 64, progress=False)
    with store.fluent_tracking(store.tracking_uri()):
        exported = mlflow.pytorch.load_model(f"runs:/{embedded.run_id}/model")
    for batch in (1, 3, 7):
        with torch.no_grad():
            got = exported(torch.from_numpy(images[:batch])).numpy()
        want = embedded.predictor.predict_proba(list(images[:batch]))
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_load_predictor_rebuilds_a_full_predictor(embedded):
    predictor = load_predictor(f"runs:/{embedded.run_id}/model")
    images = decode_all(list(embedded.rows["path"][:5]), 64, progress=False)
    np.testing.assert_allclose(predictor.predict_proba(list(images)), embedded.predictor.predict_proba(list(images)),
                               atol=1e-6)
    assert predictor.version == f"run-{embedded.run_id[:8]}"
    assert predictor.embed(list(images[:2])).shape[0] == 2
    heat, _, prediction = predictor.explain(images[0])
    assert heat.shape == (64, 64) and prediction["label"] in predictor.classes
    with pytest.raises(ValueError, match="cannot load model 'runs:/0123456789abcdef/model'"):
        load_predictor("runs:/0123456789abcdef/model")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_before_any_work(monkeypatch, tmp_path, tiny_config, trained_run, synth_split):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"cannot reach MLflow tracking server at {uri}"):
        log_training_run(tiny_config, trained_run, synth_split, None)
    assert time.monotonic() - start < 10

    split_file = tmp_path / "split.parquet"
    synth_split.to_parquet(split_file)
    res = CliRunner().invoke(app, ["train", str(split_file), "--out", str(tmp_path / "run"), "-s", "model.width=8"])
    assert res.exit_code == 2 and "cannot reach MLflow tracking server" in res.output and "--no-track" in res.output
    assert not (tmp_path / "run").exists(), "nothing may be trained when the run cannot be tracked"
    res = CliRunner().invoke(app, ["evaluate", "--model", "models:/btc-classifier@champion", "--data", str(split_file)])
    assert res.exit_code == 2 and "cannot reach MLflow tracking server" in res.output


@pytest.mark.slow
def test_cli_train_tracks_by_default(tmp_path, synth_split):
    split_file = tmp_path / "split.parquet"
    synth_split.to_parquet(split_file)
    res = CliRunner().invoke(app, ["train", str(split_file), "--out", str(tmp_path / "run"), "--epochs", "1",
                                   "-s", f"output_dir={tmp_path}", "-s", "data.image_size=64", "-s", "model.width=8",
                                   "-s", "train.batch_size=16", "-s", "eval.gradcam_per_class=0"])
    assert res.exit_code == 0, res.output
    assert "MLflow run " in res.output and "mlflow ui --backend-store-uri" in res.output
    run_id = res.output.split("MLflow run ", 1)[1].split()[0]
    run = store.client().get_run(run_id)
    assert "test_macro_f1" in run.data.metrics and run.data.params["train.epochs"] == "1"


def test_the_model_card_says_how_a_given_test_folder_was_split(synth_split):
    from btc.tracking.run_logging import describe_dataset

    given = describe_dataset(synth_split)["split_method"]  # the fixture has its own Testing folder
    assert "own test folder kept whole as the test split" in given and "near_dup_in_train" in given
    flat = synth_split.assign(source_split="")
    assert describe_dataset(flat)["split_method"].endswith("near-duplicate clusters kept within one split")
