"""The README's main job (`make demo` = `python -m flows.demo`) on a fresh copy of the repository.

It runs as a new user would: no MLflow, Prefect, BentoML or btc home set, so everything it
writes lands under the copy (``.btc/``, ``demo/``), never in the user's own stores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOMES = ("BTC_HOME", "BTC_PREDICTION_LOG", "MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACTS_DESTINATION", "PREFECT_HOME",
         "PREFECT_API_URL", "BENTOML_HOME")


def _fresh_copy(dest: Path) -> Path:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow
def test_the_demo_runs_end_to_end_on_a_fresh_copy(tmp_path):
    repo = _fresh_copy(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if k not in HOMES}
    done = subprocess.run([sys.executable, "-m", "flows.demo"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "PROMOTED: champion -> v1" in out
    pointing = re.search(r"peak falls inside the lesion box on (\d+)% of 120 test tumour images \(a random point: ([\d.]+)%", out)
    assert pointing and int(pointing.group(1)) > 10 * float(pointing.group(2)), out[-4000:]
    for label in ("glioma", "meningioma", "notumor", "pituitary"):
        assert re.search(rf"POST /predict {label}/\S+ +-> HTTP 200: \w+ \(", out), label
    assert re.search(r"POST /predict not-an-image\.jpg +-> HTTP 400: refused: not-an-image\.jpg: .*not an image", out)
    report = re.search(r"drift report +(\S+\.html)", out)
    assert report and Path(report.group(1)).is_file() and Path(report.group(1)).is_relative_to(repo / ".btc")
    assert (repo / ".btc" / "mlflow.db").is_file() and (repo / ".btc" / "prefect").is_dir()
    pid = int(re.search(r"bentoml serve \(PID (\d+)\)", out).group(1))
    assert f"stopped the service (PID {pid})" in out
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_make_clean_removes_the_demo_outputs_and_keeps_the_users_runs(tmp_path):
    shutil.copy2(REPO / "Makefile", tmp_path / "Makefile")
    for folder in ("demo/runs/r", ".btc", "runs/mine"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "model.pt").write_bytes(b"weights")
    done = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "demo").exists() and not (tmp_path / ".btc").exists()
    assert (tmp_path / "runs" / "mine" / "model.pt").read_bytes() == b"weights"  # btc train's default output
