"""Serving benchmark: raw model time, then the BentoML service against a plain FastAPI baseline.

Measures, in one run on this machine, with real HTTP on 127.0.0.1:

* the raw forward time per image of the Predictor, on a batch of 1 and of 32;
* for the BentoML service (``serving/service.py``) and for the baseline
  (``benchmarks/fastapi_baseline.py``, the same Predictor and request logic in one FastAPI
  process without batching): p50 and p99 latency of single requests sent one at a time, and
  throughput with 1, 8 and 32 concurrent clients (``--requests`` requests per setting, each
  after a short warm-up at that concurrency), then single requests again right after the load.

Prints a Markdown table (and writes JSON with ``--json``). Example, from the project root::

    .venv/bin/python benchmarks/serving.py --model runs/<run>/model.pt \\
        --images ../shared/data/brain-tumor-mri/Training --requests 200

Without ``--images`` it uses 64 generated slices. Both servers write their prediction logs
into a temporary folder, which is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arguments import positive_int  # noqa: E402
from btc.cli_serve import start_service, stop_service  # noqa: E402
from btc.predict import Predictor  # noqa: E402
from btc.tracking.store import tracking_uri  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_images(folder: Path | None, n: int, scratch: Path) -> list[tuple[str, bytes]]:
    """``n`` image files as ``(name, bytes)``: from ``folder`` (spread over its classes) or generated."""
    if folder is None:
        from btc.data.synth import generate_synthetic_dataset

        folder = generate_synthetic_dataset(scratch / "synth", per_class=max(2, n // 4), seed=3, size=128)
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no JPEG or PNG images under {folder}")
    chosen = [paths[i] for i in np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int)]
    return [(p.name, p.read_bytes()) for p in chosen]


def raw_model_times(predictor: Predictor, images: list[tuple[str, bytes]]) -> dict[str, float]:
    """Median milliseconds per image of ``predict_proba`` on ready model-sized arrays, batch 1 and 32."""
    arrays = np.stack([predictor.to_array(data) for _, data in images])
    batch32 = np.resize(arrays, (32, *arrays.shape[1:]))
    predictor.predict_proba(batch32)  # warm-up
    one = [_timed(lambda: predictor.predict_proba(arrays[i % len(arrays)][None])) for i in range(50)]
    many = [_timed(lambda: predictor.predict_proba(batch32)) / 32 for _ in range(10)]
    both = [_timed(lambda: (predictor.predict_proba(arrays[i % len(arrays)][None]),
                            predictor.embed(arrays[i % len(arrays)][None]))) for i in range(30)]
    return {"forward_ms_batch1": float(np.median(one)), "forward_ms_per_image_batch32": float(np.median(many)),
            "proba_and_embedding_ms_batch1": float(np.median(both))}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


async def load_test(url: str, images: list[tuple[str, bytes]], *, requests: int, clients: int,
                    headers: dict[str, str]) -> dict:
    """Send ``requests`` POST /predict with ``clients`` in flight; latencies, throughput, batch sizes."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    failures: list[str] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        async def worker() -> None:
            for i in counter:
                name, data = images[i % len(images)]
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", files={"image": (name, data, "image/jpeg")})
                except httpx.HTTPError as err:
                    failures.append(type(err).__name__)
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                if response.status_code != 200:
                    failures.append(str(response.status_code))
                else:
                    batch_sizes.append(response.json().get("batch_size", 1))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {"clients": clients, "requests": requests, "failures": len(failures),
            "failure_kinds": dict(Counter(failures)), "seconds": seconds,
            "throughput_rps": requests / seconds,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies else float("nan"),  # every request failed
            "p99_ms": float(np.percentile(latencies, 99)) if latencies else float("nan"),
            "mean_batch": float(np.mean(batch_sizes or [0]))}


