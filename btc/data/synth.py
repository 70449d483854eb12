"""A synthetic stand-in for the Kaggle brain MRI dataset, for tests and the demo.

Each image is an axial-looking slice drawn from scratch: dark background, a thin bright
scalp/skull ring, a brain ellipse with smooth grey/white-matter texture and sulci, dark
butterfly-shaped lateral ventricles, and for tumour classes one lesion placed where that
tumour usually is:

* glioma: an irregular, lobulated intra-axial mass off the midline, heterogeneous (sometimes
  with a dark necrotic core) inside a fainter oedema halo;
* meningioma: a round/oval, homogeneous, bright extra-axial mass with a broad base on the
  inner skull edge or on the falx (midline);
* pituitary: a small bright round midline mass, drawn behind (in the image, below) the
  lateral ventricles. It stands in for the sellar mass, which real data shows mostly on
  sagittal and coronal slices; this axial drawing does not model those planes, so the
  position is a stylised one, not the sella's;
* notumor: no lesion.

Head size, shape, position and rotation, acquisition noise and the global
brightness/contrast/gamma are drawn per image so that the classes differ only by the lesion,
not by global statistics a trivial model could use. The lesion bounding boxes are written to
``lesions.csv`` so explanation maps can be checked against them.

Every image has its own generator derived from ``(seed, class, index)``, so a training file
does not depend on which other files are generated, and one seed always gives byte-identical
files. Two independently drawn slices can still come as close as the splitter's near-duplicate
threshold (most often two notumor slices); a Testing image that comes within it of a Training
image is redrawn as a new patient (``(seed, class, index, attempt)``), so a generated dataset
is, like a well-made real one, free of leakage between its own folders.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from btc.config import DataConfig
from btc.data.images import decode_gray
from btc.data.manifest import phash_hex, phash_words
from btc.data.split import nearest
from btc.labels import CLASSES

LAYOUTS = ("kaggle", "flat")
LESION_COLUMNS = ("path", "label", "x0", "y0", "x1", "y1")
JPEG_QUALITY = 90
RGB_FRACTION = 0.25  # the real dataset mixes grayscale and 3-channel JPEGs
NEAR_DUPLICATE_BITS = DataConfig.model_fields["near_duplicate_distance"].default
MAX_REDRAWS = 20

# Kaggle's own file-name codes (Tr-gl_0001.jpg, Te-no_0001.jpg, ...).
_CLASS_CODES = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
_SPLIT_FOLDERS = {"train": ("Training", "Tr"), "test": ("Testing", "Te")}

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Head:
    """Coordinates of every pixel in the head's own frame.

    ``u, v`` are isotropic (unit = half the image width), rotated with the head and centred on
    it; ``p, q`` are the same scaled by the brain's semi-axes so the brain is ``rho < 1``.
    """

    u: np.ndarray
    v: np.ndarray
    p: np.ndarray
    q: np.ndarray
    rho: np.ndarray
    a: float
    b: float
    pixel: float  # one pixel in u/v units

    def uv(self, p: float, q: float) -> tuple[float, float]:
        """Brain-normalised point -> head-frame point."""
        return p * self.a, q * self.b


def _validate(per_class: int, size: int, test_fraction: float, layout: str, seed: int) -> None:
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class={per_class!r} is invalid; expected an integer >= 1")
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size={size!r} is invalid; expected an integer >= 32 pixels")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid; expected 0 <= test_fraction < 1")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid; expected one of {', '.join(LAYOUTS)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid; expected an integer >= 0")


def _image_rng(seed: int, class_index: int, index: int, attempt: int = 0) -> np.random.Generator:
    # A spawn key per image keeps each image independent of how many others are drawn.
    key = (class_index, index) if attempt == 0 else (class_index, index, attempt)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@lru_cache(maxsize=32)
def _gaussian_transfer(size: int, sigma: float) -> np.ndarray:
    """Fourier transfer function of a periodic gaussian blur (read-only, shared)."""
    freq_y = np.fft.fftfreq(size)[:, None]
    freq_x = np.fft.rfftfreq(size)[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (freq_y**2 + freq_x**2))
    transfer.flags.writeable = False
    return transfer


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian noise smoothed at ``sigma`` pixels (periodic), rescaled to unit standard deviation."""
    # Filtering in the Fourier domain costs the same for any sigma; spatial kernels of the
    # large sigmas used for texture dominated the run time.
    spectrum = np.fft.rfft2(rng.standard_normal((size, size))) * _gaussian_transfer(size, float(sigma))
    field = np.fft.irfft2(spectrum, s=(size, size))
    return field / (field.std() + 1e-12)


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _head_frame(rng: np.random.Generator, size: int) -> _Head:
    grid = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(grid, grid, indexing="ij")
    cx, cy = rng.uniform(-0.06, 0.06, size=2)
    theta = np.deg2rad(rng.uniform(-10, 10))
    u = np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)
    v = -np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)
    a = rng.uniform(0.55, 0.72)
    b = a * rng.uniform(1.08, 1.3)
    p, q = u / a, v / b
    return _Head(u, v, p, q, np.hypot(p, q), a, b, pixel=2.0 / size)


