"""How often the serving OOD rule (``btc/ood.py``) fires on real MRI, and on images that are not MRI.

False alarms: every image under ``--mri`` goes through the service's own decoding
(:func:`btc.serving_logic.decode_upload`) and the statistics part of the rule; with
``--model`` the confidence part is added (the whole rule the service applies).

``--mri`` may also be a split Parquet file (``btc data split``): then only its test rows
are used, the images the model did not train on.

Detection: images that are not brain MRI, made here: random crops of the colour photos that
ship with scikit-learn and matplotlib, in colour and in grey; blank and near-blank images;
colour gradients; text-like documents; noise. Example::

    .venv/bin/python benchmarks/ood_rates.py --mri ../shared/data/brain-tumor-mri/Training
"""

from __future__ import annotations

import argparse
import io
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from btc import serving_logic as logic  # noqa: E402
from btc.ood import OodRule, statistics_reasons  # noqa: E402

LIMITS = {"max_bytes": 50 * 1024 * 1024, "max_pixels": 100_000_000}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _photos() -> list[Image.Image]:
    photos = []
    try:
        from sklearn.datasets import load_sample_images

        photos += [Image.fromarray(a) for a in load_sample_images().images]
    except Exception:  # optional sources of real photos
        pass
    try:
        import matplotlib.cbook

        photos.append(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    except Exception:
        pass
    return photos


def not_mri_images(seed: int = 0, crops: int = 40) -> list[tuple[str, bytes]]:
    """``(kind, png bytes)`` of images that are not brain MRI slices."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, bytes]] = []
    photos = _photos()
    for i in range(crops if photos else 0):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch)).resize((224, 224))
        items += [("photo, colour", _png(crop)), ("photo, grey", _png(crop.convert("L")))]
    for value in (0, 30, 128, 255):
        items += [("blank", _png(Image.new("L", (224, 224), value))),
                  ("blank, RGB", _png(Image.new("RGB", (224, 224), (value,) * 3)))]
    for _ in range(10):
        noisy = rng.normal(rng.uniform(0, 255), rng.uniform(1, 6), (224, 224)).clip(0, 255).astype(np.uint8)
        items.append(("near-blank", _png(Image.fromarray(noisy))))
        grad = (np.linspace(0, 1, 224)[None, :, None] * rng.uniform(0, 255, 3)
                + np.linspace(0, 1, 224)[:, None, None] * rng.uniform(0, 255, 3)) / 2
        items.append(("colour gradient", _png(Image.fromarray(grad.clip(0, 255).astype(np.uint8)))))
        doc = np.full((224, 224), 245, np.uint8)
        for row in range(20, 200, 12):
            doc[row:row + 4, 20:int(rng.integers(100, 204))] = 20
        items.append(("document", _png(Image.fromarray(doc))))
        items.append(("noise", _png(Image.fromarray(rng.integers(0, 256, (224, 224), dtype=np.uint8)))))
    return items


def flags(items: list[tuple[str, bytes]], rule: OodRule, predictor=None,
          refused: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """``(kind, reasons)`` per item: the statistics part, plus the confidence part with a predictor.

    An item the service would refuse (400: not an image, empty, ...) is no OOD case: its
    reason goes to ``refused`` and it is left out.
    """
    def one(item: tuple[str, bytes]) -> tuple[str, list[str], logic.Upload] | None:
        try:
            upload = logic.decode_upload(item[1], item[0], **LIMITS)
        except logic.UploadError as err:
            (refused if refused is not None else []).append(str(err))
            return None
        return item[0], statistics_reasons(upload.stats, upload.saturation, rule), upload

    with ThreadPoolExecutor(2) as pool:
        decoded = [d for d in pool.map(one, items) if d is not None]
    if predictor is None:
        return [(kind, reasons) for kind, reasons, _ in decoded]
    out = []
    for start in range(0, len(decoded), 64):
        chunk = decoded[start:start + 64]
        probs = predictor.predict_proba(logic.model_inputs([u for _, _, u in chunk], predictor.image_size))
        for (kind, reasons, _), p in zip(chunk, probs):
            low = [f"low confidence ({p.max():.2f})"] if p.max() < rule.min_confidence else []
            out.append((kind, reasons + low))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mri", type=Path, required=True,
                        help="folder of real MRI slices (searched recursively), or a split .parquet (its test rows)")
    parser.add_argument("--model", help="model.pt or MLflow URI: add the confidence part of the rule")
    args = parser.parse_args(argv)
    rule = OodRule()
    predictor = None
    if args.model:
        from btc.predict import Predictor

        predictor = Predictor.load(args.model)
    if args.mri.suffix == ".parquet":  # the model's test split: images it did not train on
        import pandas as pd

        split = pd.read_parquet(args.mri)
        mri = [Path(p) for p in split.loc[split["split"] == "test", "path"]]
    else:
        mri = sorted(p for p in args.mri.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not mri:
        raise SystemExit(f"error: no MRI images (.jpg, .jpeg, .png) under {args.mri}")
    refused: list[str] = []
    mri_flags = flags([(str(p), p.read_bytes()) for p in mri], rule, predictor, refused)
    for reason in refused:
        print(f"skipped (the service answers 400): {reason}", file=sys.stderr)
    if not mri_flags:
        raise SystemExit(f"error: none of the {len(mri)} images under {args.mri} could be decoded")
    flagged = [r for _, r in mri_flags if r]
    by_test = Counter(r.split(" (")[0] for reasons in flagged for r in reasons)
    print(f"real MRI ({args.mri}): {len(flagged)} of {len(mri_flags)} flagged = {len(flagged) / len(mri_flags):.2%}"
          f"{f' ({len(refused)} unreadable skipped)' if refused else ''}; by test: {dict(by_test)}")
    detected: dict[str, list[bool]] = defaultdict(list)
    for kind, reasons in flags(not_mri_images(), rule, predictor):
        detected[kind].append(bool(reasons))
    print("\n| not MRI | images | flagged |\n| --- | ---: | ---: |")
    for kind, hits in detected.items():
        print(f"| {kind} | {len(hits)} | {np.mean(hits):.0%} |")
    everything = [h for hits in detected.values() for h in hits]
    print(f"| all | {len(everything)} | {np.mean(everything):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