def measure(url: str, images, *, requests: int, concurrency: list[int], headers: dict[str, str]) -> list[dict]:
    """One load test per concurrency, each after a short warm-up at that concurrency; then 1 client again.

    The last entry (``"after_load": True``) repeats the single-client test right after the
    heaviest load: BentoML's dispatcher keeps waiting for the batch window it learned under
    load for a while, so single requests are slower just after a burst.
    """
    results = []
    for clients in concurrency:
        asyncio.run(load_test(url, images, requests=max(30, 4 * clients), clients=clients, headers=headers))
        results.append(asyncio.run(load_test(url, images, requests=requests, clients=clients, headers=headers)))
    after = asyncio.run(load_test(url, images, requests=max(20, requests // 4), clients=1, headers=headers))
    return results + [{**after, "after_load": True}]


def start_baseline(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.fastapi_baseline:app", "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"baseline did not start:\n{log_path.read_text()[-3000:]}")


def table(raw: dict, results: dict[str, list[dict]], model: str, n_images: int) -> str:
    names = list(results)
    lines = [f"Model: `{model}`; {n_images} distinct images; cores: {os.cpu_count()}", "",
             "| raw model (Predictor.predict_proba, ready arrays) | ms per image |", "| --- | ---: |",
             f"| batch of 1 | {raw['forward_ms_batch1']:.2f} |",
             f"| batch of 32 | {raw['forward_ms_per_image_batch32']:.2f} |",
             f"| batch of 1, probabilities + embedding (the service's model work) | "
             f"{raw['proba_and_embedding_ms_batch1']:.2f} |", "",
             "| POST /predict over HTTP | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    after = {n: next(r for r in rs if r.get("after_load")) for n, rs in results.items()}
    results = {n: [r for r in rs if not r.get("after_load")] for n, rs in results.items()}
    by_clients = {n: {r["clients"]: r for r in rs} for n, rs in results.items()}

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(n) for n in names) + " |"

    first = results[names[0]][0]["clients"]
    lines.append(row(f"p50 latency, {first} client (ms)", lambda n: f"{by_clients[n][first]['p50_ms']:.1f}"))
    lines.append(row(f"p99 latency, {first} client (ms)", lambda n: f"{by_clients[n][first]['p99_ms']:.1f}"))
    for c in (r["clients"] for r in results[names[0]]):
        lines.append(row(f"throughput, {c} clients (req/s)", lambda n: f"{by_clients[n][c]['throughput_rps']:.1f}"))
    for c in (r["clients"] for r in results[names[0]][1:]):
        lines.append(row(f"p50 / p99 latency, {c} clients (ms)",
                         lambda n: f"{by_clients[n][c]['p50_ms']:.0f} / {by_clients[n][c]['p99_ms']:.0f}"))
        lines.append(row(f"mean images per forward pass, {c} clients", lambda n: f"{by_clients[n][c]['mean_batch']:.1f}"))
    lines.append(row("p50 / p99 latency, 1 client, right after the heaviest load (ms)",
                     lambda n: f"{after[n]['p50_ms']:.0f} / {after[n]['p99_ms']:.0f}"))
    failures = {n: sum((Counter(r["failure_kinds"]) for r in rs + [after[n]]), Counter()) for n, rs in results.items()}
    lines += ["", "Failed requests: " + "; ".join(f"{n} {sum(f.values())} {dict(f) or ''}" for n, f in failures.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model.pt path or MLflow URI")
    parser.add_argument("--images", type=Path, help="folder of JPEG/PNG slices (default: generated)")
    parser.add_argument("--distinct", type=positive_int, default=64, help="distinct images cycled through")
    parser.add_argument("--requests", type=positive_int, default=200, help="requests per setting")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--torch-threads", type=positive_int, help="torch CPU threads in both servers (default torch's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="btc-bench-") as tmp:
        tmp = Path(tmp)
        images = load_images(args.images, args.distinct, tmp)
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        raw = raw_model_times(Predictor.load(args.model), images)
        print(f"raw model: {raw}", flush=True)
        # The servers run from the project root with their own BTC_HOME: an absolute model path, and the
        # caller's MLflow store for a models:/ URI (as `btc serve` does).
        model = str(Path(args.model).absolute()) if Path(args.model).is_file() else args.model
        env = {**os.environ, "BTC_MODEL_URI": model, "BTC_HOME": str(tmp / "home"),
               "BTC_PREDICTION_LOG": str(tmp / "bentoml.sqlite"),  # never the caller's log: monitoring reads it
               "MLFLOW_TRACKING_URI": tracking_uri(),
               "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
        env.pop("BTC_API_KEY", None)
        if args.torch_threads:
            env["BTC_TORCH_THREADS"] = str(args.torch_threads)
        results: dict[str, list[dict]] = {}

        port = free_port()
        proc = start_service(env, port=port, log_path=tmp / "bentoml.log")
        try:
            results["BentoML service"] = measure(f"http://127.0.0.1:{port}", images, requests=args.requests,
                                                 concurrency=args.concurrency, headers={})
        finally:
            stop_service(proc)
        print(f"BentoML: {results['BentoML service']}", flush=True)

        port = free_port()
        env["BTC_PREDICTION_LOG"] = str(tmp / "baseline.sqlite")
        proc = start_baseline(env, port, tmp / "baseline.log")
        try:
            results["FastAPI baseline"] = measure(f"http://127.0.0.1:{port}", images, requests=args.requests,
                                                  concurrency=args.concurrency, headers={})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            print(f"baseline server log (tail):\n{(tmp / 'baseline.log').read_text()[-1500:]}", flush=True)
        print(f"baseline: {results['FastAPI baseline']}", flush=True)

    print()
    print(table(raw, results, args.model, len(images)))
    if args.json:
        args.json.write_text(json.dumps({"raw": raw, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
