"""The HTTP service: request logic and OOD rule without a server, then a real ``bentoml serve``.

The integration tests start one real server (module-scoped) on 127.0.0.1 with the tiny
trained model and an API key, and talk to it over HTTP.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from btc import serving_logic as logic
from btc.cli_serve import serve_environment, service_ready, start_service, stop_service
from btc.data.stats import image_statistics
from btc.labels import CLASSES
from btc.ood import OodRule, colour_saturation, ood_reasons, statistics_reasons
from btc.predict import Predictor
from btc.predlog import PredictionLog
from btc.serving_guard import RequestGuard, _FormScan

API_KEY = "test-key-123"
MAX_UPLOAD = 200_000
MAX_PIXELS = 1_000_000
MAX_IMAGES = 4


# --- images ------------------------------------------------------------------------------------

def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def colour_photo(seed: int = 0, size: int = 160) -> np.ndarray:
    """A frame-filling colourful picture: smooth colour gradients plus coloured blocks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 1 - x * y], axis=-1) * 200 + 30
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 40, 2)
        rgb[y0:y0 + 40, x0:x0 + 40] = rng.uniform(0, 255, 3)
    return rgb.clip(0, 255).astype(np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width`` x ``height`` but holds almost no pixel data: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def mri_paths(synth_root) -> list[Path]:
    return sorted((synth_root / "Testing").glob("*/*.jpg"))


@pytest.fixture(scope="module")
def mri_path(mri_paths) -> Path:
    """A synthetic slice whose statistics pass the OOD rule (a few synthetic ones have grey borders)."""
    for path in mri_paths:
        upload = logic.read_upload(path, max_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
        if not statistics_reasons(upload.stats, upload.saturation):
            return path
    pytest.fail("no synthetic slice passes the OOD statistics")


# --- OOD rule ----------------------------------------------------------------------------------

def test_ood_statistics_accept_mri_and_reject_photos_and_blanks(mri_paths):
    def reasons(data: bytes) -> list[str]:
        upload = logic.decode_upload(data, "x", max_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
        return statistics_reasons(upload.stats, upload.saturation)

    flagged = [p for p in mri_paths if reasons(p.read_bytes())]
    assert len(flagged) <= 0.1 * len(mri_paths), f"{len(flagged)} of {len(mri_paths)} synthetic slices flagged"
    assert any("colour image" in r for r in reasons(encode(colour_photo(), "JPEG")))
    grey_photo = np.asarray(Image.fromarray(colour_photo()).convert("L"))
    assert any("no dark background" in r for r in reasons(encode(grey_photo)))
    for value in (0, 128, 255):
        assert any("almost uniform" in r for r in reasons(encode(np.full((96, 96), value, np.uint8))))


def test_ood_confidence_part_and_thresholds():
    stats = image_statistics(np.pad(np.full((60, 60), 120, np.uint8) + np.arange(60, dtype=np.uint8), 20))
    assert statistics_reasons(stats, 0.0) == []
    assert ood_reasons(stats, 0.0, confidence=0.9) == []
    low = ood_reasons(stats, 0.0, confidence=0.3)
    assert len(low) == 1 and "low model confidence (0.30 < 0.50)" in low[0]
    assert ood_reasons(stats, 0.0, confidence=0.3, rule=OodRule(min_confidence=0.2)) == []
    assert any("colour" in r for r in ood_reasons(stats, 0.2, confidence=0.9))


def test_colour_saturation_is_zero_for_grey_files_and_high_for_colour():
    grey = np.repeat(np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)[..., None], 3, axis=2)
    assert colour_saturation(encode(grey[..., 0]), "L") == 0.0
    assert colour_saturation(encode(grey), "RGB") < 0.02  # grey content stored as RGB
    assert colour_saturation(encode(colour_photo()), "RGB") > 0.15
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def dicom(pixels: np.ndarray) -> bytes:  # the same picture as a colour DICOM (a secondary capture, say)
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
        ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    assert colour_saturation(dicom(colour_photo()), "RGB") > 0.15
    assert colour_saturation(dicom(grey), "RGB") < 0.02
    # a stack is judged by its middle frame, the one the model classifies
    colour, gray = Image.fromarray(colour_photo()), Image.fromarray(grey)
    for order, expect_colour in (([colour, gray, gray], False), ([gray, colour, gray], True)):
        buffer = io.BytesIO()
        order[0].save(buffer, format="TIFF", save_all=True, append_images=order[1:])
        assert (colour_saturation(buffer.getvalue(), "RGB") > 0.15) is expect_colour


def test_header_values_carry_any_model_version():
    """A version named after a run folder in another script must not fail /explain's response."""
    from btc.serving_logic import header_values

    values = header_values({"X-Model-Version": "实验1", "X-Model-Name": "btc-classifier", "X-Warning": "two\nlines"})
    assert values == {"X-Model-Version": "%E5%AE%9E%E9%AA%8C1", "X-Model-Name": "btc-classifier",
                      "X-Warning": "two lines"}
    assert all(v.encode("latin-1") for v in values.values())


# --- request logic -----------------------------------------------------------------------------

@pytest.mark.parametrize("data, status, message", [
    (b"", 400, "empty file (0 bytes)"),
    (b"this is not an image at all" * 10, 400, "not an image"),
    (None, 400, "truncated"),  # a JPEG cut in half, filled in below
    (b"x" * (MAX_UPLOAD + 1), 413, f"{MAX_UPLOAD + 1} bytes, over the limit of {MAX_UPLOAD} bytes"),
    (png_header_only(2000, 2000), 400, f"2000x2000 = 4000000 pixels, over the limit of {MAX_PIXELS}"),
])
def test_read_upload_refuses_bad_files_with_the_reason(tmp_path, mri_path, data, status, message):
    if data is None:
        whole = mri_path.read_bytes()
        data = whole[: len(whole) // 2]
    path = tmp_path / "tmpabcdefghscan.jpg"  # BentoML's temporary name: tmp + 8 characters + the client's name
    path.write_bytes(data)
    with pytest.raises(logic.UploadError) as caught:
        logic.read_upload(path, max_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
    assert caught.value.status == status
    assert message in str(caught.value) and str(caught.value).startswith("scan.jpg: ")


def test_answer_and_log_record_from_a_real_model(trained_run, mri_path, tmp_path):
    predictor = Predictor.load(trained_run.model_path)
    upload = logic.read_upload(mri_path, max_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, keep_bytes=True)
    outputs = logic.model_outputs(predictor, logic.model_inputs([upload, upload], predictor.image_size))
    assert [o["batch_size"] for o in outputs] == [2, 2]
    # The service's path (decode, resize, batch) gives what `btc predict` gives for the same file.
    expected = predictor.predict_proba([mri_path.read_bytes()])[0]
    np.testing.assert_allclose(outputs[0]["probabilities"], expected, atol=1e-5)

    card = logic.model_card(predictor, OodRule())
    answer = logic.prediction(upload, outputs[0], classes=card["classes"], model_name=card["model_name"],
                              model_version=card["model_version"], rule=OodRule(min_confidence=0.0), elapsed_ms=12.5)
    assert answer["predicted"] == CLASSES[int(np.argmax(expected))]
    assert answer["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert answer["ood"] is False and answer["warning"] is None and answer["time_ms"] == 12.5
    assert answer["model_version"] == trained_run.model_path.parent.name
    unsure = logic.prediction(upload, outputs[0], classes=card["classes"], model_name="m", model_version="1",
                              rule=OodRule(min_confidence=1.0), elapsed_ms=1)
    assert unsure["ood"] is True and "Do not rely on the predicted class" in unsure["warning"]

    log = PredictionLog(tmp_path / "log.sqlite")
    log.append([logic.log_record(upload, answer, outputs[0])])
    row = log.read().iloc[0]
    assert row["predicted"] == answer["predicted"] and row["model_version"] == answer["model_version"]
    assert len(row["embedding"]) == len(outputs[0]["embedding"]) > 0
    assert row["black_border_share"] == pytest.approx(upload.stats["black_border_share"])
    with sqlite3.connect(log.path) as con:  # kept because this upload was read with keep_bytes=True
        assert con.execute("SELECT image FROM predictions").fetchone()[0] == mri_path.read_bytes()
    assert card["intended_use"] == "decision support for trained clinicians, not a diagnosis"
    assert card["input"]["size"] == [predictor.image_size] * 2


def test_settings_come_from_the_config_file_and_env(tmp_path):
    config = tmp_path / "serving.yaml"
    config.write_text("serving:\n  max_upload_bytes: 5000\n  ood_min_confidence: 0.7\n")
    settings = logic.settings_from_env({"BTC_CONFIG": str(config), "BTC_LOG_IMAGES": "1"})
    assert settings.max_upload_bytes == 5000 and settings.rule.min_confidence == 0.7 and settings.log_images
    assert logic.settings_from_env({}).log_images is False


def multipart_body(*parts: tuple[str, bytes], boundary: str = "xyz") -> bytes:
    """A multipart/form-data body from ``(Content-Disposition parameters, content)`` pairs, written by hand
    so that a test controls every header byte."""
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + content
                    + b"\r\n" for disposition, content in parts)
    return body + f"--{boundary}--\r\n".encode()


def scan_of(body: bytes, chunk: int = 7, one_file: str | None = None) -> _FormScan:
    scan = _FormScan("image", limit=1_000_000, boundary=b"xyz", one_file=one_file)
    for start in range(0, len(body), chunk):  # headers split over many chunks
        scan.feed(body[start:start + chunk])
    return scan


def test_form_scan_sees_part_names_split_across_chunks():
    scan = scan_of(multipart_body(('name="file"; filename="a.jpg"', b"\xff" * 10)))
    status, message = scan.refusal()
    assert status == 400 and "unexpected form field(s) 'file'" in message and "field 'image'" in message


def test_form_scan_reads_only_real_part_headers(mri_path):
    # A header-like line inside the file is file content; name= and filename= count in any order.
    jpeg = mri_path.read_bytes() + b'\r\nContent-Disposition: form-data; name="other"\r\n\r\n'
    for disposition in ('name="image"; filename="a.jpg"', 'filename="a.jpg"; name="image"'):
        scan = scan_of(multipart_body((disposition, jpeg)))
        assert scan.parts == [("image", True)] and scan.refusal() is None, disposition
    text = scan_of(multipart_body(('name="image"', b"http://127.0.0.1/x.jpg")))
    assert "must be a file upload" in text.refusal()[1]
    nameless = scan_of(multipart_body(('filename="a.jpg"', jpeg)))
    assert "has no field name" in nameless.refusal()[1]
    status, message = scan_of(b"not multipart at all").refusal()
    assert status == 400 and "not valid multipart/form-data" in message


def test_form_scan_measures_a_file_name_as_the_temporary_file_will_carry_it():
    """Starlette decodes a name that is not UTF-8 as Latin-1 (each byte then two in UTF-8) and BentoML
    keeps a backslash in its POSIX basename: both made names the guard let through, then a 500."""
    latin1 = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="' + b"\xe9" * 150 + b'.jpg"'
              b"\r\n\r\nJPEG\r\n--xyz--\r\n")
    status, message = scan_of(latin1).refusal()
    assert status == 400 and "is 304 bytes long; at most 200 bytes are accepted" in message
    backslash = multipart_body((f'name="image"; filename="{"a" * 250}\\\\x.jpg"', b"JPEG"))
    status, message = scan_of(backslash).refusal()
    assert status == 400 and "is 256 bytes long" in message
    assert scan_of(multipart_body(('name="image"; filename="C:\\\\scans\\\\slice.jpg"', b"JPEG"))).refusal() is None
    assert scan_of(multipart_body(('name="image"; filename="dir/' + "a" * 196 + '.jpg"', b"JPEG"))).refusal() is None


@pytest.mark.parametrize("configured, sent", [("s3cret\n", "s3cret"), (" s3cret ", "s3cret"),
                                              ("clé-µ", "clé-µ".encode().decode("latin-1"))])
def test_api_key_read_from_a_file_or_outside_ascii_can_be_sent(configured, sent):
    """A key mounted from a file ends in a newline; a non-ASCII key travels as its UTF-8 bytes."""
    import asyncio

    from starlette.responses import PlainTextResponse

    guarded = RequestGuard(PlainTextResponse("ok"), upload_fields={}, max_body_bytes={}, api_key=configured)

    async def get(headers):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://t") as client:
            return (await client.get("/metadata", headers=headers)).status_code

    raw = sent.encode("latin-1")  # the bytes a client puts on the wire
    assert asyncio.run(get([(b"X-API-Key", raw)])) == 200
    assert asyncio.run(get([(b"Authorization", b"Bearer " + raw)])) == 200
    assert asyncio.run(get([(b"X-API-Key", b"wrong")])) == 401


def test_form_scan_refuses_a_second_file_where_the_endpoint_takes_one():
    two = multipart_body(('name="image"; filename="a.jpg"', b"\xff" * 10), ('name="image"; filename="b.jpg"', b"x"))
    assert scan_of(two).refusal() is None  # several files are fine unless the endpoint takes one
    status, message = scan_of(two, one_file="use /predict_batch").refusal()
    assert status == 400 and message == ("2 files sent in field 'image'; this endpoint takes one file per request; "
                                         "use /predict_batch")


def test_form_scan_refuses_a_body_that_ends_before_its_closing_boundary():
    """python-multipart does not check the end of the form, and Starlette drops an unclosed last part."""
    whole = multipart_body(('name="image"; filename="a.jpg"', b"\xff" * 10), ('name="image"; filename="b.jpg"', b"x"))
    for body in (whole[:-len(b"--xyz--\r\n")], whole[:-20], whole[:60], whole[:-3]):
        scan = scan_of(body)
        assert scan.refusal() is None  # the body could still go on
        scan.finish()
        status, message = scan.refusal()
        assert status == 400 and "(it ends before the closing boundary '--xyz--': a part is cut off" in message
    for body in (whole, whole + b"epilogue", b""):  # closed (an epilogue is allowed), or empty: left to diagnosis
        scan = scan_of(body)
        scan.finish()
        assert scan.refusal() is None


def test_the_media_type_is_lowercased_and_the_boundary_kept():
    from btc.serving_guard import _with_lowercase_media_type

    scope = {"type": "http", "headers": [(b"content-type", b"Multipart/Form-Data; boundary=AbC"), (b"x-y", b"Z")]}
    assert _with_lowercase_media_type(scope)["headers"] == [(b"content-type", b"multipart/form-data; boundary=AbC"),
                                                            (b"x-y", b"Z")]
    assert scope["headers"][0][1] == b"Multipart/Form-Data; boundary=AbC"  # the client's scope is not changed
    lower = {"type": "http", "headers": [(b"content-type", b"multipart/form-data; boundary=AbC")]}
    assert _with_lowercase_media_type(lower) is lower


def test_serve_environment_passes_model_key_and_workers(tmp_path):
    env = serve_environment("models:/btc-classifier@champion", workers=3, api_key_env="MY_KEY", config=None,
                            base={"MY_KEY": "s3cret", "BTC_API_KEY": "old"})
    assert env["BTC_MODEL_URI"] == "models:/btc-classifier@champion" and env["BTC_API_WORKERS"] == "3"
    assert env["BTC_API_KEY"] == "s3cret"
    env = serve_environment(str(tmp_path / "model.pt"), workers=1, api_key_env="MY_KEY", config=None,
                            base={"BTC_API_KEY": "old"})
    assert "BTC_API_KEY" not in env and env["BTC_MODEL_URI"] == str((tmp_path / "model.pt").resolve())
    assert Path(env["BTC_HOME"]).is_absolute()
    # the server runs from the project root: what is relative to the caller's folder is made absolute
    env = serve_environment("m.pt", workers=1, api_key_env="X", config=None,
                            base={"MLFLOW_TRACKING_URI": "sqlite:///runs/mlflow.db?timeout=5",
                                  "MLFLOW_REGISTRY_URI": "sqlite:////abs/reg.db", "BTC_PREDICTION_LOG": "preds.sqlite"})
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{Path('runs/mlflow.db').resolve()}?timeout=5"
    assert env["MLFLOW_REGISTRY_URI"] == "sqlite:////abs/reg.db"
    assert env["BTC_PREDICTION_LOG"] == str(Path("preds.sqlite").resolve())
    with pytest.raises(ValueError, match="workers=0"):
        serve_environment("m.pt", workers=0, api_key_env="X", config=None)
    for threads in ("auto", "0", "-2", "1.5"):  # the model worker would die on it and be restarted for ever
        with pytest.raises(ValueError, match=f"BTC_TORCH_THREADS='{threads}': expected a whole number of threads"):
            serve_environment("m.pt", workers=1, api_key_env="X", config=None, base={"BTC_TORCH_THREADS": threads})
    assert serve_environment("m.pt", workers=1, api_key_env="X", config=None,
                             base={"BTC_TORCH_THREADS": "2"})["BTC_TORCH_THREADS"] == "2"


def test_serve_environment_checks_the_config_from_the_environment_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("serving.yaml").write_text("serving:\n  max_batch_images: 4\n")
    env = serve_environment("m.pt", workers=1, api_key_env="X", config=None, base={"BTC_CONFIG": "serving.yaml"})
    assert env["BTC_CONFIG"] == str(tmp_path / "serving.yaml")  # the server runs from the project root
    with pytest.raises(ValueError, match="\\$BTC_CONFIG: config file '.*/nope.yaml' does not exist"):
        serve_environment("m.pt", workers=1, api_key_env="X", config=None, base={"BTC_CONFIG": "nope.yaml"})
    Path("bad.yaml").write_text("serving:\n  max_batch_images: 0\n")
    for config, base in ((Path("bad.yaml"), {}), (None, {"BTC_CONFIG": "bad.yaml"})):
        with pytest.raises(ValueError, match="invalid config: serving.max_batch_images"):
            serve_environment("m.pt", workers=1, api_key_env="X", config=config, base=base)


# --- the real service --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_btc_serve(model: str, home: Path, timeout: float = 90) -> tuple[int, str, float]:
    """``btc serve --model MODEL`` as a user runs it; (exit code, stderr, seconds). A server that
    starts anyway is stopped with Ctrl+C (SIGINT to its process group) and the test fails."""
    env = {**os.environ, "BTC_HOME": str(home / "btc_home"), "BENTOML_HOME": str(home / "bentoml"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "BENTOML_DO_NOT_TRACK": "True"}
    started = time.monotonic()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("btc")), "serve", "--model", model,
                             "--port", str(_free_port())], env=env, cwd=home, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"btc serve --model {model} still running after {timeout} s:\n{err[-2000:]}")
    return proc.returncode, err, time.monotonic() - started


@pytest.mark.parametrize("model, message", [
    ("missing.pt", "model 'missing.pt' is neither an existing model.pt nor a models:/ or runs:/ URI"),
    ("fake.pt", "fake.pt' is not a readable btc model file"),
    ("models:/nope@champion", "cannot load model 'models:/nope@champion': Registered Model with name=nope not found"),
])
def test_btc_serve_exits_2_when_the_model_cannot_load(tmp_path, model, message):
    # Without the check BentoML restarts the model worker for ever and `btc serve` never exits.
    (tmp_path / "fake.pt").write_text("a text file, not a model\n")
    if model.startswith("models:/"):  # a real, empty store: the registry has no such model
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_registered_models()
    code, err, seconds = run_btc_serve(model, tmp_path)
    assert code == 2 and message in " ".join(err.split()), err
    assert "Starting production" not in err and seconds < 60


def _processes_with(marker: bytes) -> list[int]:
    """Processes whose environment holds ``marker`` (btc serve, its server and workers in whatever session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_sigterm_to_btc_serve_stops_the_server_too(tmp_path, trained_run):
    """What `docker stop` or systemd does: SIGTERM to btc serve alone. Nothing may keep serving."""
    port = _free_port()
    env = {**os.environ, "BTC_HOME": str(tmp_path / "btc_home"), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "BENTOML_DO_NOT_TRACK": "True",
           "BTC_TORCH_THREADS": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("btc")), "serve", "--model",
                             str(trained_run.model_path), "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = f"BENTOML_HOME={tmp_path / 'bentoml'}".encode()
    try:
        deadline = time.monotonic() + 120
        while not service_ready(f"http://127.0.0.1:{port}"):
            if time.monotonic() > deadline:
                pytest.fail("btc serve did not become ready in 120 s")
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        time.sleep(2)
        assert not _processes_with(marker), "server processes still running after SIGTERM to btc serve"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    finally:  # only this test's processes (they carry its BENTOML_HOME), again until none is left
        for _ in range(20):
            left = _processes_with(marker)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """``bentoml serve`` on the tiny model, with an API key and small limits; yields its URL and home."""
    home = tmp_path_factory.mktemp("serve")
    config = home / "config.yaml"
    config.write_text(f"serving:\n  max_upload_bytes: {MAX_UPLOAD}\n  max_pixels: {MAX_PIXELS}\n"
                      f"  max_batch_images: {MAX_IMAGES}\n")
    env = {**os.environ, "BTC_MODEL_URI": str(trained_run.model_path), "BTC_API_KEY": API_KEY,
           "BTC_CONFIG": str(config), "BTC_HOME": str(home / "btc_home"), "BENTOML_HOME": str(home / "bentoml"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "BTC_TORCH_THREADS": "1",
           "BENTOML_DO_NOT_TRACK": "True"}
    for name in ("BTC_LOG_IMAGES", "BTC_PREDICTION_LOG"):
        env.pop(name, None)
    port = _free_port()
    proc = start_service(env, port=port, log_path=home / "serve.log")
    try:
        yield f"http://127.0.0.1:{port}", home
    finally:
        stop_service(proc)
    assert proc.returncode is not None and not [p for p in proc.workers if Path(f"/proc/{p}").exists()]


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(url: str, route: str, files=None, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(f"{url}{route}", files=files, headers=headers, timeout=60, **kw)


def image_file(path: Path, field: str = "image"):
    return [(field, (path.name, path.read_bytes(), "image/jpeg"))]


@pytest.mark.integration
class TestService:
    def test_health_is_open_and_everything_else_needs_the_key(self, server, mri_path):
        url, _ = server
        assert httpx.get(f"{url}/livez").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
            response = post(url, "/predict", image_file(mri_path), headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]
        assert httpx.get(f"{url}/metadata").status_code == 401
        assert post(url, "/predict", image_file(mri_path), headers={"X-API-Key": API_KEY}).status_code == 200

    def test_predict_answers_like_the_predictor(self, server, mri_path, trained_run):
        url, _ = server
        response = post(url, "/predict", image_file(mri_path))
        assert response.status_code == 200, response.text
        body = response.json()
        expected = Predictor.load(trained_run.model_path).predict_proba([mri_path.read_bytes()])[0]
        assert list(body["probabilities"]) == list(CLASSES)
        np.testing.assert_allclose(list(body["probabilities"].values()), expected, atol=1e-4)
        assert body["predicted"] == CLASSES[int(expected.argmax())]
        assert body["confidence"] == pytest.approx(float(expected.max()), abs=1e-4)
        assert body["model_name"] == "btc-classifier" and body["model_version"] == trained_run.model_path.parent.name
        assert body["time_ms"] > 0 and body["filename"] == mri_path.name
        assert body["ood"] == bool(body["ood_reasons"]) and body["image"]["format"] == "JPEG"

    def test_metadata(self, server):
        url, _ = server
        card = httpx.get(f"{url}/metadata", headers=AUTH).json()
        assert card["classes"] == list(CLASSES) and card["input"]["size"] == [64, 64]
        assert "not a diagnosis" in card["intended_use"] and "standardisation" in card["preprocessing"]
        assert card["ood_rule"]["min_confidence"] == 0.5

    def test_explain_returns_a_png_overlay(self, server, mri_path):
        url, _ = server
        response = post(url, "/explain", image_file(mri_path))
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
        assert response.headers["x-predicted-class"] in CLASSES

    @pytest.mark.parametrize("files, kwargs, status, message", [
        ([("image", ("notes.txt", b"plain text, not pixels" * 20, "text/plain"))], {}, 400, "not an image"),
        ("truncated", {}, 400, "truncated"),
        ([("image", ("empty.jpg", b"", "image/jpeg"))], {}, 400, "empty file (0 bytes)"),
        ([("image", ("big.jpg", b"\xff" * (MAX_UPLOAD + 10), "image/jpeg"))], {}, 413,
         "over the limit of 200000 bytes"),
        ([("image", ("bomb.png", png_header_only(5000, 5000), "image/png"))], {}, 400,
         "25000000 pixels, over the limit"),
        ("wrong field", {}, 400,
         "unexpected form field(s) 'file'; this endpoint takes the image file(s) in field 'image'"),
        ([("image", (None, b"http://127.0.0.1/x.jpg"))], {}, 400, "must be a file upload"),
        ("two files", {}, 400, "2 files sent in field 'image'; this endpoint takes one file per request; "
                               "use /predict_batch (repeated field 'images') for several images"),
        (None, {"content": b"garbage", "headers": {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}}, 400,
         "the body is not valid multipart/form-data"),
        (None, {"content": b"garbage", "headers": {**AUTH, "Content-Type": "multipart/form-data"}}, 400,
         "multipart/form-data without a boundary"),
        ("long name", {}, 400, "is 264 bytes long; at most 200 bytes are accepted: rename the file"),
        (None, {}, 400, "empty request: send multipart/form-data"),
        (None, {"json": {"image": "x"}}, 415, "unsupported content type 'application/json'"),
        (None, {"content": b"", "headers": {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}}, 400,
         "holds no form fields"),
    ])
    def test_bad_input_gets_4xx_with_the_reason(self, server, mri_path, files, kwargs, status, message):
        url, _ = server
        if files == "truncated":
            files = [("image", ("cut.jpg", mri_path.read_bytes()[:300], "image/jpeg"))]
        elif files == "wrong field":
            files = image_file(mri_path, field="file")
        elif files == "two files":
            files = image_file(mri_path) + [("image", ("x.txt", b"second file", "text/plain"))]
        elif files == "long name":  # 130 two-byte letters: BentoML's temporary file could not be named after it
            files = [("image", ("\u00e9" * 130 + ".jpg", mri_path.read_bytes(), "image/jpeg"))]
        log = PredictionLog(server[1] / "btc_home" / "predictions.sqlite")
        before = log.count()
        response = post(url, "/predict", files, **kwargs)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
        assert log.count() == before  # a refused request is not logged

    @pytest.mark.parametrize("route", ["/predict_batch", "/predict", "/explain"])
    @pytest.mark.parametrize("cut", ["no closing boundary", "mid-data", "mid-header"])
    def test_a_form_that_ends_before_its_closing_boundary_is_refused(self, server, mri_paths, route, cut):
        """Starlette answers the parts it finished and drops an unclosed last one: a batch lost its third
        file without a word, and /predict answered pydantic's 'Field required'."""
        url, home = server
        field, count = ("images", 3) if route == "/predict_batch" else ("image", 1)
        parts = [(f'name="{field}"; filename="{name}.jpg"', path.read_bytes())
                 for name, path in zip("abc", mri_paths[:count])]
        body = multipart_body(*parts)[:-len(b"--xyz--\r\n")]  # every part complete, the form never closed
        last = body.rindex(b"--xyz\r\n")  # where the last part begins
        if cut == "mid-data":
            body = body[:len(body) - len(parts[-1][1]) // 2]
        elif cut == "mid-header":
            body = body[:last + len(b"--xyz\r\nContent-Disposition: form-da")]
        log = PredictionLog(home / "btc_home" / "predictions.sqlite")
        before = log.count()
        response = post(url, route, content=body, headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"})
        assert response.status_code == 400, response.text[:500]
        assert response.json()["error"] == (
            "the body is not valid multipart/form-data (it ends before the closing boundary '--xyz--': a part is "
            f"cut off or the form is not closed); send the image file in field '{field}'")
        assert log.count() == before  # nothing was predicted for a request that was refused

    def test_a_mixed_case_media_type_is_read_as_the_form_it_is(self, server, mri_paths):
        """Media types are case-insensitive (RFC 9110), boundaries are not: BentoML read
        'Multipart/Form-Data' as JSON (400 'json_invalid')."""
        url, home = server
        log = PredictionLog(home / "btc_home" / "predictions.sqlite")
        before = log.count()
        for route, field, paths in (("/predict", "image", mri_paths[:1]), ("/predict_batch", "images", mri_paths[:2])):
            body = multipart_body(*[(f'name="{field}"; filename="case{i}.jpg"', p.read_bytes())
                                    for i, p in enumerate(paths)], boundary="Btc-Mixed-Case")
            response = post(url, route, content=body,
                            headers={**AUTH, "Content-Type": "Multipart/Form-Data; boundary=Btc-Mixed-Case"})
            assert response.status_code == 200, response.text[:500]
            answers = response.json()["results"] if route == "/predict_batch" else [response.json()]
            assert [a["filename"] for a in answers] == [f"case{i}.jpg" for i in range(len(paths))]
            assert all(a["predicted"] in CLASSES for a in answers)
        assert log.count() == before + 3

    def test_a_second_file_to_explain_is_refused(self, server, mri_path):
        url, _ = server
        response = post(url, "/explain", image_file(mri_path) + image_file(mri_path))
        assert response.status_code == 400 and "send one request per image" in response.json()["error"]

    def test_only_real_part_headers_count(self, server, mri_path):
        url, _ = server
        # Header-like bytes after the end of a JPEG are file content, not a form field.
        tail = b'\r\nContent-Disposition: form-data; name="other"'
        response = post(url, "/predict", [("image", ("tail.jpg", mri_path.read_bytes() + tail, "image/jpeg"))])
        assert response.status_code == 200 and response.json()["filename"] == "tail.jpg", response.text
        # filename= before name= is still a file upload (Starlette parses it as one).
        body = multipart_body(('filename="good.jpg"; name="image"', mri_path.read_bytes()), boundary="btc-b")
        response = post(url, "/predict", content=body,
                        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=btc-b"})
        assert response.status_code == 200 and response.json()["filename"] == "good.jpg", response.text

    def test_an_upload_without_a_file_name_never_shows_the_temporary_file(self, server, mri_path):
        url, _ = server
        for filename in ("", "scans/"):
            body = multipart_body((f'name="image"; filename="{filename}"', mri_path.read_bytes()), boundary="btc-b")
            response = post(url, "/predict", content=body,
                            headers={**AUTH, "Content-Type": "multipart/form-data; boundary=btc-b"})
            assert response.status_code == 200 and response.json()["filename"] == "(no file name)", response.text

    def test_predict_batch_answers_each_file(self, server, mri_paths):
        url, _ = server
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in mri_paths[:2]]
        files.insert(1, ("images", ("broken.jpg", b"garbage", "image/jpeg")))
        body = post(url, "/predict_batch", files).json()
        assert body["count"] == 3 and body["failed"] == 1
        good, bad, good2 = body["results"]
        assert [r["index"] for r in body["results"]] == [0, 1, 2]
        assert bad["status"] == 400 and "broken.jpg" in bad["error"] and "not an image" in bad["error"]
        assert good["filename"] == mri_paths[0].name and good2["filename"] == mri_paths[1].name
        assert good["predicted"] in CLASSES and good2["batch_size"] >= 2  # the two good files ran together
        too_many = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in mri_paths[:MAX_IMAGES + 1]]
        response = post(url, "/predict_batch", too_many)
        assert response.status_code == 413 and f"at most {MAX_IMAGES}" in response.json()["error"]

    def test_non_mri_is_flagged_ood(self, server):
        url, _ = server
        not_mri = (("photo.jpg", encode(colour_photo(), "JPEG")), ("blank.png", encode(np.zeros((96, 96), np.uint8))))
        for name, data in not_mri:
            body = post(url, "/predict", [("image", (name, data, "image/jpeg"))]).json()
            assert body["ood"] is True and body["warning"].startswith("This image does not look like"), body
        photo = post(url, "/predict", [("image", ("p.jpg", encode(colour_photo(), "JPEG"), "image/jpeg"))]).json()
        assert any("colour image" in r for r in photo["ood_reasons"])
        # the heatmap of a photo carries the same caution
        explained = post(url, "/explain", [("image", ("p.jpg", encode(colour_photo(), "JPEG"), "image/jpeg"))])
        assert explained.status_code == 200 and explained.headers["X-OOD"] == "true"
        assert explained.headers["X-Warning"] == photo["warning"]

    def test_concurrent_requests_are_batched(self, server, mri_paths):
        url, _ = server
        files = [image_file(p) for p in mri_paths[:8]]
        sizes: list[int] = []
        with ThreadPoolExecutor(8) as pool:
            for _ in range(6):  # BentoML's dispatcher runs its first calls one by one while it learns timings
                answers = list(pool.map(lambda f: post(url, "/predict", f), files))
                assert all(a.status_code == 200 for a in answers)
                sizes += [a.json()["batch_size"] for a in answers]
                if max(sizes) > 1:
                    break
        assert max(sizes) > 1, f"no batching seen in {sizes}"
        # BentoML's own histogram of requests per model call agrees: some calls served several requests.
        counts = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                  for line in httpx.get(f"{url}/metrics").text.splitlines()
                  if line.startswith("bentoml_service_adaptive_batch_size_bucket") and 'method_name="infer"' in line}
        assert counts["+Inf"] > counts["1.0"], counts

    def test_sustained_concurrent_load_answers_every_request(self, server, mri_paths):
        # BentoML renews its client pool to the model service every 100 requests and drops the
        # requests in flight on the old one; the service must retry them, not answer 500.
        url, _ = server
        files = [image_file(p) for p in mri_paths[:16]]
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda i: post(url, "/predict", files[i % 16]).status_code, range(128)))
        assert statuses == [200] * 128, sorted(set(statuses))

    def test_explain_logs_its_prediction(self, server, mri_path, trained_run):
        url, home = server
        log = PredictionLog(home / "btc_home" / "predictions.sqlite")
        before = log.count()
        response = post(url, "/explain", image_file(mri_path))
        assert response.status_code == 200, response.text
        assert log.count() == before + 1
        row = log.read().iloc[-1]
        assert row["predicted"] == response.headers["x-predicted-class"]
        assert row["confidence"] == pytest.approx(float(response.headers["x-confidence"]), abs=1e-6)
        assert row["model_version"] == trained_run.model_path.parent.name and len(row["embedding"]) > 0

    def test_every_prediction_is_logged_without_the_image(self, server, mri_paths, trained_run):
        url, home = server
        log = PredictionLog(home / "btc_home" / "predictions.sqlite")
        before = log.count()
        for path in mri_paths[:2]:
            assert post(url, "/predict", image_file(path)).status_code == 200
        assert post(url, "/predict", [("image", ("x.jpg", b"nope", "image/jpeg"))]).status_code == 400
        assert log.count() == before + 2  # the refused upload is not logged
        rows = log.read().tail(2)
        assert set(rows["model_version"]) == {trained_run.model_path.parent.name}
        assert all(len(e) > 0 for e in rows["embedding"])
        assert rows["mean"].notna().all() and rows["ts"].notna().all()
        with sqlite3.connect(log.path) as con:
            assert con.execute("SELECT COUNT(*) FROM predictions WHERE image IS NOT NULL").fetchone()[0] == 0


