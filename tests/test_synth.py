"""The synthetic dataset: Kaggle layout, lesion boxes, determinism, and no trivial shortcut."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from btc.data.discover import find_images
from btc.data.synth import generate_synthetic_dataset
from btc.labels import CLASSES, TUMOUR_CLASSES

SIZE = 128


def _lesion_rows(root: Path) -> list[dict]:
    with open(root / "lesions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _box(row: dict) -> tuple[int, int, int, int]:
    return int(row["x0"]), int(row["y0"]), int(row["x1"]), int(row["y1"])


def _gray(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=float)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("kaggle"), per_class=10, seed=0)


def test_kaggle_layout_has_every_class_in_both_splits(kaggle):
    assert sorted(p.name for p in kaggle.iterdir() if p.is_dir()) == ["Testing", "Training"]
    for split, expected in (("Training", 8), ("Testing", 2)):
        assert sorted(p.name for p in (kaggle / split).iterdir()) == sorted(CLASSES)
        for label in CLASSES:
            assert len(list((kaggle / split / label).glob("*.jpg"))) == expected, (split, label)


def test_discovery_reads_the_generated_folder(kaggle):
    found = find_images(kaggle)
    assert len(found) == 40
    assert {(f.label, f.source_split) for f in found} == {(c, s) for c in CLASSES for s in ("train", "test")}


def test_lesions_csv_lists_exactly_the_files_with_their_labels(kaggle):
    rows = _lesion_rows(kaggle)
    assert list(rows[0]) == ["path", "label", "x0", "y0", "x1", "y1"]
    assert sorted(r["path"] for r in rows) == sorted(_digests(kaggle))
    for row in rows:
        assert Path(row["path"]).parent.name == row["label"]


def test_boxes_lie_inside_the_image_and_only_tumours_have_one(kaggle):
    for row in _lesion_rows(kaggle):
        if row["label"] == "notumor":
            assert [row[k] for k in ("x0", "y0", "x1", "y1")] == ["", "", "", ""]
            continue
        x0, y0, x1, y1 = _box(row)
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE, row
        # a box covering most of the slice would make any explanation map "hit" it
        assert (x1 - x0) * (y1 - y0) < 0.25 * SIZE * SIZE, row


def test_images_share_one_size_and_mix_grayscale_with_rgb(kaggle):
    modes = set()
    for path in kaggle.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (SIZE, SIZE)
            modes.add(image.mode)
    assert modes == {"L", "RGB"}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first = _digests(generate_synthetic_dataset(tmp_path / "a", per_class=3, seed=7))
    again = _digests(generate_synthetic_dataset(tmp_path / "b", per_class=3, seed=7))
    other = _digests(generate_synthetic_dataset(tmp_path / "c", per_class=3, seed=8))
    assert first == again
    assert (tmp_path / "a" / "lesions.csv").read_bytes() == (tmp_path / "b" / "lesions.csv").read_bytes()
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first)


def test_an_image_does_not_depend_on_how_many_others_are_drawn(tmp_path):
    few = _digests(generate_synthetic_dataset(tmp_path / "few", per_class=2, layout="flat"))
    many = _digests(generate_synthetic_dataset(tmp_path / "many", per_class=5, layout="flat"))
    assert few == {k: many[k] for k in few}


def _test_distances_to_training(root: Path) -> dict[str, int]:
    from btc.data.manifest import build_manifest, phash_words
    from btc.data.split import nearest

    m = build_manifest(root, progress=False)
    train, test = m[m["source_split"] == "train"], m[m["source_split"] == "test"]
    _, distance = nearest(phash_words(test["phash"]), phash_words(train["phash"]))
    return dict(zip(test["path"].map(lambda p: Path(p).relative_to(root).as_posix()), distance.tolist()))


def test_a_test_image_too_close_to_training_is_redrawn_and_nothing_else_changes(tmp_path):
    # 70 bits is far above the default 40 so that these few small images collide at all.
    as_drawn = generate_synthetic_dataset(tmp_path / "a", per_class=20, size=96, near_duplicate_distance=None)
    redrawn = generate_synthetic_dataset(tmp_path / "b", per_class=20, size=96, near_duplicate_distance=70)
    before, after = _test_distances_to_training(as_drawn), _test_distances_to_training(redrawn)
    close = {path for path, d in before.items() if d <= 70}
    assert close and min(after.values()) > 70
    a, b = _digests(as_drawn), _digests(redrawn)
    assert {p for p in a if a[p] != b[p]} == close  # training and the far test images are byte-identical
    assert (as_drawn / "lesions.csv").read_text().count("\n") == (redrawn / "lesions.csv").read_text().count("\n")


def test_an_unreachable_distance_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"more than 256 bits from every training image after 20 redraws"):
        generate_synthetic_dataset(tmp_path, per_class=3, size=64, near_duplicate_distance=256)


def test_mean_and_std_do_not_reveal_the_class(tmp_path):
    root = generate_synthetic_dataset(tmp_path, per_class=40, seed=0)
    rows = _lesion_rows(root)
    features = np.array([[a.mean(), a.std()] for a in (_gray(root / r["path"]) for r in rows)])
    labels = [r["label"] for r in rows]
    model = make_pipeline(StandardScaler(), LogisticRegression())
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    accuracy = cross_val_score(model, features, labels, cv=folds).mean()
    assert accuracy < 0.6, f"global statistics separate the classes: accuracy {accuracy:.2f} (chance 0.25)"


def _excess_over_surroundings(pixels: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mean inside the box minus the mean of a margin around it (half the box, >= 3 px)."""
    x0, y0, x1, y1 = box
    margin = max(3, (x1 - x0) // 2, (y1 - y0) // 2)
    outer = pixels[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin]
    inner = pixels[y0:y1, x0:x1]
    return inner.mean() - (outer.sum() - inner.sum()) / (outer.size - inner.size)


def test_the_lesion_is_visible_inside_its_box(tmp_path):
    root = generate_synthetic_dataset(tmp_path, per_class=20, seed=3, layout="flat")
    rows = _lesion_rows(root)
    healthy = [_gray(root / r["path"]) for r in rows if r["label"] == "notumor"]
    for label in TUMOUR_CLASSES:
        tumours = [r for r in rows if r["label"] == label]
        # The same box on a healthy slice is the control: anatomy alone (skull, ventricles)
        # can make a region brighter than its surroundings, a lesion must add to that.
        excess = np.array([_excess_over_surroundings(_gray(root / r["path"]), _box(r)) for r in tumours])
        control = np.array([_excess_over_surroundings(h, _box(r)) for r, h in zip(tumours, healthy)])
        assert (excess > control).mean() >= 0.8, (label, excess.round(1), control.round(1))
        assert np.median(excess) - np.median(control) > 10, (label, excess.round(1), control.round(1))


def test_flat_layout_has_class_folders_only(tmp_path):
    root = generate_synthetic_dataset(tmp_path, per_class=3, layout="flat", size=64)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CLASSES)
    assert all(len(list((root / c).glob("*.jpg"))) == 3 for c in CLASSES)
    assert {r["path"].split("/")[0] for r in _lesion_rows(root)} == set(CLASSES)
    with Image.open(next(root.rglob("*.jpg"))) as image:
        assert image.size == (64, 64)


def test_no_testing_folder_when_test_fraction_is_zero(tmp_path):
    root = generate_synthetic_dataset(tmp_path, per_class=2, test_fraction=0.0, size=32)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["Training"]
    assert len(find_images(root)) == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_class": 0}, r"per_class=0 .*>= 1"),
        ({"size": 16}, r"size=16 .*>= 32"),
        ({"test_fraction": 1.0}, r"test_fraction=1\.0 .*0 <= test_fraction < 1"),
        ({"test_fraction": -0.1}, r"test_fraction=-0\.1 "),
        ({"layout": "nested"}, r"layout='nested' .*kaggle, flat"),
        ({"seed": -1}, r"seed=-1 .*>= 0"),
    ],
)
def test_bad_arguments_name_the_value_and_what_is_accepted(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
