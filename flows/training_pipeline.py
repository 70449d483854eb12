"""The training pipeline as one Prefect flow: a data folder in, a gated, served and monitored model out.

Steps, each one task of :mod:`flows.tasks`:

1. **validate data**: ``build-manifest`` -> ``split-without-leakage`` -> ``validate-data``
   (the Great Expectations suite on the split, so leaks between train/val/test are checked
   too). A failed expectation stops the run here, before anything is trained or logged,
   and the error names the Data Docs page that explains it;
2. ``train`` on the train split, choosing the epoch on val;
3. ``evaluate`` on the test split: metrics, calibration, plots (``evaluation/``);
4. ``log-to-mlflow``: config, data, metrics, plots and the model in one MLflow run;
5. ``register-challenger``: a new registry version, alias ``challenger``;
6. ``promotion-gates``: challenger vs champion on the same frozen set; ``champion`` moves
   only if every gate passes;
7. if promoted: ``deploy-service`` (``$BTC_HOME/serving.json``, optionally the Bento; see
   :mod:`flows.service` for how the running service picks the new champion up) and
   ``monitoring-reference`` from the validation split, the reference drift is measured against.

Every output of a run goes to ``<output_dir>/<time>-<flow run name>/``, except the decoded-image
cache shared by runs (``<output_dir>/cache``) and, when promoted, ``$BTC_HOME/serving.json`` and the
monitoring reference. If a step after the promotion fails, the error says the champion has moved
and how to finish or undo it. Artifacts: the
validation table and Data Docs link, the training summary (metrics, gates, decision, links),
links to the MLflow run and the evaluation report. A failure raises
:class:`PipelineStepError` whose message starts with the step that failed.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger

from flows import tasks
from flows.reporting import file_link, mlflow_run_url, publish_summary, publish_validation


class PipelineStepError(RuntimeError):
    """A step of the pipeline failed; the message says which step and why."""


class DataValidationError(PipelineStepError):
    """The data failed its Great Expectations suite; the message names the Data Docs page."""


@contextmanager
def step(name: str) -> Iterator[None]:
    """Re-raise any failure inside as ``step '<name>' failed: <cause>``."""
    try:
        yield
    except PipelineStepError:
        raise
    except Exception as err:
        raise PipelineStepError(f"step {name!r} failed: {type(err).__name__}: {err}") from err


def run_folder(output_dir: Path) -> Path:
    from prefect.runtime import flow_run

    return Path(output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{flow_run.name or 'local'}"


def _validated_split(data_dir: str, cfg, run_dir: Path):
    """Step 1: manifest, split and the GX suite; raises :class:`DataValidationError` on failure."""
    with step("build-manifest"):
        manifest = tasks.build_manifest(data_dir)
    with step("split-without-leakage"):
        split = tasks.split_dataset(manifest, cfg)
    with step("validate-data"):
        report = tasks.validate_data(split, cfg, run_dir / "data_docs")
    publish_validation(report)
    if not report.success:
        failed = "; ".join(f"{o.name} ({o.observed})" for o in report.outcomes if o.status == "FAIL")
        accept = ", ".join([*cfg.validation.warn_only, *report.failures])
        raise DataValidationError(f"step 'validate-data' failed: the data in {data_dir} failed "
                                  f"{len(report.failures)} expectation(s): {failed}. Nothing was trained. "
                                  f"If a failure is a known, accepted issue, make it a warning with the override "
                                  f"'validation.warn_only=[{accept}]'. Data Docs: {report.data_docs_index}")
    return split, report


def _register_and_gate(cfg, run_id: str, split, build_bento: bool, run_dir: Path) -> tuple[str, object, dict]:
    """Steps 5-7: challenger, gates and, if promoted, the service record and the monitoring reference."""
    from btc.evaluate import rows_to_evaluate
    from monitoring.run import reference_dir_of

    name, paths = cfg.registry.model_name, {}
    with step("register-challenger"):
        version = tasks.register(run_id, name)
    with step("promotion-gates"):
        promotion = tasks.promote(name, cfg, version)  # refused if another run's version became challenger
    get_run_logger().info("%s", promotion.table())
    # This run's version is champion: promoted now, or by an earlier try of this task whose alias move
    # succeeded before it failed (the retry then finds "already champion"); either way it needs serving.
    if promotion.champion_after == version:
        try:
            with step("deploy-service"):
                paths["serving_record"] = tasks.deploy_service(name, version, run_id, build_bento)["record"]
            with step("monitoring-reference"):
                champion = tasks.load_model(f"models:/{name}/{version}")
                paths["monitoring_reference"] = str(tasks.build_monitoring_reference(
                    champion, rows_to_evaluate(split, "val"), reference_dir_of(cfg),
                    f"validation split of MLflow run {run_id}", cfg.monitoring.pca_components))
        except PipelineStepError as err:  # the alias has moved: say so, and how to finish or undo it
            was = f"v{promotion.champion_before}" if promotion.champion_before else "none"
            pinned = shlex.quote(f"models:/{name}/{version}")
            run_config = f"-c {shlex.quote(str(run_dir / 'config.yaml'))}"  # this run's settings: same folders
            raise PipelineStepError(
                f"{err}. The champion of {name!r} is already v{version} (was {was}), but serving.json and the "
                f"monitoring reference may still describe the previous one. Undo: btc registry rollback --name "
                f"{shlex.quote(name)} {run_config}; or fix the cause, serve it (btc serve --model {pinned} "
                f"{run_config}) and rebuild the reference (btc monitor-reference {pinned} {run_config})") from err
    return version, promotion, paths


def _publish_summary(run_dir: Path, result, report: dict, run_id: str, version: str | None, promotion,
                     extra_paths: dict) -> dict:
    """The ``training-summary``, ``mlflow-run`` and ``evaluation-report`` artifacts, and the flow's return value."""
    from btc.tracking.store import tracking_uri, ui_hint

    run_url = _mlflow_run_url(run_id)
    paths = {"run_dir": str(run_dir), "model": str(result.model_path),
             "data_docs": str(run_dir / "data_docs" / "index.html"), "evaluation": str(run_dir / "evaluation"),
             **extra_paths}
    links = {"MLflow run": run_url, "Data Docs": file_link(paths["data_docs"]),
             "evaluation report": file_link(run_dir / "evaluation" / "metrics.json"),
             **{f"plot: {k}": file_link(v) for k, v in report["artifacts"].items() if k != "metrics"},
             **{k.replace("_", " "): file_link(v) for k, v in extra_paths.items()}}
    mlflow_ui = ui_hint(tracking_uri())
    publish_summary(version=version, run_id=run_id, run_url=run_url, report=report, promotion=promotion, links=links,
                    mlflow_ui="" if mlflow_ui.startswith("open ") else mlflow_ui)  # a server: the run link is enough
    return {
        "run_dir": str(run_dir), "run_id": run_id, "version": version,
        "promoted": bool(promotion and promotion.promoted), "decision": promotion.reason if promotion else "not registered",
        "metrics": {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "ece": report["ece"],
                    "clean_macro_f1": (report.get("clean") or {}).get("macro_f1")},
        "paths": paths, "mlflow_run_url": run_url, "mlflow_ui": mlflow_ui,
    }


