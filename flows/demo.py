"""The README's main job: ``python -m flows.demo`` (``make demo``), the whole lifecycle on one machine.

1. generates demo data (synthetic MRI-like slices, 200 per class, 128 px) into ``demo/data``,
   once: a re-run re-uses it;
2. runs the ``training-pipeline`` flow on it with ``flows/demo.yaml`` (small, fast, the real
   promotion gates), on Prefect's ephemeral server, with MLflow's SQLite store, the Prefect
   home and the BentoML home all under ``.btc/``: nothing to start beforehand; then checks
   where the model's heatmaps point (the pointing game on the test tumour images, whose
   lesion boxes the synthetic data knows);
3. starts the BentoML service on the champion (``bentoml serve`` on 127.0.0.1, a free port),
   waits for ``/readyz``, asks it about one test image per class and one file that is not
   an image (answered 400), then sends the other test images as traffic;
4. stops the service by its PID and runs the ``monitoring`` flow once over the predictions
   it just logged;
5. prints where every result is.

Everything is written under the repository: ``demo/`` (data, runs, service log) and ``.btc/``
(MLflow, prediction log, monitoring). ``make clean`` removes both. Re-running is safe: a new
run is registered and must match or beat the champion (``min_margin_over_champion``, 0 by default) to replace it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "demo"
DATA_DIR = DEMO_DIR / "data"
CONFIG = REPO_ROOT / "flows" / "demo.yaml"
PER_CLASS, SIZE, SEED = 200, 128, 0
MODEL_URI = "models:/btc-classifier@champion"
BATCH = 16


def quiet_defaults() -> None:
    """Settings for an unattended run; the caller's environment wins."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a first start can take 20-60 s
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The demo keeps its Prefect database and BentoML store under .btc/, away from the user's own homes.
    os.environ.setdefault("PREFECT_HOME", str(REPO_ROOT / ".btc" / "prefect"))
    os.environ.setdefault("BENTOML_HOME", str(REPO_ROOT / ".btc" / "bentoml"))
    for home in ("PREFECT_HOME", "BENTOML_HOME"):  # Prefect makes its home without parents: on a fresh clone it fails
        Path(os.environ[home]).mkdir(parents=True, exist_ok=True)


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def demo_data() -> Path:
    """The demo dataset, generated on the first run only."""
    from btc.data.synth import generate_synthetic_dataset

    expected = 4 * PER_CLASS
    if (DATA_DIR / "lesions.csv").is_file() and len(list(DATA_DIR.rglob("*.jpg"))) == expected:
        print(f"re-using {expected} demo images in {DATA_DIR}")
        return DATA_DIR
    generate_synthetic_dataset(DATA_DIR, per_class=PER_CLASS, seed=SEED, size=SIZE)
    print(f"generated {expected} demo images ({PER_CLASS} per class, {SIZE} px) in {DATA_DIR}")
    return DATA_DIR


def champion_version() -> str | None:
    from btc.tracking import store

    try:
        return str(store.client().get_model_version_by_alias("btc-classifier", "champion").version)
    except Exception:  # no registered model or no champion alias yet
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(answer: dict) -> str:
    if "error" in answer:
        return f"refused: {answer['error']}"
    text = f"{answer['predicted']} ({answer['confidence']:.2f}) by {answer['model_name']} v{answer['model_version']}"
    return text + ("  [OUT OF DISTRIBUTION: " + "; ".join(answer["ood_reasons"]) + "]" if answer.get("ood") else "")


def ask_service(url: str, data_dir: Path) -> int:
    """One test image per class and a file that is not an image; then the rest as traffic. Returns predictions logged."""
    import httpx

    from btc.labels import CLASSES

    test_images = {c: sorted((data_dir / "Testing" / c).glob("*.jpg")) for c in CLASSES}
    examples = [(f"{c}/{imgs[0].name}", imgs[0].read_bytes(), "image/jpeg") for c, imgs in test_images.items()]
    examples.append(("not-an-image.jpg", b"This is a text file, not an MRI slice.", "image/jpeg"))
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, content, kind in examples:
            response = client.post("/predict", files={"image": (Path(name).name, content, kind)})
            print(f"  POST /predict {name:<28} -> HTTP {response.status_code}: {describe(response.json())}")
        logged = len(examples) - 1
        traffic = [p for imgs in test_images.values() for p in imgs[1:]]
        for start in range(0, len(traffic), BATCH):
            files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in traffic[start:start + BATCH]]
            response = client.post("/predict_batch", files=files)
            response.raise_for_status()
            logged += response.json()["count"] - response.json()["failed"]
    print(f"  POST /predict_batch: {len(traffic)} more test images sent as traffic ({logged} predictions logged in all)")
    return logged


