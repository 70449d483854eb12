"""Discovery, decoding and the manifest: layouts, labels, and every kind of bad file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from btc.data.discover import DatasetLayoutError, find_images
from btc.data.images import ImageDecodeError, decode_gray, gray_of
from btc.data.manifest import build_manifest, load_manifest, manifest_digest, save_manifest, unreadable
from btc.labels import CLASSES, canonical_label


def _write(path, size=(40, 30), mode="L", fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    arr = rng.integers(0, 255, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path, fmt)
    return path


@pytest.mark.parametrize("names", [
    ("glioma", "meningioma", "notumor", "pituitary"),
    ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"),
])
def test_kaggle_layouts_normalise_labels(tmp_path, names):
    for split in ("Training", "Testing"):
        for name in names:
            _write(tmp_path / split / name / "a.jpg")
    found = find_images(tmp_path)
    assert sorted({f.label for f in found}) == list(CLASSES)
    assert {f.source_split for f in found} == {"train", "test"}
    assert len(found) == 8


def test_flat_layout_png_rgb_any_size(tmp_path):
    _write(tmp_path / "glioma" / "a.png", size=(300, 200), mode="RGB", fmt="PNG")
    _write(tmp_path / "notumor" / "b.jpg", size=(50, 70))
    m = build_manifest(tmp_path, progress=False)
    assert list(m["source_split"]) == ["", ""]
    assert set(m["mode"]) == {"RGB", "L"}
    assert m.loc[m["label"] == "glioma", ["width", "height"]].values.tolist() == [[300, 200]]
    assert m["readable"].all()


def test_unknown_class_folder_names_it(tmp_path):
    _write(tmp_path / "tumour_x" / "a.jpg")
    with pytest.raises(ValueError, match="unknown class folder 'tumour_x'; expected one of glioma, meningioma"):
        find_images(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    _write(tmp_path / "glioma" / "a.jpg")
    (tmp_path / "pituitary").mkdir()
    with pytest.raises(DatasetLayoutError, match="pituitary.*is empty"):
        find_images(tmp_path)


def test_missing_folder_and_no_classes(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        find_images(tmp_path / "nope")
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        find_images(tmp_path)


def test_bad_files_are_listed_with_reasons_and_counted(tmp_path):
    good = _write(tmp_path / "glioma" / "good.jpg", size=(64, 64))
    trunc = tmp_path / "glioma" / "truncated.jpg"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "glioma" / "empty.jpg").write_bytes(b"")
    (tmp_path / "glioma" / "text.jpg").write_text("this is not an image")
    m = build_manifest(tmp_path, progress=False)
    assert len(m) == 4  # nothing silently vanishes
    bad = unreadable(m).set_index(m.loc[~m["readable"], "path"].map(lambda p: p.rsplit("/", 1)[1]).values)
    assert "truncated" in bad.loc["truncated.jpg", "error"]
    assert "empty file" in bad.loc["empty.jpg", "error"]
    assert "not an image" in bad.loc["text.jpg", "error"]
    assert m.loc[m["readable"], "phash"].str.len().eq(64).all()


def test_decode_refuses_decompression_bomb_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (5000, 5000)).save(path)
    with pytest.raises(ImageDecodeError, match="25000000 pixels, over the limit of 1000000"):
        decode_gray(path, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="over the limit of 10 bytes"):
        decode_gray(path, max_bytes=10)



def test_an_image_over_pillows_own_limit_gets_the_same_message(tmp_path, monkeypatch):
    """Above Pillow's limit (about 179 Mpx; lowered here to keep the file small) Pillow refuses it as it opens."""
    path = tmp_path / "big.png"
    Image.new("L", (5000, 5000)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # bombs are what exceeds twice this
    with pytest.raises(ImageDecodeError, match="image is 25000000 pixels, over the limit of 1000000 "
                                               "\\(refused from its header as a decompression bomb\\)"):
        decode_gray(path, max_pixels=1_000_000)


def _write_dicom(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    pixels = (np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 3)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 48, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    return tmp_path / "x.dcm"


def test_dicom_is_decoded(tmp_path):
    gray, info = decode_gray(_write_dicom(tmp_path))
    assert gray.shape == (32, 48) and gray.dtype == np.uint8 and info.format == "DICOM"
    assert gray[0, 0] < gray[-1, -1]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each invalid value it meets
def test_corrupt_dicom_is_an_image_error_never_a_crash(tmp_path):
    """Cut and byte-flipped copies of a DICOM file: each decodes or gives ImageDecodeError (pydicom raises
    TypeError, NotImplementedError and more on its own)."""
    good = _write_dicom(tmp_path).read_bytes()
    rng = np.random.default_rng(0)
    errors = 0
    for k in range(600):
        data = bytearray(good)
        if k % 2 == 0:
            data = data[:int(rng.integers(133, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(132, len(data)))] = int(rng.integers(0, 256))
        try:
            gray, _ = decode_gray(bytes(data))
            assert gray.dtype == np.uint8 and gray.ndim == 2
        except ImageDecodeError as err:
            errors += 1
            assert "DICOM" in str(err)
    assert errors > 100  # the corruptions do break most files


def test_manifest_roundtrip_and_digest(tmp_path, synth_root):
    m = build_manifest(synth_root, progress=False)
    path = save_manifest(m, tmp_path / "m.parquet")
    again = load_manifest(path)
    assert again.equals(m)
    assert manifest_digest(again) == manifest_digest(m)
    copy = tmp_path / "copy"
    shutil.copytree(synth_root, copy)
    (next((copy / "Training" / "glioma").iterdir())).unlink()
    assert manifest_digest(build_manifest(copy, progress=False)) != manifest_digest(m)


def test_canonical_label_spellings():
    assert canonical_label("No_Tumor") == "notumor"
    assert canonical_label("pituitary-tumor") == "pituitary"


def test_jpeg_cut_inside_its_header_is_unreadable_not_a_crash(tmp_path):
    _write(tmp_path / "glioma" / "good.jpg")
    (tmp_path / "glioma" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0junk")
    m = build_manifest(tmp_path, progress=False)
    bad = m.loc[~m["readable"]]
    assert len(bad) == 1 and bad["path"].iloc[0].endswith("cut.jpg")
    assert bad["error"].iloc[0]


def test_entries_outside_the_layout_are_named_and_not_read(tmp_path, caplog):
    for split in ("Training", "Testing"):
        _write(tmp_path / split / "glioma" / "a.jpg")
    _write(tmp_path / "Validation" / "glioma" / "v.jpg")
    _write(tmp_path / "Training" / "loose.jpg")
    (tmp_path / "lesions.csv").write_text("path\n")  # a sidecar: not worth a warning
    with caplog.at_level("WARNING", logger="btc.data.discover"):
        found = find_images(tmp_path)
    assert sorted(f.path.name for f in found) == ["a.jpg", "a.jpg"]
    assert f"ignored {tmp_path / 'Validation'}: not a Training or Testing folder" in caplog.messages
    assert f"ignored {tmp_path / 'Training' / 'loose.jpg'}: a file in Training/, not inside a class folder" \
        in caplog.messages
    assert len(caplog.messages) == 2


def test_links_and_hidden_folders_inside_a_class(tmp_path):
    good = _write(tmp_path / "outside" / "x.jpg")
    _write(tmp_path / "data" / "glioma" / "a.jpg")
    _write(tmp_path / "data" / "glioma" / ".thumbs" / "t.jpg")
    (tmp_path / "data" / "glioma" / "linked").symlink_to(good.parent, target_is_directory=True)
    (tmp_path / "data" / "glioma" / "loop").symlink_to(tmp_path / "data" / "glioma", target_is_directory=True)
    (tmp_path / "data" / "glioma" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    m = build_manifest(tmp_path / "data", progress=False).set_index("path")
    root = tmp_path / "data" / "glioma"
    assert sorted(m.index) == [str(root / "a.jpg"), str(root / "broken.jpg"), str(root / "linked" / "x.jpg")]
    assert m.loc[str(root / "broken.jpg"), "error"] == "cannot read file: No such file or directory"
    assert m.loc[str(root / "linked" / "x.jpg"), "readable"]


def test_a_macos_archive_folder_is_ignored_in_the_flat_layout_too(tmp_path, caplog):
    _write(tmp_path / "glioma" / "a.jpg")
    _write(tmp_path / "__MACOSX" / "glioma" / "._a.jpg")
    with caplog.at_level("WARNING", logger="btc.data.discover"):
        found = find_images(tmp_path)
    assert [f.path.name for f in found] == ["a.jpg"]
    assert caplog.messages == [f"ignored {tmp_path / '__MACOSX'}: macOS archive metadata, not a class folder"]


def test_a_file_name_that_is_not_utf8_is_named_before_anything_is_decoded(tmp_path):
    _write(tmp_path / "glioma" / "a.jpg")
    bad = os.fsencode(tmp_path / "glioma") + b"/scan\xff.jpg"
    Image.new("L", (40, 30)).save(os.fsdecode(bad), "JPEG")
    with pytest.raises(DatasetLayoutError, match=r"1 file name\(s\) are not valid UTF-8 and cannot be recorded in "
                                                 r"the manifest: '.*/glioma/scan\\xff.jpg'; rename them"):
        build_manifest(tmp_path, progress=False)


# Permissions bind everyone but root: as root, the check runs in a child process as the user nobody.
UNPRIVILEGED = [] if os.geteuid() != 0 else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.skipif(bool(UNPRIVILEGED) and shutil.which("setpriv") is None, reason="root without setpriv")
@pytest.mark.parametrize("locked", ["Training/glioma/sub", "Training/glioma", "Testing"])
def test_a_folder_that_cannot_be_read_is_named_not_dropped(locked):
    with tempfile.TemporaryDirectory() as tmp:  # not under pytest's tmp_path: that is private to its owner
        root = Path(tmp)
        for rel in ("Training/glioma/a.jpg", "Training/glioma/sub/b.jpg", "Testing/glioma/c.jpg"):
            _write(root / rel)
        for folder in [root, *root.rglob("*")]:
            folder.chmod(0o755)
        (root / locked).chmod(0)
        script = f"from btc.data.discover import find_images; find_images({tmp!r})"
        res = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=Path(__file__).parents[1])
        (root / locked).chmod(0o755)
    assert res.returncode == 1 and f"DatasetLayoutError: cannot read folder {str(root / locked)!r}: Permission " \
        "denied; its files would be missing from the dataset" in res.stderr, res.stderr


def test_testing_folder_without_training_is_refused(tmp_path):
    _write(tmp_path / "Testing" / "glioma" / "a.jpg")
    with pytest.raises(DatasetLayoutError, match="has Testing/ but no Training/ folder"):
        find_images(tmp_path)


def test_unknown_class_folder_says_where_it_is(tmp_path):
    _write(tmp_path / "Training" / "Tumour" / "a.jpg")
    with pytest.raises(DatasetLayoutError, match=f"unknown class folder 'Tumour'.*{tmp_path / 'Training' / 'Tumour'}"):
        find_images(tmp_path)


def test_manifest_paths_are_absolute(tmp_path, monkeypatch):
    _write(tmp_path / "data" / "glioma" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    assert build_manifest("data", progress=False)["path"].tolist() == [str(tmp_path / "data" / "glioma" / "a.jpg")]


@pytest.mark.parametrize("mode, arr", [
    ("1", np.eye(16, dtype=bool)),
    ("I;16B", (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)),
])
def test_bilevel_and_16_bit_big_endian_images_decode(tmp_path, mode, arr):
    path = tmp_path / "x.tiff"
    im = Image.fromarray(arr) if mode == "1" else Image.frombytes("I;16B", (16, 16), arr.astype(">u2").tobytes())
    im.save(path)
    gray, info = decode_gray(path)
    assert info.mode == mode and gray.shape == (16, 16) and gray.dtype == np.uint8
    assert gray.min() == 0 and gray.max() == 255  # the full range, not a flat image
    if mode == "I;16B":
        assert (np.diff(gray.astype(int).ravel()) >= 0).all()  # the ramp survives in order


def _write_dicom_frames(path, pixels, photometric, samples=1, syntax="1.2.840.10008.1.2.1"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax  # default Explicit VR Little Endian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    frames = pixels.shape[0] if pixels.ndim == 4 or (samples == 1 and pixels.ndim == 3) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if samples > 1 else pixels.shape[-2:]
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_multi_frame_colour_and_monochrome1_dicom(tmp_path):
    ramp = np.tile(np.arange(48, dtype=np.uint8) * 5, (32, 1))
    frames = np.stack([np.zeros_like(ramp), ramp, np.zeros_like(ramp), np.zeros_like(ramp)])  # the middle is frame 2
    rgb = np.repeat(frames[..., None], 3, axis=-1)
    gray, info = decode_gray(_write_dicom_frames(tmp_path / "rgb.dcm", rgb, "RGB", samples=3))
    assert gray.shape == (32, 48) and info.mode == "RGB"
    assert gray.max() == 0  # frames // 2 = 2: the all-black frame, not the mean over frames
    gray, _ = decode_gray(_write_dicom_frames(tmp_path / "mf.dcm", frames[[1, 1, 0]], "MONOCHROME2"))
    assert gray.shape == (32, 48) and gray[0, 0] < gray[0, -1]  # three frames of 48 columns: not taken for colour
    gray, info = decode_gray(_write_dicom_frames(tmp_path / "m1.dcm", ramp, "MONOCHROME1"))
    assert info.mode == "L" and gray[0, 0] > gray[0, -1]  # MONOCHROME1: low values display bright


def test_a_few_hot_pixels_do_not_darken_a_16_bit_slice_as_in_dicom(tmp_path):
    """16-bit and float images use the same percentile window as DICOM: one saturated pixel costs nothing."""
    ramp = np.tile(np.linspace(0, 4000, 64), (64, 1)).astype(np.uint16)
    ramp[0, 0] = 65535  # a hot pixel
    Image.fromarray(ramp).save(tmp_path / "hot.png")
    gray = decode_gray(tmp_path / "hot.png")[0]
    assert len(np.unique(gray)) == 64 and np.sort(gray.ravel())[-65] > 200  # the ramp's 64 levels, spread out
    as_dicom = decode_gray(_write_dicom_frames(tmp_path / "hot.dcm", ramp, "MONOCHROME2"))[0]
    assert np.abs(gray.astype(int) - as_dicom.astype(int)).max() <= 1  # one rule, whatever the container


def test_see_through_pixels_are_the_black_background_whatever_lies_under_them(synth_root, tmp_path):
    slice_ = np.asarray(Image.open(sorted((synth_root / "Testing" / "glioma").iterdir())[0]).convert("L"))
    alpha = np.where(slice_ > 20, 255, 0).astype(np.uint8)  # the background made fully transparent
    decoded = []
    for under in (0, 255):
        hidden = np.where(alpha == 0, under, slice_).astype(np.uint8)
        Image.fromarray(np.dstack([hidden] * 3 + [alpha]), "RGBA").save(tmp_path / f"rgba_{under}.png")
        Image.fromarray(np.dstack([hidden, alpha]), "LA").save(tmp_path / f"la_{under}.png")
        decoded += [decode_gray(tmp_path / f"rgba_{under}.png")[0], decode_gray(tmp_path / f"la_{under}.png")[0]]
    assert all(np.array_equal(decoded[0], d) for d in decoded[1:])
    assert decoded[0][alpha == 0].max() == 0


def test_every_supported_mode_decodes():
    from btc.data.images import SUPPORTED_MODES, gray_of_pil

    for mode in SUPPORTED_MODES:
        gray = gray_of_pil(Image.new(mode, (8, 6)))
        assert gray.shape == (6, 8) and gray.dtype == np.uint8, mode


def test_a_deflated_dicom_is_bounded_before_it_is_inflated(tmp_path):
    """Deflated DICOM is inflated whole on opening: 20 frames of zeros deflate ~1000:1 and must be refused first."""
    frames = np.zeros((20, 300, 300), np.uint8)
    frames[10, 100:200, 100:200] = 200  # the middle frame holds the only bright square
    path = _write_dicom_frames(tmp_path / "deflated.dcm", frames, "MONOCHROME2", syntax="1.2.840.10008.1.2.1.99")
    assert path.stat().st_size < 10_000  # 1.8 MB of pixels
    gray, info = decode_gray(path)
    assert (info.width, info.height) == (300, 300) and gray[150, 150] == 255 and gray[50, 50] == 0
    with pytest.raises(ImageDecodeError, match=r"deflated DICOM inflates to more than 1448576 bytes"):
        decode_gray(path, max_pixels=100_000)  # one frame (90,000 pixels) is within it, the file is not


def test_an_unexpected_decoder_failure_is_an_unreadable_row(tmp_path, monkeypatch):
    import btc.data.manifest as manifest_module

    _write(tmp_path / "glioma" / "a.jpg")
    _write(tmp_path / "glioma" / "b.jpg")

    b_sum = int(decode_gray(tmp_path / "glioma" / "b.jpg")[0].sum())
    real_phash = manifest_module.phash_hex

    def phash_that_breaks_on_b(gray):
        if gray.sum() == b_sum:
            raise TypeError("Cannot handle this data type")
        return real_phash(gray)

    monkeypatch.setattr(manifest_module, "phash_hex", phash_that_breaks_on_b)
    m = build_manifest(tmp_path, progress=False)
    assert m["readable"].tolist() == [True, False]
    assert m["error"].iloc[1] == "cannot be decoded (TypeError: Cannot handle this data type)"


def test_a_file_changed_since_the_manifest_is_named_when_decoded(tmp_path):
    from btc.data.cache import cached_images

    _write(tmp_path / "glioma" / "a.jpg")
    gone = _write(tmp_path / "glioma" / "b.jpg")
    m = build_manifest(tmp_path, progress=False)
    gone.write_text("replaced by text")
    with pytest.raises(ImageDecodeError, match=f"^{gone}: changed since the manifest was built"):
        cached_images(m, 32, tmp_path / "cache", progress=False)
    gone.unlink()
    with pytest.raises(ImageDecodeError, match=f"^{gone}: cannot read file: No such file"):
        cached_images(m, 32, tmp_path / "cache", progress=False)


def test_a_warm_cache_names_a_file_changed_since_the_manifest_as_a_cold_one_does(tmp_path):
    from btc.data.cache import cached_images

    _write(tmp_path / "glioma" / "a.jpg")
    changed = _write(tmp_path / "glioma" / "b.jpg")
    m = build_manifest(tmp_path, progress=False)
    cached_images(m, 32, tmp_path / "cache", progress=False)  # warm
    Image.new("L", (40, 30), 255).save(changed)
    with pytest.raises(ImageDecodeError, match=f"^{changed}: changed since the manifest was built"):
        cached_images(m, 32, tmp_path / "cache", progress=False)
    changed.unlink()
    with pytest.raises(ImageDecodeError, match=f"^{changed}: cannot read file: No such file"):
        cached_images(m, 32, tmp_path / "cache", progress=False)


def test_an_image_replaced_by_another_since_the_manifest_is_not_cached(tmp_path):
    """The cache is named by the manifest's hashes: other pixels must never be stored under that name."""
    from btc.data.cache import cached_images

    _write(tmp_path / "glioma" / "a.jpg")
    changed = _write(tmp_path / "glioma" / "b.jpg")
    m = build_manifest(tmp_path, progress=False)
    Image.new("L", (40, 30), 255).save(changed)  # still a readable image, other pixels
    with pytest.raises(ImageDecodeError, match=f"^{changed}: changed since the manifest was built"):
        cached_images(m, 32, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_two_runs_filling_one_cache_at_once_both_succeed(tmp_path, monkeypatch):
    import threading

    from btc.data import cache

    for name in "ab":
        _write(tmp_path / "glioma" / f"{name}.jpg")
    m = build_manifest(tmp_path, progress=False)
    both_written, save = threading.Barrier(2, timeout=20), np.save

    def save_then_wait(path, array):  # both writers finish writing before either renames
        save(path, array)
        both_written.wait()

    monkeypatch.setattr(cache.np, "save", save_then_wait)
    errors, results = [], []

    def fill():
        try:
            results.append(np.asarray(cache.cached_images(m, 32, tmp_path / "cache", progress=False)))
        except Exception as err:  # noqa: BLE001 - the test reports whatever a writer raised
            errors.append(err)

    threads = [threading.Thread(target=fill) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2 and np.array_equal(results[0], results[1])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"images-{cache.cache_key(m, 32)}.npy"]


def test_pipes_devices_and_folders_are_refused_before_reading(tmp_path):
    """A pipe would block for ever and /dev/zero would fill the memory, also through a link."""
    import os

    _write(tmp_path / "glioma" / "a.jpg")
    os.mkfifo(tmp_path / "glioma" / "pipe.png")
    (tmp_path / "glioma" / "zero.png").symlink_to("/dev/zero")
    m = build_manifest(tmp_path, progress=False).set_index("path")
    for name in ("pipe.png", "zero.png"):
        assert m.loc[str(tmp_path / "glioma" / name), "error"].startswith("not a regular file (a device, pipe or socket)")
    assert m["readable"].sum() == 1
    for path, reason in ((tmp_path / "glioma" / "pipe.png", "not a regular file"), ("/dev/zero", "not a regular file"),
                         (tmp_path, "is a folder")):
        with pytest.raises(ImageDecodeError, match=reason):
            decode_gray(path)


def test_a_format_plugins_own_error_is_an_image_error():
    """Pillow's DDS plugin raises NotImplementedError for an unknown pixel format."""
    import struct

    dds = (b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + b"\0" * 44 + struct.pack("<8I", 32, *[0] * 7)
           + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + b"\0" * 64)
    with pytest.raises(ImageDecodeError, match="NotImplementedError"):
        decode_gray(dds)


def test_float_images_with_nan_or_the_whole_float_range(tmp_path):
    arr = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    arr[5, 5] = np.nan
    Image.fromarray(arr, "F").save(tmp_path / "nan.tiff")
    with pytest.raises(ImageDecodeError, match="1 of 256 pixel values are NaN or infinite"):
        decode_gray(tmp_path / "nan.tiff")
    wide = np.zeros((16, 16), np.float32)
    wide[:8], wide[8:] = -3e38, 3e38  # hi - lo overflows float32
    Image.fromarray(wide, "F").save(tmp_path / "wide.tiff")
    gray = decode_gray(tmp_path / "wide.tiff")[0]
    assert gray[:8].max() == 0 and gray[8:].min() == 255


def test_dicom_rescale_slope_is_applied(tmp_path):
    import pydicom

    plain = _write_dicom(tmp_path)
    ds = pydicom.dcmread(plain)
    ds.RescaleSlope, ds.RescaleIntercept = -1, 5000  # stored 0 means 5000: brightness order reversed
    ds.save_as(tmp_path / "slope.dcm")
    turned, straight = decode_gray(tmp_path / "slope.dcm")[0].astype(int), decode_gray(plain)[0].astype(int)
    assert turned[0, 0] > turned[-1, -1] and np.abs(turned - (255 - straight)).max() <= 1  # to rounding


def test_a_pil_image_decodes_as_its_file_does(tmp_path):

    ramp16 = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 40)
    Image.fromarray(ramp16).save(tmp_path / "i16.png")
    floats = np.linspace(0, 1, 32 * 40, dtype=np.float32).reshape(32, 40)
    Image.fromarray(floats, "F").save(tmp_path / "f.tiff")
    for name in ("i16.png", "f.tiff"):
        from_file = decode_gray(tmp_path / name)[0]
        assert from_file.max() == 255  # stretched, not clipped to black or white
        assert np.array_equal(gray_of(Image.open(tmp_path / name)), from_file)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((30, 40), np.uint8)
    arr[:, :5] = 255  # a bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # stored as seen rotated: a viewer turns it 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    gray, info = decode_gray(tmp_path / "turned.jpg")
    assert (info.width, info.height) == (40, 30) and gray.shape == (40, 30)
    assert gray[:5].mean() > 200 and gray[-5:].mean() < 50  # the left edge is now on top


def test_a_pil_image_a_caller_holds_is_read_as_its_file_is(tmp_path):
    """Predictor.predict_proba takes PIL images: same orientation and frame as btc predict on the file."""
    arr = np.zeros((30, 40), np.uint8)
    arr[:, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    assert np.array_equal(gray_of(Image.open(tmp_path / "turned.jpg")), decode_gray(tmp_path / "turned.jpg")[0])
    frames = [Image.new("L", (40, 30), value) for value in (0, 0, 255, 0, 0)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    stack = Image.open(tmp_path / "stack.tif")
    assert np.array_equal(gray_of(stack), decode_gray(tmp_path / "stack.tif")[0]) and stack.tell() == 0


@pytest.mark.parametrize("fmt", ["TIFF", "GIF"])
def test_a_stack_of_frames_is_read_at_its_middle_frame_as_dicom_is(tmp_path, fmt):
    frames = [Image.new("L", (40, 30), value) for value in (0, 0, 255, 0, 0)]  # the middle is frame 2
    path = tmp_path / f"stack.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    gray, info = decode_gray(path)
    assert gray.shape == (30, 40) and gray.min() == 255 and (info.width, info.height) == (40, 30)


def test_each_page_of_a_tiff_is_held_to_the_pixel_limit(tmp_path):
    path = tmp_path / "pages.tif"
    small, big = Image.new("L", (10, 10)), Image.new("L", (2000, 1000))
    small.save(path, save_all=True, append_images=[big, small])  # the header's first page is small
    with pytest.raises(ImageDecodeError, match=r"frame 1 of 3 is 2000x1000 = 2000000 pixels, over the limit of 1000000"):
        decode_gray(path, max_pixels=1_000_000)