def _ventricles(rng: np.random.Generator, head: _Head) -> np.ndarray:
    """Two lateral ventricles, close at the septum and splaying apart at both ends: ')('."""
    scale = rng.uniform(0.8, 1.3)
    along = (head.q - rng.uniform(-0.2, -0.08)) / (0.3 * scale)  # -1 frontal tip, +1 posterior
    bend = rng.uniform(0.08, 0.16) * scale
    # the frontal horns are wider than the bodies behind them
    half_width = 0.055 * scale * (1.25 - 0.35 * np.clip(along, -1, 1))
    wobble = 0.15 * _smooth_noise(rng, head.u.shape[0], head.u.shape[0] / 16)
    mask = np.zeros(head.u.shape, dtype=bool)
    for side in (-1, 1):
        centre_line = side * (0.07 * scale + bend * along**2)
        across = (head.p - centre_line) / half_width
        mask |= np.hypot(across, along) + wobble < 1
    return mask


def _anatomy(rng: np.random.Generator, head: _Head) -> np.ndarray:
    """Background, skull ring and textured brain (values roughly in [0, 1])."""
    size = head.u.shape[0]
    gap, ring = rng.uniform(0.02, 0.05), rng.uniform(0.035, 0.07)
    scalp = (head.rho > 1 + gap) & (head.rho < 1 + gap + ring)
    img = np.where(scalp, rng.uniform(0.65, 0.9) + 0.08 * _smooth_noise(rng, size, size / 12), 0.03)

    folds = _smooth_noise(rng, size, size / 48)
    white = rng.uniform(0.55, 0.68)
    grey = white - rng.uniform(0.08, 0.16)
    # white matter inside, a folded grey-matter cortex outside, sulci as dark CSF lines
    cortex = _smoothstep(0.5, 0.85, head.rho + 0.12 * folds)
    brain = white + (grey - white) * cortex + 0.05 * _smooth_noise(rng, size, size / 10)
    brain -= 0.25 * cortex * (np.abs(folds) < 0.25)
    brain += 0.02 * _smooth_noise(rng, size, 1.0)
    fissure = (np.abs(head.u) < 1.2 * head.pixel) & (np.abs(head.q) > 0.45)
    brain = np.where(fissure, brain - 0.2, brain)
    brain = np.where(_ventricles(rng, head), rng.uniform(0.1, 0.2), brain)
    return np.where(head.rho < 1, brain, img)


def _lobulated(rng: np.random.Generator, head: _Head, centre: tuple[float, float], radius: float,
               roughness: float) -> np.ndarray:
    """Distance to ``centre`` divided by a noisy radial profile (``< 1`` is inside)."""
    du, dv = head.u - centre[0], head.v - centre[1]
    phi = np.arctan2(dv, du)
    profile = np.ones_like(phi)
    for k in range(2, 7):
        profile += roughness * rng.uniform(0, 1) / k * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    # a deep notch must not turn negative, which would draw a wedge out to the skull
    return np.hypot(du, dv) / (radius * np.maximum(profile, 0.3))


