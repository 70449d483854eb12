"""The BentoML service: the champion brain-MRI classifier over HTTP for clinicians' tools.

Run with ``btc serve --model models:/btc-classifier@champion`` or
``BTC_MODEL_URI=... bentoml serve serving.service:BrainTumorClassifier``.

Two BentoML services, one process each:

* ``ModelRunner`` (internal) holds the :class:`btc.predict.Predictor`, loaded **once** at
  start-up from ``$BTC_MODEL_URI`` (default ``models:/btc-classifier@champion``; a
  ``model.pt`` path works too). Its ``infer`` endpoint is batchable: BentoML's adaptive
  batching merges the arrays of concurrent requests into one forward pass (up to
  :data:`MAX_BATCH_SIZE` images, waiting at most :data:`MAX_LATENCY_MS`). Every answer
  says how many images shared that forward pass (``batch_size``). A request that finds no
  other request of its worker in flight calls ``infer_now`` instead: BentoML's dispatcher
  keeps waiting, for minutes after a burst, for the batch window it learned under load
  (measured: 207 ms instead of 37 ms per lone request), and a lone request has nothing to
  wait for.
* ``BrainTumorClassifier`` (the entry point, ``$BTC_API_WORKERS`` workers) speaks HTTP:
  decodes uploads with the configured limits, computes image statistics, decides
  out-of-distribution, answers and appends to the prediction log. It holds no model code:
  everything it does is a call into :mod:`btc.serving_logic`.

Model loading: straight from the MLflow registry, not imported into the BentoML model
store. The registry is the one source of truth for which version is champion (its gates
and aliases decide promotion); a second copy in the BentoML store would need its own
promotion step and could drift from it. The version in every answer and log row is the
MLflow version, which monitoring joins on. Promotion or rollback = move the alias and
restart; no rebuild. The cost: the container needs ``MLFLOW_TRACKING_URI`` (or a mounted
``model.pt`` named by ``BTC_MODEL_URI``) at start-up.

Endpoints: ``POST /predict`` (field ``image``), ``POST /predict_batch`` (field ``images``,
repeated; one bad file gets its own error entry, the others are still answered),
``POST /explain`` (LayerCAM overlay PNG), ``GET /metadata``; BentoML's ``/livez``,
``/readyz`` and ``/metrics``. See ``docs/serving.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Annotated

import aiohttp
import anyio.to_thread
import bentoml
import numpy as np
from bentoml.validators import ContentType
from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from btc import serving_logic as logic
from btc.paths import prediction_log_path
from btc.predlog import PredictionLog
from btc.serving_guard import RequestGuard

MAX_BATCH_SIZE = 32
MAX_LATENCY_MS = 10_000
MODEL_CALL_ATTEMPTS = 3
MODEL_CALL_TIMEOUT_S = MAX_LATENCY_MS / 1000 + 20  # a batched call waits at most MAX_LATENCY_MS: longer means it hung
UPLOAD_FIELDS = {"/predict": "image", "/predict_batch": "images", "/explain": "image"}
SETTINGS = logic.settings_from_env()
log = logging.getLogger("btc.serving")


@bentoml.service(name="btc-model", workers=1, traffic={"timeout": 120})
class ModelRunner:
    """Holds the Predictor; answers batches of model-sized uint8 images."""

    def __init__(self) -> None:
        from btc.predict import Predictor

        if threads := os.environ.get("BTC_TORCH_THREADS"):
            import torch

            torch.set_num_threads(int(threads))
        uri = os.environ.get("BTC_MODEL_URI", logic.DEFAULT_MODEL_URI)
        self.predictor = Predictor.load(uri, device=os.environ.get("BTC_DEVICE", "cpu"))
        log.info("loaded model %s version %s from %s", self.predictor.name, self.predictor.version, uri)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, images: np.ndarray) -> list[dict]:
        return logic.model_outputs(self.predictor, images)

    @bentoml.api
    def infer_now(self, images: np.ndarray) -> list[dict]:
        """``infer`` without the batching queue, for a request that arrives while no other is in flight."""
        return logic.model_outputs(self.predictor, images)

    @bentoml.api
    def explain(self, image: np.ndarray) -> dict:
        return logic.explanation(self.predictor, image)

    @bentoml.api
    def card(self) -> dict:
        return logic.model_card(self.predictor, SETTINGS.rule)


web = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # BentoML serves the API docs at /


def _error(err: logic.UploadError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=err.status)


@bentoml.service(name="btc-classifier", workers=int(os.environ.get("BTC_API_WORKERS", "1")), traffic={"timeout": 120})
@bentoml.asgi_app(web, path="/")
class BrainTumorClassifier:
    """The HTTP entry point (see the module docstring)."""

    model = bentoml.depends(ModelRunner)

    def __init__(self) -> None:
        self.log = PredictionLog(prediction_log_path())
        self._card: dict | None = None
        self._in_flight = 0  # requests of this worker waiting for the model

    async def _call_model(self, endpoint: str, *args):
        """Call the model service, retrying a dropped or hung call (every model endpoint is a pure function).

        BentoML 1.4's client to a dependency renews its connection pool every 100 requests and
        closes the old pool with requests still in flight on it; under concurrent load those
        requests fail with ``ServerDisconnectedError`` (see BentoML issue #4971; PR #5698 adds a similar retry),
        and now and then one never answers: each attempt gets :data:`MODEL_CALL_TIMEOUT_S`.
        """
        for attempt in range(1, MODEL_CALL_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(MODEL_CALL_TIMEOUT_S):
                    return await getattr(self.model.to_async, endpoint)(*args)
            except (aiohttp.ClientConnectionError, TimeoutError) as err:
                if attempt == MODEL_CALL_ATTEMPTS:
                    raise
                log.warning("model service call %s failed (%s: %s); retrying", endpoint, type(err).__name__, err)

    async def _model_card(self) -> dict:
        if self._card is None:
            self._card = await self._call_model("card")
        return self._card

    async def _read(self, paths: list[Path]) -> list[logic.Upload]:
        def read(path: Path) -> logic.Upload:
            return logic.read_upload(path, max_bytes=SETTINGS.max_upload_bytes, max_pixels=SETTINGS.max_pixels,
                                     keep_bytes=SETTINGS.log_images)

        return [await anyio.to_thread.run_sync(read, path) for path in paths]

    async def _answer(self, uploads: list[logic.Upload], started: float) -> list[dict]:
        card = await self._model_card()
        images = logic.model_inputs(uploads, card["input"]["size"][0])
        self._in_flight += 1
        try:  # alone: skip the batching queue, whose learned wait outlives a burst of traffic
            outputs = await self._call_model("infer" if self._in_flight > 1 else "infer_now", images)
        finally:
            self._in_flight -= 1
        answers = [logic.prediction(u, out, classes=card["classes"], model_name=card["model_name"],
                                    model_version=card["model_version"], rule=SETTINGS.rule,
                                    elapsed_ms=(time.perf_counter() - started) * 1000)
                   for u, out in zip(uploads, outputs)]
        await self._log_answers(uploads, answers, outputs)
        return answers

    async def _log_answers(self, uploads: list[logic.Upload], answers: list[dict], outputs: list[dict]) -> None:
        records = [logic.log_record(u, a, out) for u, a, out in zip(uploads, answers, outputs)]
        try:
            await anyio.to_thread.run_sync(self.log.append, records)
        except Exception:  # a full disk must not cost the clinician the answer; the log says why
            log.exception("could not append %d records to the prediction log %s", len(records), self.log.path)

    @bentoml.api
    async def predict(self, image: Path) -> dict:
        """Class probabilities for one image (multipart field ``image``: JPEG, PNG or DICOM)."""
        started = time.perf_counter()
        try:
            uploads = await self._read([image])
        except logic.UploadError as err:
            return _error(err)
        return (await self._answer(uploads, started))[0]

    @bentoml.api
    async def predict_batch(self, images: list[Path]) -> dict:
        """Several images at once (repeated field ``images``); a bad file gets its own ``error`` entry."""
        started = time.perf_counter()
        if len(images) > SETTINGS.max_batch_images:
            return JSONResponse({"error": f"{len(images)} images sent; at most {SETTINGS.max_batch_images} "
                                          "per request"}, status_code=413)
        slots: list[dict | logic.Upload] = []
        for index, path in enumerate(images):
            try:
                slots.extend(await self._read([path]))
            except logic.UploadError as err:
                slots.append({"index": index, "filename": logic.upload_name(path), "error": str(err),
                              "status": err.status})
        good = [s for s in slots if isinstance(s, logic.Upload)]
        answers = iter(await self._answer(good, started) if good else [])
        results = [s if isinstance(s, dict) else {"index": i, **next(answers)} for i, s in enumerate(slots)]
        return {"results": results, "count": len(results), "failed": len(results) - len(good),
                "time_ms": round((time.perf_counter() - started) * 1000, 2)}

    @bentoml.api
    async def explain(self, image: Path) -> Annotated[Path, ContentType("image/png")]:
        """LayerCAM overlay (PNG) of the predicted class for one image; the prediction is in the headers.

        The prediction is appended to the prediction log like one of ``/predict``.
        """
        started = time.perf_counter()
        try:
            upload = (await self._read([image]))[0]
        except logic.UploadError as err:
            return _error(err)
        card = await self._model_card()
        result = await self._call_model("explain", logic.model_inputs([upload], card["input"]["size"][0])[0])
        output = result["output"]
        answer = logic.prediction(upload, output, classes=card["classes"], model_name=card["model_name"],
                                  model_version=card["model_version"], rule=SETTINGS.rule,
                                  elapsed_ms=(time.perf_counter() - started) * 1000)
        await self._log_answers([upload], [answer], [output])
        headers = {"X-Predicted-Class": answer["predicted"], "X-Confidence": f"{answer['confidence']:.6f}",
                   "X-Model-Name": card["model_name"], "X-Model-Version": card["model_version"],
                   "X-OOD": str(answer["ood"]).lower()}
        if answer["warning"]:  # the caution /predict gives travels with the heatmap too
            headers["X-Warning"] = answer["warning"]
        return Response(result["png"], media_type="image/png", headers=logic.header_values(headers))

    @web.get("/metadata")
    async def metadata(self) -> dict:
        """Model name and version, classes, input size, preprocessing and intended use."""
        return await self._model_card()


BrainTumorClassifier.add_asgi_middleware(
    RequestGuard,
    upload_fields=UPLOAD_FIELDS,
    one_file={"/predict": "use /predict_batch (repeated field 'images') for several images",
              "/explain": "send one request per image"},
    max_body_bytes={"/predict": SETTINGS.max_upload_bytes + 65536, "/explain": SETTINGS.max_upload_bytes + 65536,
                    "/predict_batch": SETTINGS.max_batch_images * (SETTINGS.max_upload_bytes + 4096) + 65536},
)
