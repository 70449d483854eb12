"""The benchmark's baseline: the same Predictor and request logic behind plain FastAPI + uvicorn.

``POST /predict`` (multipart field ``image``) does what the BentoML service's does, with the
same :mod:`btc.serving_logic` calls (decode with limits, statistics, OOD rule,
probabilities and embedding, prediction log), but in one process, with no model service
and no adaptive batching: each request runs its own forward pass in FastAPI's thread pool.
So ``benchmarks/serving.py`` compares the serving machinery, not different work.

Run: ``BTC_MODEL_URI=runs/x/model.pt uvicorn benchmarks.fastapi_baseline:app --port 8001``.
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse

from btc import serving_logic as logic
from btc.paths import prediction_log_path
from btc.predict import Predictor
from btc.predlog import PredictionLog

if threads := os.environ.get("BTC_TORCH_THREADS"):
    import torch

    torch.set_num_threads(int(threads))

settings = logic.settings_from_env()
predictor = Predictor.load(os.environ.get("BTC_MODEL_URI", logic.DEFAULT_MODEL_URI))
card = logic.model_card(predictor, settings.rule)
log = PredictionLog(prediction_log_path())
app = FastAPI(title="btc baseline")


@app.get("/readyz")
def readyz() -> dict:
    return {"ready": True}


@app.post("/predict")
def predict(image: UploadFile = File(...)) -> dict:
    started = time.perf_counter()
    try:
        upload = logic.decode_upload(image.file.read(), image.filename or "upload",
                                     max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    except logic.UploadError as err:
        return JSONResponse({"error": str(err)}, status_code=err.status)
    output = logic.model_outputs(predictor, logic.model_inputs([upload], predictor.image_size))[0]
    answer = logic.prediction(upload, output, classes=card["classes"], model_name=card["model_name"],
                              model_version=card["model_version"], rule=settings.rule,
                              elapsed_ms=(time.perf_counter() - started) * 1000)
    log.append([logic.log_record(upload, answer, output)])
    return answer