def _glioma(rng: np.random.Generator, head: _Head, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    side, angle = rng.choice([-1, 1]), rng.uniform(-0.8, 0.8)
    rho = rng.uniform(0.35, 0.65)
    centre = head.uv(side * rho * np.cos(angle), rho * np.sin(angle))
    radius = max(rng.uniform(0.09, 0.19), 2.5 * head.pixel)
    r = _lobulated(rng, head, centre, radius, roughness=rng.uniform(0.5, 1.0))
    inside_brain = head.rho < 0.97
    mass = (r < 1) & inside_brain
    edema = _smoothstep(rng.uniform(1.5, 2.0), 1.0, r) * inside_brain
    out = img + rng.uniform(0.06, 0.12) * edema
    grain = max(1.0, radius / head.pixel / 4)  # heterogeneity on a quarter of the lesion's scale
    interior = rng.uniform(0.85, 1.0) + 0.06 * _smooth_noise(rng, img.shape[0], grain)
    if rng.random() < 0.5:  # necrotic core inside an enhancing rim
        interior = np.where(r < rng.uniform(0.35, 0.6), rng.uniform(0.15, 0.35), interior)
    return np.where(mass, interior, out), mass


def _meningioma(rng: np.random.Generator, head: _Head, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    radius = max(rng.uniform(0.09, 0.18), 2.5 * head.pixel)
    if rng.random() < 0.75:  # convexity: against the inner skull
        alpha = rng.uniform(0, 2 * np.pi)
        normal = np.array([np.cos(alpha) / head.a, np.sin(alpha) / head.b])
        normal /= np.linalg.norm(normal)
        edge = np.array(head.uv(np.cos(alpha), np.sin(alpha)))
        centre = edge - normal * radius * rng.uniform(0.45, 0.75)
        base = head.rho < 1.0  # flattened where it meets the skull: a broad base
    else:  # falx: against the midline, in front of or behind the ventricles
        side = rng.choice([-1, 1])
        q = rng.choice([-1, 1]) * rng.uniform(0.4, 0.7)
        centre = np.array([side * radius * rng.uniform(0.45, 0.75), q * head.b])
        base = (head.u * side > head.pixel) & (head.rho < 1.0)
    r = _lobulated(rng, head, tuple(centre), radius, roughness=rng.uniform(0.0, 0.2))
    mass = (r < 1) & base
    value = rng.uniform(0.85, 1.0) + 0.02 * _smooth_noise(rng, img.shape[0], 1.5)
    return np.where(mass, value, img), mass


def _pituitary(rng: np.random.Generator, head: _Head, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # midline, behind the ventricles (whose lowest point is at q = 0.31): see the module docstring
    centre = head.uv(rng.uniform(-0.03, 0.03), rng.uniform(0.42, 0.55))
    radius = max(rng.uniform(0.045, 0.09), 2.0 * head.pixel)
    r = _lobulated(rng, head, centre, radius, roughness=rng.uniform(0.0, 0.3))
    mass = r < 1
    value = rng.uniform(0.85, 1.0) + 0.03 * _smooth_noise(rng, img.shape[0], 1.0)
    return np.where(mass, value, img), mass


_LESIONS = {"glioma": _glioma, "meningioma": _meningioma, "pituitary": _pituitary}


def _acquire(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Scanner blur, Rician noise and a random brightness/contrast/gamma, to uint8."""
    img = gaussian_filter(img, rng.uniform(0.4, 0.9))
    sigma = rng.uniform(0.01, 0.05)
    noise = rng.standard_normal((2, *img.shape)) * sigma
    # magnitude of a complex signal with gaussian noise in both channels is Rician
    img = np.hypot(img + noise[0], noise[1])
    img = np.clip(img, 0, None) ** rng.uniform(0.7, 1.4)
    img = img * rng.uniform(0.55, 1.3) + rng.uniform(-0.03, 0.08)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _bbox(mask: np.ndarray) -> Box:
    """``(x0, y0, x1, y1)`` of a non-empty mask; x1/y1 exclusive, like slice bounds."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _render_slice(rng: np.random.Generator, label: str, size: int) -> tuple[np.ndarray, Box | None]:
    """One uint8 slice of ``label`` and its lesion box (None for notumor)."""
    head = _head_frame(rng, size)
    img = _anatomy(rng, head)
    box = None
    if label in _LESIONS:
        img, mask = _LESIONS[label](rng, head, img)
        box = _bbox(mask)
    return _acquire(rng, img), box


def _relative_path(label: str, index: int, split: str, layout: str) -> Path:
    code = _CLASS_CODES[label]
    if layout == "flat":
        return Path(label) / f"{code}_{index:04d}.jpg"
    folder, prefix = _SPLIT_FOLDERS[split]
    return Path(folder) / label / f"{prefix}-{code}_{index:04d}.jpg"


def _jpeg(pixels: np.ndarray, as_rgb: bool) -> bytes:
    image = Image.fromarray(pixels)  # uint8 2-D -> mode "L"
    if as_rgb:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _phash_words(jpeg: bytes) -> np.ndarray:
    """The file's pHash as the manifest computes it, as uint64 words."""
    return phash_words([phash_hex(decode_gray(jpeg)[0])])


def _draw(seed: int, class_index: int, index: int, size: int, attempt: int = 0) -> tuple[bytes, Box | None]:
    rng = _image_rng(seed, class_index, index, attempt)
    pixels, box = _render_slice(rng, CLASSES[class_index], size)
    return _jpeg(pixels, as_rgb=rng.random() < RGB_FRACTION), box


def _draw_test(seed: int, class_index: int, index: int, size: int, seen: np.ndarray | None,
               min_distance: int | None) -> tuple[bytes, Box | None]:
    """A test image more than ``min_distance`` bits from every image of ``seen`` (pHash words; None: any)."""
    for attempt in range(MAX_REDRAWS + 1):
        jpeg, box = _draw(seed, class_index, index, size, attempt)
        if seen is None or nearest(_phash_words(jpeg), seen)[1][0] > min_distance:
            return jpeg, box
    raise RuntimeError(f"no test image {CLASSES[class_index]} #{index} more than {min_distance} bits from "
                       f"every training image after {MAX_REDRAWS} redraws; lower near_duplicate_distance")


def generate_synthetic_dataset(out_dir: Path, per_class: int = 60, seed: int = 0, size: int = 128,
                               test_fraction: float = 0.2, layout: str = "kaggle",
                               near_duplicate_distance: int | None = NEAR_DUPLICATE_BITS) -> Path:
    """Write a synthetic brain MRI dataset in the Kaggle folder layout, with lesion boxes.

    ``layout="kaggle"`` writes ``Training/<class>/*.jpg`` and ``Testing/<class>/*.jpg``, the
    last ``round(per_class * test_fraction)`` images of each class going to Testing (at least
    one always stays in Training); ``layout="flat"`` writes ``<class>/*.jpg``. A split folder
    that would be empty is not created. ``lesions.csv`` lists every image with its label and
    lesion box ``x0, y0, x1, y1`` in pixels (x1/y1 exclusive), empty for notumor.

    Args:
        out_dir: Folder to write into; created if missing. Existing files of the same names
            are overwritten, others are left alone.
        per_class: Images per class, Training and Testing together.
        seed: Same seed, byte-identical files.
        size: Width and height of every image in pixels.
        test_fraction: Share of each class written under Testing (kaggle layout only).
        layout: ``"kaggle"`` or ``"flat"``.
        near_duplicate_distance: a Testing image within this many pHash bits of a Training
            image is redrawn (the splitter's default threshold); None: never redraw.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: an argument is out of range.
    """
    _validate(per_class, size, test_fraction, layout, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_test = min(round(per_class * test_fraction), per_class - 1) if layout == "kaggle" else 0
    drawn: dict[tuple[int, int], tuple[bytes, Box | None]] = {}
    for class_index in range(len(CLASSES)):
        for index in range(per_class - n_test):
            drawn[class_index, index] = _draw(seed, class_index, index, size)
    # Training first: each test image is checked against all of them.
    check = n_test and near_duplicate_distance is not None
    seen = np.concatenate([_phash_words(jpeg) for jpeg, _ in drawn.values()]) if check else None
    for class_index in range(len(CLASSES)):
        for index in range(per_class - n_test, per_class):
            drawn[class_index, index] = _draw_test(seed, class_index, index, size, seen, near_duplicate_distance)
    rows = []
    for (class_index, index), (jpeg, box) in sorted(drawn.items()):
        label = CLASSES[class_index]
        relative = _relative_path(label, index, "test" if index >= per_class - n_test else "train", layout)
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / relative).write_bytes(jpeg)
        rows.append([relative.as_posix(), label, *(box if box else ("",) * 4)])
    with open(out_dir / "lesions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LESION_COLUMNS)
        writer.writerows(rows)
    return out_dir