def serve_and_ask(data_dir: Path) -> int:
    """Start the service on the champion, ask it, stop it by its PID."""
    from btc.cli_serve import serve_environment, start_service, stop_service
    from btc.paths import btc_home

    env = serve_environment(MODEL_URI, workers=1, api_key_env="BTC_DEMO_API_KEY", config=None)  # no API key
    env["BTC_HOME"] = str(btc_home())
    port, log_path = free_port(), DEMO_DIR / "service.log"
    started = time.monotonic()
    process = start_service(env, port=port, log_path=log_path, ready_timeout=300)
    print(f"bentoml serve (PID {process.pid}) ready on http://127.0.0.1:{port} after "
          f"{time.monotonic() - started:.0f}s, serving {MODEL_URI}; log {log_path}")
    try:
        return ask_service(f"http://127.0.0.1:{port}", data_dir)
    finally:
        stop_service(process)
        print(f"stopped the service (PID {process.pid})")


def where_things_are(summary: dict, monitored: dict | None) -> None:
    from btc.paths import prediction_log_path
    from btc.tracking.store import tracking_uri, ui_hint
    from monitoring.dashboard import default_workspace

    paths = summary["paths"]
    lines = [
        ("MLflow runs, registry, model cards", ui_hint(tracking_uri()) + "   # then open " + summary["mlflow_run_url"]),
        ("evaluation report and plots", paths["evaluation"]),
        ("Great Expectations Data Docs", paths["data_docs"]),
        ("run folder (model.pt, config, history)", paths["run_dir"]),
        ("service record (champion, serve command)", paths.get("serving_record", "(not promoted this time)")),
        ("monitoring reference", paths.get("monitoring_reference", "(unchanged: not promoted this time)")),
        ("prediction log (SQLite)", str(prediction_log_path())),
        ("drift report", (monitored or {}).get("html") or "(none this time)"),
        ("drift dashboard", f"evidently ui --workspace {default_workspace()}"),
        ("Prefect flow runs and artifacts",
         f"PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start   # then http://127.0.0.1:4200"),
        ("serve the champion yourself", f"btc serve --model {MODEL_URI}"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"  {key:<{width}}  {value}")


def main() -> int:
    quiet_defaults()
    os.chdir(REPO_ROOT)  # .btc/ and demo/ are relative to the repository, wherever this is started from
    started = time.monotonic()
    from flows.monitoring_flow import monitoring
    from flows.training_pipeline import training_pipeline

    say("1/4 demo data")
    data_dir = demo_data()

    say("2/4 training pipeline (Prefect flow: validate -> split -> train -> evaluate -> MLflow -> gates)")
    summary = training_pipeline(str(data_dir.relative_to(REPO_ROOT)), config_path=str(CONFIG.relative_to(REPO_ROOT)))
    m = summary["metrics"]
    print(f"MLflow run {summary['run_id']}, version {summary['version']}: test accuracy {m['accuracy']:.3f}, "
          f"macro-F1 {m['macro_f1']:.3f}, ECE {m['ece']:.3f}\n{summary['decision']}")
    from btc.explain_eval import pointing_game_on_folder

    pg = pointing_game_on_folder(summary["paths"]["model"], data_dir, under="Testing")
    print(f"explanations: the heatmap's peak falls inside the lesion box on {pg['pointing_game']:.0%} of "
          f"{pg['n_images']} test tumour images (a random point: {pg['chance']:.1%}; `btc pointing-game`)")
    champion = champion_version()
    if champion is None:
        print("no model has passed the promotion gates yet, so there is nothing to serve; "
              "see the gate table above (the training summary artifact has it too)")
        return 1

    say(f"3/4 BentoML service on the champion (v{champion})")
    logged = serve_and_ask(data_dir)

    say("4/4 monitoring flow over the logged predictions")
    from btc.config import load_config

    needed = load_config(CONFIG).monitoring.min_predictions
    monitored = None
    if logged < needed:
        print(f"{logged} predictions logged; a drift report needs at least {needed} (monitoring.min_predictions)")
    else:
        monitored = monitoring(window_hours=1, config_path=str(CONFIG.relative_to(REPO_ROOT)))
        print(monitored["summary"])
        if monitored["status"] == "drift":
            print(f"action: {monitored['action']}")

    say(f"done in {time.monotonic() - started:.0f}s; where the results are")
    where_things_are(summary, monitored)
    return 0


if __name__ == "__main__":
    sys.exit(main())
