"""Deploying the champion to the BentoML service, and running that service as a local process.

How a promotion reaches the service. ``serving/service.py`` loads ``$BTC_MODEL_URI``
(default ``models:/btc-classifier@champion``) once, at start-up, straight from the MLflow
registry. So promotion has already done the real work by moving the ``champion`` alias;
"deploying" is:

1. :func:`deploy_champion` (the pipeline's ``deploy-service`` step) optionally builds the
   Bento (``bentoml build`` of ``serving/bentofile.yaml``: the service code and its Python
   environment, labelled with the champion version, ready for ``bentoml containerize``) and
   writes ``$BTC_HOME/serving.json``: which version is champion, its pinned URI, the Bento tag
   and the command that serves exactly that version (not whatever the alias points at later);
2. (re)loading = (re)starting ``bentoml serve``: a running service keeps the model it loaded
   until it restarts. The pipeline does not restart processes it did not start; the demo
   (:mod:`flows.demo`) starts the service after the pipeline (``btc.cli_serve.start_service``)
   and stops it by its PID. A long-running service is restarted by whoever runs it
   (``btc serve`` under systemd, a Kubernetes rollout, a BentoCloud deployment) after the
   promotion, or after a rollback, which also only moves the alias.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from btc.cli_serve import store_locations
from btc.paths import btc_home

REPO_ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = REPO_ROOT / "serving" / "bentofile.yaml"
BENTOML = [sys.executable, "-m", "bentoml"]


def serving_record_path() -> Path:
    return btc_home() / "serving.json"


def build_bento(version: str, bentofile: Path = BENTOFILE, timeout: float = 600) -> str:
    """``bentoml build`` the service, labelled with the champion version; returns the Bento tag.

    Raises:
        FileNotFoundError: ``bentofile`` does not exist.
        RuntimeError: the build failed (the message ends with BentoML's output).
    """
    if not bentofile.is_file():
        raise FileNotFoundError(f"no Bento build file at {str(bentofile)!r}; expected serving/bentofile.yaml")
    cmd = [*BENTOML, "build", "-f", str(bentofile), "--label", f"model_version={version}", "--output", "tag",
           str(REPO_ROOT)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"bentoml build failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return tag


def serve_command(model_uri: str, bento_tag: str | None) -> str:
    """A shell command that serves exactly ``model_uri`` from any folder, in a fresh shell: the stores'
    locations are spelled out (a Bento serves from its own folder, where a relative ``.btc`` is not)."""
    env = store_locations(dict(os.environ))
    if bento_tag is None:
        command = f"{Path(sys.executable).with_name('btc')} serve --model {shlex.quote(model_uri)}"
    else:
        env["BTC_MODEL_URI"] = model_uri
        command = f"{Path(sys.executable).with_name('bentoml')} serve {shlex.quote(bento_tag)}"
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + command


def deploy_champion(name: str, version: str, run_id: str, *, bento: bool = False) -> dict:
    """Record the new champion for the service (and build its Bento when asked).

    Returns:
        The record written to ``$BTC_HOME/serving.json``.
    """
    tag = build_bento(version) if bento else None
    alias_uri, pinned = f"models:/{name}@champion", f"models:/{name}/{version}"
    record = {
        "model_name": name, "model_version": str(version), "run_id": run_id,
        "model_uri": alias_uri, "pinned_model_uri": pinned,
        "deployed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bento": tag,
        "serve": serve_command(pinned, tag),
        "reload": "a running service keeps the model it loaded at start-up: restart it to serve this version",
    }
    path = serving_record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    record["record"] = str(path)
    return record
