"""``btc serve``: run the BentoML service (``serving/service.py``) on one model.

A plain function the CLI registers (``app.command("serve")(serve_command)``); it starts
``bentoml serve`` as a child process with the model and settings passed as environment
variables, so the service loads the model exactly as it does in a container. The tests and
the benchmark start and stop the service with :func:`start_service` and :func:`stop_service`.

Before the server starts, the model is loaded once with the server's environment
(:func:`model_load_error`): BentoML restarts a model worker that fails to start for ever, so a
model that cannot load would otherwise keep ``btc serve`` running and logging the same error
instead of stopping with it.

Stopping: BentoML's workers run in sessions of their own, and without a bound uvicorn waits
for ever for idle connections to close, so a SIGTERM could leave the entry worker running.
The command therefore passes ``--timeout-graceful-shutdown``, and :func:`stop_service` kills
the workers it recorded if the server has not exited in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

SERVICE = "serving.service:BrainTumorClassifier"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
GRACEFUL_SHUTDOWN_S = 5
_CHECK_PREFIX = "btc-model-check: "
# Run by `python -c` in the child of model_load_error: the service's own load, then the reason on one line.
_LOAD_CHECK = f"""
import os, sys
from btc.predict import Predictor
try:
    Predictor.load(os.environ["BTC_MODEL_URI"], device=os.environ.get("BTC_DEVICE", "cpu"))
except (OSError, ValueError) as err:
    sys.exit({_CHECK_PREFIX!r} + " ".join(str(err).split()))
"""


STORE_VARIABLES = ("BTC_HOME", "BTC_PREDICTION_LOG", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                   "MLFLOW_ARTIFACTS_DESTINATION", "BENTOML_HOME")


def store_locations(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that locate btc's stores (and always ``BTC_HOME``), made absolute.

    Absolute, because a server runs from the project root (or a Bento's folder): the default
    MLflow store and the prediction log stay where `btc` would put them from the caller's folder.
    """
    from btc.tracking.store import sqlite_path

    found = {"BTC_HOME": str(Path(env.get("BTC_HOME", ".btc")).resolve())}
    for name in ("BTC_PREDICTION_LOG", "MLFLOW_ARTIFACTS_DESTINATION", "BENTOML_HOME"):
        if env.get(name):
            found[name] = str(Path(env[name]).resolve())
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        if env.get(name):
            db = sqlite_path(env[name])  # sqlite:///mlflow.db is relative to the caller's folder
            relative = db is not None and not db.is_absolute()
            found[name] = env[name].replace(f"sqlite:///{db}", f"sqlite:///{db.resolve()}", 1) if relative else env[name]
    return found


