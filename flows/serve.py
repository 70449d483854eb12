"""Serve every deployment from one process: ``python -m flows.serve`` (no work pool, no worker).

The same three deployments as ``prefect.yaml`` (which a ``process`` work pool and
``prefect worker`` run instead):

* ``training-pipeline/training-pipeline``: on demand, with the data folder as parameter;
* ``training-pipeline/retrain``: what drift triggers (see :mod:`flows.monitoring_flow`),
  one run at a time (a trigger while one is queued or running is dropped, not queued);
* ``monitoring/hourly``: the monitoring flow every hour.

It needs a Prefect server (``prefect server start``, and ``PREFECT_API_URL`` pointing at it):
deployments live on a server. Flow runs execute as subprocesses of this process, in the
working directory it was started from (the repository root, for relative data paths and
``.btc/``). Stop it with Ctrl-C; schedules are paused on shutdown.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_DATA_DIR = "data"


def deployments(data_dir: str, config_path: str | None = None, *, monitoring_interval_s: float | None = 3600):
    """The deployments ``prefect.yaml`` also defines, as runner deployments of the flows."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.monitoring_flow import monitoring
    from flows.training_pipeline import training_pipeline

    parameters = {"data_dir": data_dir, "config_path": config_path}
    return [
        training_pipeline.to_deployment(name="training-pipeline", parameters=parameters, tags=["btc"],
                                        description="Validate, train, evaluate, register and gate a model."),
        training_pipeline.to_deployment(name="retrain", parameters=parameters, concurrency_limit=ConcurrencyLimitConfig(
                                            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
                                        tags=["btc", "retrain"], description="Retraining started on drift."),
        monitoring.to_deployment(name="hourly", interval=monitoring_interval_s, parameters={"config_path": config_path},
                                 tags=["btc"], description="Drift over the last day of predictions, every hour."),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("BTC_DATA_DIR", DEFAULT_DATA_DIR),
                        help="dataset folder the pipeline and retrain deployments train on "
                             "(default $BTC_DATA_DIR or 'data')")
    parser.add_argument("--config", default=None, help="YAML config passed to every flow")
    parser.add_argument("--no-schedule", action="store_true", help="serve monitoring without its hourly schedule")
    args = parser.parse_args(argv)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # the environment, or the active profile (prefect config set)
        parser.exit(2, "error: PREFECT_API_URL is not set: deployments live on a Prefect server (prefect server start, "
                       "then export PREFECT_API_URL=http://127.0.0.1:4200/api or prefect config set it); without one they would vanish with "
                       "this process\n")

    from prefect import serve

    serve(*deployments(args.data_dir, args.config, monitoring_interval_s=None if args.no_schedule else 3600))


if __name__ == "__main__":
    main()