@pytest.mark.slow  # ~40 s on two busy cores, most of it torch.export in log_training_run: run with -m slow
@pytest.mark.integration
def test_service_loads_the_registry_champion(trained_run, synth_split, tiny_config, monkeypatch):
    """The model service's start-up with ``BTC_MODEL_URI=models:/btc-classifier@champion`` on a real MLflow store."""
    from btc.config import load_config
    from btc.tracking.registry import promote, register
    from btc.tracking.run_logging import log_training_run

    run_id = log_training_run(tiny_config, trained_run, synth_split, report=None)
    version = register(run_id, "btc-classifier")
    lenient = load_config(None, ["registry.gates.min_macro_f1=0", "registry.gates.max_ece=1",
                                 "registry.gates.max_flip_change=1", "registry.gates.max_intensity_change=1",
                                 "registry.gates.min_tumour_recall={glioma: 0, meningioma: 0, pituitary: 0}"])
    assert promote("btc-classifier", lenient).promoted

    monkeypatch.setenv("BTC_MODEL_URI", "models:/btc-classifier@champion")
    from serving.service import ModelRunner

    runner = ModelRunner.inner()  # the service class itself, run in this process without a server
    card = runner.card()
    assert card["model_name"] == "btc-classifier" and card["model_version"] == version
    images = np.stack([np.asarray(Image.open(p).convert("L").resize((64, 64))) for p in
                       synth_split.loc[synth_split["split"] == "test", "path"][:3]])
    from_registry = runner.infer(images)
    from_checkpoint = logic.model_outputs(Predictor.load(trained_run.model_path), images)
    np.testing.assert_allclose([o["probabilities"] for o in from_registry],
                               [o["probabilities"] for o in from_checkpoint], atol=1e-5)