def _mlflow_run_url(run_id: str) -> str:
    from btc.tracking import store

    uri = store.tracking_uri()
    return mlflow_run_url(uri, store.client(uri).get_run(run_id).info.experiment_id, run_id)


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(data_dir: str, config_path: str | None = None, overrides: list[str] | None = None,
                      register_model: bool = True, build_bento: bool = False) -> dict:
    """Validate, train, evaluate, track, register, gate and (if promoted) deploy a model.

    Args:
        data_dir: dataset folder (Kaggle layout ``Training/`` + ``Testing/``, or class folders).
        config_path: YAML config; None: the defaults.
        overrides: ``section.key=value`` settings applied over the config.
        register_model: register the MLflow run's model and run the promotion gates.
        build_bento: also ``bentoml build`` the service when the model is promoted.

    Returns:
        ``run_dir, run_id, version, promoted, decision, metrics, paths`` (``version`` and
        ``promoted`` are None/False when ``register_model`` is False).
    """
    from btc.config import load_config
    from btc.evaluate import rows_to_evaluate

    logger = get_run_logger()
    with step("load-config"):
        cfg = load_config(Path(config_path) if config_path else None, overrides or [])
    run_dir = run_folder(cfg.output_dir).resolve()
    split, _ = _validated_split(data_dir, cfg, run_dir)
    logger.info("data passed validation: %s", split["split"].value_counts().to_dict())

    with step("train"):
        result = tasks.train(cfg, split, run_dir)
    with step("evaluate"):
        model = tasks.load_model(str(result.model_path))
        report = tasks.evaluate(model, rows_to_evaluate(split, "test"), run_dir / "evaluation", result.history, cfg)
    logger.info("test macro-F1 %.4f, accuracy %.4f, ECE %.4f", report["macro_f1"], report["accuracy"], report["ece"])
    with step("log-to-mlflow"):
        run_id = tasks.log_run(cfg, result, split, report, run_dir / "evaluation")

    version, promotion, paths = _register_and_gate(cfg, run_id, split, build_bento, run_dir) if register_model else (None, None, {})
    with step("publish-summary"):
        return _publish_summary(run_dir, result, report, run_id, version, promotion, paths)
