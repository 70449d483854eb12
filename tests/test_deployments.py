"""Deployments on a real Prefect server: what docs/orchestration.md tells a person to run.

``prefect server start`` as a subprocess on 127.0.0.1 (its home under tmp), then

* ``prefect work-pool create`` + ``prefect deploy --all`` from ``prefect.yaml``;
* ``python -m flows.serve`` + ``prefect deployment run 'training-pipeline/training-pipeline'``
  on tiny data, checked in MLflow.

The MLflow store, ``$BTC_HOME`` and BentoML home are the test's (``isolated_stores``),
passed to every subprocess. Each process runs in its own process group and is stopped by
its PID. Slow (1.5 minutes on an idle 2-core machine, 3-3.5 while another training runs:
a server start, a served flow run in a fresh interpreter, a tiny training), so marked
``slow`` as well as ``integration``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from btc.data.synth import generate_synthetic_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_for(check, what: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what}: the process exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        if check():
            return
        time.sleep(2)
    pytest.fail(f"{what} within {timeout}s:\n{log.read_text()[-3000:]}")


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=3)
    except httpx.HTTPError:
        return None


def answers(url: str) -> bool:
    response = get(url)
    return response is not None and response.status_code == 200


@pytest.fixture
def prefect_api(tmp_path_factory):
    """``prefect server start`` on a free port; yields the base environment for Prefect subprocesses.

    One server per test: with one server for both, a run of the served deployment once crashed
    loading its code from a deployment record with no path ("No such file or directory:
    '<repo>/None'"), as only the first test's ``prefect.yaml`` deployments of the same names
    have; it passed on a re-run. Separate servers keep the tests from seeing each other's records.
    """
    home = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {"PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    log = home / "server.log"
    server = start([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], {**os.environ, **env}, log)
    try:
        wait_for(lambda: answers(f"{api}/health"), "prefect server did not answer /api/health", server, log)
        yield env
    finally:
        stop(server)


def prefect(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_prefect_yaml_deploys_to_a_process_pool(prefect_api):
    env = {**os.environ, **prefect_api}
    api = prefect_api["PREFECT_API_URL"]
    prefect_yaml = (REPO / "prefect.yaml").read_text()

    created = prefect(["work-pool", "create", "btc-pool", "--type", "process"], env)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect(["--no-prompt", "deploy", "--all"], env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    found = {}  # the server is this test's own (see prefect_api): nothing to clean up on it
    for name in ("training-pipeline/training-pipeline", "training-pipeline/retrain", "monitoring/hourly"):
        response = get(f"{api}/deployments/name/{name}")
        assert response is not None and response.status_code == 200, f"{name} was not deployed:\n{deployed.stdout}"
        found[name] = response.json()
    assert all(d["work_pool_name"] == "btc-pool" for d in found.values())
    assert found["training-pipeline/retrain"]["parameters"]["data_dir"] == "data"
    assert found["training-pipeline/retrain"]["global_concurrency_limit"]["limit"] == 1
    assert found["training-pipeline/retrain"]["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert [s["schedule"]["interval"] for s in found["monitoring/hourly"]["schedules"]] == [3600.0]
    pull = found["training-pipeline/training-pipeline"]["pull_steps"]
    assert pull[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    assert (REPO / "prefect.yaml").read_text() == prefect_yaml, "prefect deploy rewrote prefect.yaml"


def test_served_deployment_trains_and_registers(prefect_api, tmp_path):
    data = generate_synthetic_dataset(tmp_path / "data", per_class=16, seed=5, size=64)
    env = {**os.environ, **prefect_api}  # MLFLOW_*, BTC_HOME, BENTOML_HOME: from isolated_stores
    api = prefect_api["PREFECT_API_URL"]
    serve_log = tmp_path / "serve.log"
    serve = start([sys.executable, "-m", "flows.serve", "--data-dir", str(data), "--no-schedule"], env, serve_log)
    try:
        wait_for(lambda: answers(f"{api}/deployments/name/training-pipeline/retrain"),
                 "flows.serve did not register the deployments", serve, serve_log)
        params = {"data_dir": str(data), "overrides": [
            f"output_dir={tmp_path / 'runs'}", "data.image_size=64", "model.width=8", "train.epochs=1",
            "train.batch_size=16", "eval.gradcam_per_class=0", "registry.gates.min_macro_f1=0",
            "registry.gates.min_tumour_recall={glioma: 0, meningioma: 0, pituitary: 0}", "registry.gates.max_ece=1",
            "registry.gates.max_flip_change=1", "registry.gates.max_intensity_change=1"]}
        run = prefect(["deployment", "run", "training-pipeline/training-pipeline", "--params", json.dumps(params),
                       "--watch", "--watch-timeout", "600"], env, timeout=660)
        output = run.stdout + run.stderr
        assert run.returncode == 0 and "Completed" in output, f"{output[-3000:]}\nserve log:\n{serve_log.read_text()[-4000:]}"
    finally:
        stop(serve)

    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name = 'btc-classifier'")] == ["1"]
    assert {a: str(v) for a, v in client.get_registered_model("btc-classifier").aliases.items()} == \
        {"challenger": "1", "champion": "1"}
    assert list((tmp_path / "runs").rglob("model.pt")), "the served run wrote no model under the output_dir parameter"
