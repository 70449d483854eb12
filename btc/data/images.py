"""Decoding one image (JPEG, PNG or DICOM) into a grayscale uint8 array, safely.

A file holding several frames (multi-frame DICOM, multi-page TIFF, animated GIF) is read as
its middle frame: in a stack of slices that is the one most likely to cross the brain.

Every failure raises :class:`ImageDecodeError` with a reason a person can act on; the
size limits are checked from the header, before the pixels are decoded, so a
decompression bomb is refused without being expanded.
"""

from __future__ import annotations

import io
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must be an error, not a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Pillow modes decode_gray turns into grayscale: bilevel, palette, 8-bit grey and colour, 16/32-bit integers, floats.
SUPPORTED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                   "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
DEFAULT_MAX_PIXELS = 40_000_000
# Bumped whenever the same bytes would decode to other pixels; part of the decoded cache's key.
DECODER_VERSION = 4


class ImageDecodeError(ValueError):
    """An image could not be used; the message says why."""


def read_image_file(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of an image file, refusing what is not a regular file before reading it.

    A pipe would block for ever and ``/dev/zero`` would fill the memory, also through a link.

    Raises:
        ImageDecodeError: missing, unreadable, a folder, a device, pipe or socket, or over ``max_bytes``.
    """
    try:
        info = Path(path).stat()
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError("is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError("not a regular file (a device, pipe or socket); cannot read an image from it")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ImageDecodeError(f"file is {info.st_size} bytes, over the limit of {max_bytes} bytes")
        return Path(path).read_bytes()
    except OSError as err:
        raise ImageDecodeError(f"cannot read file: {err.strerror or err}") from None


def _finite(pixels: np.ndarray) -> np.ndarray:
    bad = int(np.size(pixels) - np.isfinite(pixels).sum())
    if bad:
        raise ImageDecodeError(f"{bad} of {pixels.size} pixel values are NaN or infinite")
    return pixels


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image."""

    format: str
    width: int
    height: int
    mode: str


def _is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


def _check_inflated_size(data: bytes, max_bytes: int) -> None:
    """A deflated DICOM is inflated whole as soon as it is opened (header included): bound that first.

    Raises:
        ImageDecodeError: the data inflate to more than ``max_bytes``, or cannot be inflated.
    """
    at = data.find(b"\x02\x00\x10\x00UI", 132, 4096)  # (0002,0010) Transfer Syntax UID, explicit VR
    if at < 0:
        return
    length = int.from_bytes(data[at + 6:at + 8], "little")
    if data[at + 8:at + 8 + length].rstrip(b"\0 ").decode("ascii", "replace") != DEFLATED_DICOM:
        return
    if data[132:138] != b"\x02\x00\x00\x00UL":  # (0002,0000) group length: where the deflated data start
        raise ImageDecodeError("deflated DICOM without a file meta group length; its size cannot be checked")
    start = 144 + int.from_bytes(data[140:144], "little")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(data[start:], max_bytes)
    except zlib.error as err:
        raise ImageDecodeError(f"deflated DICOM data cannot be inflated ({err})") from None
    if inflater.unconsumed_tail:
        raise ImageDecodeError(f"deflated DICOM inflates to more than {max_bytes} bytes, over the limit")


def _dicom_middle_frame(data: bytes, max_pixels: int):
    """``(dataset, rows, cols, frames, samples, pixels)``: the middle frame only, ``[rows, cols(, samples)]``,
    its size checked from the header before any pixel is decoded."""
    import pydicom

    _check_inflated_size(data, 4 * max_pixels + 2**20)  # room for 4 bytes a pixel and the other elements
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as err:  # pydicom raises many types for a broken header (InvalidDicomError, TypeError, ...)
        raise ImageDecodeError(f"not a readable DICOM image ({type(err).__name__}: {err})") from None
    if rows * cols > max_pixels:
        raise ImageDecodeError(f"image is {cols}x{rows} = {rows * cols} pixels, over the limit of {max_pixels}")
    from pydicom.pixels import pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        raw = pixel_array(ds, index=frames // 2) if frames > 1 else ds.pixel_array
    except Exception as err:  # pydicom raises many types for broken pixel data
        raise ImageDecodeError(f"DICOM pixel data cannot be decoded ({err})") from None
    return ds, rows, cols, frames, samples, raw


def dicom_colour_frame(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """The middle frame of a colour DICOM as RGB in [0, 1] (None for a grey one): what the OOD colour test reads."""
    ds, _, _, _, samples, raw = _dicom_middle_frame(data, max_pixels)
    if samples < 3:
        return None
    rgb = np.asarray(raw, dtype=np.float64)[..., :3]
    top = float(2 ** int(getattr(ds, "BitsStored", 8) or 8) - 1)
    return np.clip(rgb / top, 0, 1)


def _decode_dicom(data: bytes, max_pixels: int) -> tuple[np.ndarray, ImageInfo]:
    from pydicom.pixels import apply_modality_lut

    ds, rows, cols, frames, samples, raw = _dicom_middle_frame(data, max_pixels)
    try:
        # the modality LUT (RescaleSlope/Intercept): a negative slope reverses which tissue is bright
        pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    except Exception as err:  # pydicom raises many types for broken pixel data
        raise ImageDecodeError(f"DICOM pixel data cannot be decoded ({err})") from None
    _finite(pixels)
    if samples > 1:  # [rows, cols, samples]: the mean of the colour channels
        pixels = pixels[..., :3].mean(-1)
    if pixels.shape != (rows, cols):
        raise ImageDecodeError(
            f"DICOM pixel data of shape {pixels.shape} does not match its header ({rows} rows, {cols} columns, "
            f"{frames} frames, {samples} samples per pixel)")
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = -pixels  # MONOCHROME1: the lowest value is displayed white
    bits = int(getattr(ds, "BitsAllocated", 16) or 16)
    mode = "RGB" if samples > 1 else ("L" if bits <= 8 else "I;16")
    return _stretch(pixels), ImageInfo("DICOM", cols, rows, mode)


def decode_gray(
    source: bytes | Path | str, *, max_bytes: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, ImageInfo]:
    """Decode an image into a 2-D uint8 grayscale array.

    Args:
        source: the file's bytes or its path.
        max_bytes: refuse larger inputs (None: no limit).
        max_pixels: refuse images whose header declares more pixels than this.

    Returns:
        The grayscale pixels and the header information (original mode and size).

    Raises:
        ImageDecodeError: empty, not an image, truncated, corrupt or over a limit.
    """
    if isinstance(source, (str, Path)):
        data = read_image_file(source, max_bytes)  # checks the size before reading
    else:
        data = bytes(source)
        if max_bytes is not None and len(data) > max_bytes:
            raise ImageDecodeError(f"file is {len(data)} bytes, over the limit of {max_bytes} bytes")
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if _is_dicom(data):
        return _decode_dicom(data, max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: the bytes are not JPEG, PNG, DICOM or another known format") from None
    except Image.DecompressionBombError as err:  # Pillow's own limit (~179 Mpx), checked as it opens the file
        declared = re.search(r"\((\d+) pixels\)", str(err))
        if declared and int(declared.group(1)) > max_pixels:  # the same words as our own header check
            raise ImageDecodeError(f"image is {declared.group(1)} pixels, over the limit of {max_pixels} "
                                   "(refused from its header as a decompression bomb)") from None
        raise ImageDecodeError(f"image refused as a decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:  # e.g. a JPEG cut off inside its header
        raise ImageDecodeError(f"corrupt or truncated image header ({err})") from None
    except Exception as err:  # a format plugin's own error, e.g. NotImplementedError for a DDS pixel format
        raise ImageDecodeError(f"cannot read this image's header ({type(err).__name__}: {err})") from None
    _within_pixels(im, max_pixels, "image")
    if im.mode not in SUPPORTED_MODES:
        raise ImageDecodeError(f"unsupported image mode {im.mode!r}; supported: {', '.join(SUPPORTED_MODES)}")
    try:
        if seek_middle_frame(im):
            _within_pixels(im, max_pixels, f"frame {im.tell()} of {im.n_frames}")  # each TIFF page has its own size
        im.load()
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = str(err)
        if "truncated" in reason:
            reason = "image file is truncated (incomplete data)"
        raise ImageDecodeError(f"corrupt image: {reason}") from None
    except Exception as err:  # a format plugin's own error
        raise ImageDecodeError(f"cannot decode this image ({type(err).__name__}: {err})") from None
    info = ImageInfo(im.format or "?", im.width, im.height, im.mode)
    return gray_of_pil(_upright(im)), info


def seek_middle_frame(im: Image.Image) -> bool:
    """Move a stack (multi-page TIFF, animated GIF) to its middle frame, as multi-frame DICOM is read.

    Returns:
        Whether ``im`` has several frames.
    """
    if getattr(im, "n_frames", 1) <= 1:
        return False
    im.seek(im.n_frames // 2)
    return True


def _within_pixels(im: Image.Image, max_pixels: int, what: str) -> None:
    if im.width * im.height > max_pixels:
        raise ImageDecodeError(
            f"{what} is {im.width}x{im.height} = {im.width * im.height} pixels, over the limit of {max_pixels}")


def _upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: turned by its EXIF orientation (a phone photo of a film or screen)."""
    try:
        turned = im.getexif().get(0x0112, 1) not in (1, None)  # 0x0112: Orientation
        return ImageOps.exif_transpose(im) if turned else im
    except Exception as err:  # a malformed EXIF block
        raise ImageDecodeError(f"cannot read this image's EXIF orientation ({type(err).__name__}: {err})") from None


_ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")


def gray_of_pil(im: Image.Image) -> np.ndarray:
    """A decoded PIL image as 2-D uint8 grayscale: 16/32-bit integers and floats are stretched, not clipped.

    Raises:
        ImageDecodeError: a mode that cannot be made grayscale, NaN or infinite values, or no pixels.
    """
    if im.mode not in SUPPORTED_MODES:
        raise ImageDecodeError(f"unsupported image mode {im.mode!r}; supported: {', '.join(SUPPORTED_MODES)}")
    if im.mode == "F" or im.mode.startswith("I"):  # 16- and 32-bit integers, floats: stretched to 8 bits
        gray = _stretch(np.asarray(im, dtype=np.float64))
    elif im.mode in ("LAB", "La"):  # lightness; La's premultiplied L is already the image over black
        gray = np.asarray(im.getchannel(0), dtype=np.uint8)
    elif im.mode in _ALPHA_MODES or "transparency" in im.info:  # what is see-through is the black background
        rgba = im.convert("RGBA")
        gray = np.asarray(Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), rgba).convert("L"),
                          dtype=np.uint8)
    else:
        try:
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
        except ValueError as err:  # a mode Pillow reads but cannot turn into grayscale
            raise ImageDecodeError(f"image mode {im.mode!r} cannot be converted to grayscale ({err})") from None
    if gray.ndim != 2 or min(gray.shape) == 0:
        raise ImageDecodeError(f"decoded to an array of shape {gray.shape}, not a 2-D image")
    return gray


def _stretch(arr: np.ndarray) -> np.ndarray:
    """More than 8 bits (16/32-bit integers, floats, DICOM) to uint8: the 0.5th to 99.5th percentile
    mapped linearly onto 0..255, the rest clipped, so that a few hot or dead pixels do not turn the
    slice black (the network standardises each image, so a linear map loses nothing but precision).

    In float64, so that a float32 image spanning -3e38..3e38 does not overflow.

    Raises:
        ImageDecodeError: NaN or infinite values (one would blank the whole image).
    """
    arr = _finite(np.asarray(arr, dtype=np.float64))
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return (np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255).astype(np.uint8)


def gray_of(image: "bytes | str | Path | Image.Image | np.ndarray") -> np.ndarray:
    """Any image a caller holds (file bytes, a path, a PIL image, an array) as 2-D uint8 at its own size."""
    if isinstance(image, (bytes, str, Path)):
        return decode_gray(image)[0]
    if isinstance(image, Image.Image):
        return gray_of_pil(_upright(_middle_frame(image)))  # as a file of the same image is read
    return gray_from_array(image)


def _middle_frame(im: Image.Image) -> Image.Image:
    """The frame of ``im`` a file of it would be classified by (its middle one), leaving ``im`` where it was."""
    if getattr(im, "n_frames", 1) <= 1:
        return im
    position = im.tell()
    try:
        seek_middle_frame(im)
        frame = im.copy()
        frame.info = dict(im.info)  # its EXIF orientation goes with it
        return frame
    finally:
        im.seek(position)


def gray_from_array(array: np.ndarray) -> np.ndarray:
    """A 2-D uint8 grayscale image from an array a caller already holds.

    Accepts ``[H, W]``, ``[H, W, C]`` (C = 1, 3 or 4, channels last, as PIL and OpenCV give)
    or ``[C, H, W]`` (C = 1 or 3, as torch gives). uint8 is taken as it is; any other numeric
    type (uint16 scanner values, floats in [0, 1], ...) is stretched from its minimum to its
    maximum.

    Raises:
        ImageDecodeError: another shape, a non-numeric type, or NaN/infinite values.
    """
    arr = np.asarray(array)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ImageDecodeError(f"array of type {arr.dtype} is not an image; expected uint8 or another numeric type")
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]  # uint8 colour: the same luma conversion as a decoded RGB file
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L")) if rgb.dtype == np.uint8 \
            else rgb.astype(np.float32).mean(-1)
    if arr.ndim != 2 or min(arr.shape) == 0:
        raise ImageDecodeError(
            f"array of shape {tuple(np.shape(array))} is not an image; expected [H, W], [H, W, 1|3|4] or [1|3, H, W]")
    if arr.dtype == np.uint8:
        return arr
    return _stretch(arr)


def resize_gray(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize a grayscale uint8 image to ``size`` x ``size`` with antialiasing."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))