@pytest.mark.slow  # logs a model (torch.export) and starts the service
@pytest.mark.integration
def test_the_serving_records_command_serves_its_version_from_anywhere(trained_run, synth_split, tiny_config, tmp_path):
    """`serving.json`'s command, run in a fresh shell elsewhere, serves the version it records, also after
    the alias moved on (a later promotion or a rollback)."""
    from btc.config import load_config
    from btc.tracking.registry import promote, register
    from btc.tracking.run_logging import log_training_run
    from flows.service import deploy_champion

    lenient = load_config(None, ["registry.gates.min_macro_f1=0", "registry.gates.max_ece=1",
                                 "registry.gates.max_flip_change=1", "registry.gates.max_intensity_change=1",
                                 "registry.gates.min_tumour_recall={}"])
    run_id = log_training_run(tiny_config, trained_run, synth_split, report=None)
    first = register(run_id, "btc-classifier")
    assert promote("btc-classifier", lenient).promoted
    record = deploy_champion("btc-classifier", first, run_id)
    second = register(run_id, "btc-classifier")  # promoted after the record was written: the alias moves on
    assert promote("btc-classifier", lenient).promoted and second != first
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = _free_port()
    fresh_shell = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.Popen(["bash", "-c", f"{record['serve']} --port {port}"], cwd=elsewhere, env=fresh_shell,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        metadata = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=10)
        assert metadata.status_code == 200, metadata.text
        assert metadata.json()["model_version"] == first == record["model_version"]
        assert not (elsewhere / ".btc").exists()  # the stores it used are the pipeline's, spelled out
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited by itself
            os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