def serve_environment(model: str, *, workers: int, api_key_env: str, config: Path | None,
                      base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the ``bentoml serve`` child process.

    Args:
        model: ``model.pt`` path or MLflow URI (``models:/btc-classifier@champion``).
        workers: HTTP worker processes of the entry service.
        api_key_env: the variable holding the API key (copied into ``BTC_API_KEY``).
        config: YAML config whose ``serving`` section sets the limits.
        base: the environment to start from (default this process's).

    Raises:
        ValueError: ``workers`` below 1, ``$BTC_TORCH_THREADS`` not a whole number of 1 or more, or the
            config (``config`` or ``$BTC_CONFIG``) is missing or invalid.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: expected 1 or more")
    if config is not None and not Path(config).is_file():
        raise ValueError(f"config file {str(config)!r} does not exist")
    env = dict(os.environ if base is None else base)
    threads = env.get("BTC_TORCH_THREADS", "").strip()
    if threads and not (threads.isdigit() and int(threads) >= 1):  # else the model worker dies and restarts for ever
        raise ValueError(f"BTC_TORCH_THREADS={threads!r}: expected a whole number of threads, 1 or more (or unset "
                         "for torch's default)")
    is_uri = model.startswith(("models:/", "runs:/"))
    env["BTC_MODEL_URI"] = model if is_uri else str(Path(model).resolve())
    env["BTC_API_WORKERS"] = str(workers)
    env.update(store_locations(env))
    if config is not None:
        env["BTC_CONFIG"] = str(Path(config).resolve())
    elif env.get("BTC_CONFIG"):  # from the caller's environment: relative to the caller's folder too
        env["BTC_CONFIG"] = str(Path(env["BTC_CONFIG"]).resolve())
    from btc.serving_logic import settings_from_env

    try:
        settings_from_env(env)  # as the service will read it: a bad config is said now, not by a dying server
    except ValueError as err:
        source = "--config" if config is not None else "$BTC_CONFIG"
        raise ValueError(f"{source}: {err}") from None
    key = env.get(api_key_env)
    if key:
        env["BTC_API_KEY"] = key
    elif api_key_env != "BTC_API_KEY":
        env.pop("BTC_API_KEY", None)
    return env


def model_load_error(env: dict[str, str]) -> str | None:
    """Why the service could not load its model (None: it loads), found by loading it as the service does.

    The load runs in a short-lived child process with the server's environment, so it reads the
    same MLflow store and file as the model service will; a child, because ``btc serve`` waits
    for the server for its whole life and should not hold torch and the weights meanwhile.

    Args:
        env: the server's environment (see :func:`serve_environment`); ``BTC_MODEL_URI`` names the model.
    """
    done = subprocess.run([sys.executable, "-c", _LOAD_CHECK], env=env, capture_output=True, text=True,
                          cwd=PROJECT_ROOT)  # where the server runs
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    reasons = [line[len(_CHECK_PREFIX):] for line in lines if line.startswith(_CHECK_PREFIX)]
    if reasons:
        return reasons[-1]
    return (f"cannot load model {env['BTC_MODEL_URI']!r}: "
            f"{lines[-1] if lines else f'the check exited with {done.returncode}'}")


def serve_command(
    model: str = typer.Option("models:/btc-classifier@champion", "--model", "-m", envvar="BTC_MODEL_URI",
                              help="model.pt path or MLflow URI (models:/name@alias)"),
    port: int = typer.Option(3000, min=1, max=65535, help="TCP port"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 to expose it)"),
    api_key_env: str = typer.Option("BTC_API_KEY", help="environment variable holding the API key; unset: no key"),
    workers: int = typer.Option(1, min=1, envvar="BTC_API_WORKERS",
                                help="HTTP worker processes (the model runs in its own process)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (serving limits)"),
) -> None:
    """Serve the classifier over HTTP: /predict, /predict_batch, /explain, /metadata, /readyz."""
    if not model.startswith(("models:/", "runs:/")) and not Path(model).is_file():
        typer.secho(f"error: model {model!r} is neither an existing model.pt nor a models:/ or runs:/ URI",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        env = serve_environment(model, workers=workers, api_key_env=api_key_env, config=config)
    except ValueError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    try:
        problem = model_load_error(env)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if problem is not None:
        typer.secho(f"error: {problem}; the server was not started", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    command = serve_command_line(host, port)
    typer.echo(f"serving {env['BTC_MODEL_URI']} on http://{host}:{port} "
               f"(API key {'required' if env.get('BTC_API_KEY') else 'off'})")
    proc = subprocess.Popen(command, env=env)
    # A supervisor (docker stop, systemd, supervisord) signals only this process: pass it on to the
    # server and its workers rather than leave them running without us.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the server got the Ctrl+C too; let it finish shutting down
        try:
            proc.wait(timeout=GRACEFUL_SHUTDOWN_S + 10)
        except subprocess.TimeoutExpired:
            stop_service(proc, timeout=5)
        code = 130
    except _Terminated:
        stop_service(proc, timeout=GRACEFUL_SHUTDOWN_S + 10)
        code = 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


class _Terminated(Exception):
    """SIGTERM reached ``btc serve``."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def serve_command_line(host: str, port: int) -> list[str]:
    """The ``bentoml serve`` command for the service, run from the project root."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--working-dir", str(PROJECT_ROOT), "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_S)]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def start_service(env: dict[str, str], *, port: int, log_path: Path, host: str = "127.0.0.1",
                  ready_timeout: float = 120.0) -> subprocess.Popen:
    """Start ``bentoml serve`` and wait until ``/readyz`` answers 200 (model loaded).

    Args:
        env: the child's environment (see :func:`serve_environment`).
        port: TCP port.
        log_path: file that receives the server's output.
        host: interface.
        ready_timeout: seconds to wait for readiness.

    Returns:
        The server process; its worker ids are recorded on it as ``workers`` for :func:`stop_service`.

    Raises:
        RuntimeError: the server exited or was not ready in time (the message ends with its log).
    """
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(serve_command_line(host, port), cwd=PROJECT_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            exited = proc.poll() is not None
            problem = f"exited with {proc.returncode}" if exited else f"not ready in {ready_timeout:.0f} s"
            stop_service(proc)
            raise RuntimeError(f"bentoml serve {problem}:\n{Path(log_path).read_text(errors='replace')[-4000:]}")
        if service_ready(f"http://{host}:{port}"):
            break
        time.sleep(0.5)
    proc.workers = _children(proc.pid)  # type: ignore[attr-defined]
    return proc


def service_ready(url: str) -> bool:
    """Whether the service at ``url`` answers ``/readyz`` with 200 (model loaded)."""
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_service(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a server started by :func:`start_service`: SIGTERM, then SIGKILL to it and its workers."""
    workers = list(getattr(proc, "workers", [])) or _children(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in workers:
        try:  # only if the id still names a BentoML worker (ids are reused)
            if b"_bentoml_impl" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
