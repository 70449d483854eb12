"""Data validation: image statistics, the reference, the GX suite and `btc data validate`.

Each broken dataset is a copy of one small generated dataset with a single defect, and must
fail exactly the expectation that describes that defect.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from btc.cli_validate import validate_command
from btc.config import ValidationConfig
from btc.data.images import decode_gray
from btc.data.manifest import build_manifest
from btc.data.split import split_without_leakage
from btc.data.stats import (
    REFERENCE_COLUMNS, STAT_COLUMNS, image_statistics, learn_reference, load_reference, merge_references,
    save_reference, statistics_frame,
)
from btc.data.synth import generate_synthetic_dataset
from btc.labels import CLASSES
from btc.validation import (
    CHECKED_STATISTICS, expectation_names, leaks_across_splits, validate_dataset, validation_frame,
)

STATISTIC_EXPECTATIONS = {
    "mean_intensity_in_reference_range", "contrast_in_reference_range",
    "black_border_share_in_reference_range", "entropy_in_reference_range",
}


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("clean"), per_class=12, size=96)


@pytest.fixture(scope="module")
def clean_manifest(clean_dir) -> pd.DataFrame:
    return build_manifest(clean_dir, workers=2, progress=False)


@pytest.fixture
def dataset_copy(clean_dir, tmp_path) -> Path:
    return Path(shutil.copytree(clean_dir, tmp_path / "data"))


def _validate(frame: pd.DataFrame, tmp_path: Path, **kwargs):
    return validate_dataset(frame, data_docs_dir=tmp_path / "docs", workers=2, **kwargs)


def _manifest(root: Path) -> pd.DataFrame:
    return build_manifest(root, workers=2, progress=False)


def _photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colourful RGB 'photo': per-channel gradients and blotches filling the whole frame."""
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [rng.uniform(0.3, 0.9) * (a * x + (1 - a) * y) + rng.uniform(0.1, 0.4) for a in rng.uniform(0, 1, 3)]
    blotches = rng.uniform(-0.2, 0.2, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
    return (np.clip(np.stack(channels, -1) + blotches, 0, 1) * 255).astype(np.uint8)


def _mri_like(size: int = 96) -> np.ndarray:
    """A bright textured ellipse on a black background."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size * 2 - 1
    head = (x / 0.6) ** 2 + (y / 0.75) ** 2 < 1
    texture = 120 + 60 * np.sin(9 * x) * np.cos(7 * y)
    return np.where(head, texture, 3).astype(np.uint8)


@pytest.fixture(scope="module")
def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(validate_command)
    return app


# --- statistics and reference ------------------------------------------------------------------


def test_image_statistics_tell_an_mri_slice_from_a_photo():
    mri = image_statistics(_mri_like())
    photo = image_statistics(np.asarray(Image.fromarray(_photo(np.random.default_rng(0), 96)).convert("L")))
    assert set(mri) == set(STAT_COLUMNS)
    assert mri["black_border_share"] > 0.9 > 0.1 > photo["black_border_share"]
    assert mri["contrast"] == pytest.approx(mri["p95"] - mri["p05"])
    assert 0 <= mri["p05"] <= mri["p50"] <= mri["p95"] <= 1
    assert (mri["width"], mri["height"], mri["aspect"]) == (96.0, 96.0, 1.0)


def test_image_statistics_known_values_and_bad_input():
    flat = image_statistics(np.full((10, 20), 255, np.uint8))
    assert flat["mean"] == 1.0 and flat["std"] == 0.0 and flat["entropy"] == 0.0 and flat["contrast"] == 0.0
    assert flat["aspect"] == 2.0
    ramp = image_statistics(np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert ramp["entropy"] == pytest.approx(8.0)
    assert ramp["mean"] == pytest.approx(0.5)
    big = np.zeros((1000, 1000), np.uint8)  # downsized internally, still the same answer
    assert image_statistics(big)["black_border_share"] == 1.0
    with pytest.raises(ValueError, match="2-D uint8"):
        image_statistics(np.zeros((4, 4, 3), np.uint8))


def test_statistics_frame_keeps_order_and_gives_nan_for_unreadable_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_mri_like()).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    frame = statistics_frame([good, broken, _mri_like(64)], workers=2)
    assert list(frame.columns) == list(STAT_COLUMNS) and len(frame) == 3
    assert frame.loc[0, "mean"] == pytest.approx(image_statistics(decode_gray(good)[0])["mean"])
    assert frame.loc[1].isna().all()
    assert frame.loc[2, "width"] == 64


def test_reference_holds_its_own_data_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    stats = pd.DataFrame({c: rng.uniform(0.2, 0.6, 200) for c in REFERENCE_COLUMNS})
    reference = learn_reference(stats, source="unit")
    for column in REFERENCE_COLUMNS:
        lo, hi = reference["ranges"][column]
        assert stats[column].between(lo, hi).mean() >= 0.99
        assert lo < stats[column].median() < hi
    other = learn_reference(stats + 0.3, source="shifted")
    merged = merge_references([reference, other])
    assert merged["ranges"]["mean"][0] == reference["ranges"]["mean"][0]
    assert merged["ranges"]["mean"][1] == other["ranges"]["mean"][1]
    assert len(merged["sources"]) == 2
    path = save_reference(merged, tmp_path / "ref.json")
    assert load_reference(path) == merged
    (tmp_path / "bad.json").write_text(json.dumps({"ranges": {"mean": [0, 1]}}))
    with pytest.raises(ValueError, match="lacks a \\[min, max\\] range for std"):
        load_reference(tmp_path / "bad.json")


def test_shipped_reference_accepts_generated_mri_and_rejects_photos(clean_manifest):
    from btc.validation import DEFAULT_REFERENCE_PATH

    ranges = load_reference(DEFAULT_REFERENCE_PATH)["ranges"]
    mri = statistics_frame(clean_manifest["path"], workers=2)
    photos = statistics_frame(
        [np.asarray(Image.fromarray(_photo(np.random.default_rng(i), 96)).convert("L")) for i in range(20)]
    )
    column = "black_border_share"
    assert mri[column].between(*ranges[column]).mean() >= 0.95
    assert photos[column].between(*ranges[column]).mean() <= 0.05


# --- the validation frame ----------------------------------------------------------------------


def test_leaks_across_splits_flags_both_sides_and_ignores_excluded_rows():
    zero, near, far = "0" * 64, "0" * 63 + "f", "f" * 64  # near: 4 bits from zero
    splits = pd.Series(["train", "test", "val", "excluded", "test"])
    phashes = pd.Series([zero, near, far, zero, far])
    assert leaks_across_splits(splits, phashes, max_distance=4).tolist() == [True, True, True, False, True]
    assert leaks_across_splits(splits, phashes, max_distance=3).tolist() == [False, False, True, False, True]
    assert not leaks_across_splits(pd.Series(["train", "train"]), pd.Series([zero, zero]), 4).any()


def test_validation_frame_nulls_what_an_unreadable_file_cannot_have(clean_manifest):
    manifest = clean_manifest.copy()
    manifest.loc[0, ["readable", "error"]] = [False, "corrupt image"]
    manifest.loc[1, "label"] = "tumour_x"
    frame = validation_frame(manifest, workers=2)
    assert frame.loc[0, ["width", "height", "mode", *CHECKED_STATISTICS]].isna().all()
    assert frame.loc[2, ["width", *CHECKED_STATISTICS]].notna().all()
    assert np.isnan(frame.loc[1, "label_share"])
    assert frame["label_share"].dropna().between(0.2, 0.3).all()
    assert set(frame["split"]) == {"train", "test", ""}  # the source folders, "" for the unreadable row


# --- the suite on broken datasets ---------------------------------------------------------------


def test_clean_dataset_passes_and_data_docs_are_written(clean_manifest, tmp_path):
    report = _validate(split_without_leakage(clean_manifest), tmp_path)
    assert [o.name for o in report.outcomes] == expectation_names()
    assert report.success and report.failures == [] and report.warnings == []
    assert report.outcome("class_share_at_least_min").observed == "0.250"
    index = report.data_docs_index
    assert index == (tmp_path / "docs" / "index.html").resolve() and "mri_manifest" in index.read_text()
    pages = list((tmp_path / "docs" / "validations" / "mri_manifest").rglob("*.html"))
    assert len(pages) == 1
    page = pages[0].read_text()
    assert "Succeeded" in page and "Every label is one of the four classes." in page


def test_unknown_label_fails_labels_known_only(clean_manifest, tmp_path):
    manifest = clean_manifest.copy()
    manifest.loc[[0, 5, 9], "label"] = "tumour_x"
    report = _validate(manifest, tmp_path)
    assert report.failures == ["labels_known"]
    assert report.outcome("labels_known").observed.startswith("3 of 48 unexpected (values tumour_x)")


def test_missing_class_fails_all_classes_present_only(dataset_copy, tmp_path):
    for folder in ("Training", "Testing"):
        shutil.rmtree(dataset_copy / folder / "pituitary")
    report = _validate(_manifest(dataset_copy), tmp_path)
    assert report.failures == ["all_classes_present"]
    assert report.outcome("all_classes_present").observed == "missing pituitary"


def test_corrupt_file_fails_files_readable_only(dataset_copy, tmp_path):
    victim = dataset_copy / "Training" / "meningioma" / "Tr-me_0003.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    for name in ("gone_1.jpg", "gone_2.jpg"):  # two broken links: unreadable, not copies of each other
        (dataset_copy / "Training" / "glioma" / name).symlink_to(tmp_path / name)
    report = _validate(split_without_leakage(_manifest(dataset_copy)), tmp_path)
    assert report.failures == ["files_readable"] and report.warnings == []
    assert report.outcome("files_readable").observed.startswith("3 of 50 unexpected (values False), e.g. gone_1.jpg")


def test_a_near_copy_in_the_given_testing_folder_is_a_declared_warning_not_a_leak(dataset_copy, tmp_path):
    # A re-encoded copy of a training image in the given Testing folder: the splitter keeps
    # Testing as the test set and marks the copy, so evaluation reports the clean rest apart.
    original = dataset_copy / "Training" / "glioma" / "Tr-gl_0000.jpg"
    Image.open(original).save(dataset_copy / "Testing" / "glioma" / "Te-gl_copy.jpg", quality=60)
    split = split_without_leakage(_manifest(dataset_copy))
    assert split["near_dup_in_train"].sum() == 1
    report = _validate(split, tmp_path)
    assert report.success and report.warnings == ["given_test_has_no_near_copies_of_training"]
    assert report.outcome("given_test_has_no_near_copies_of_training").observed.startswith("1 of 49 unexpected")
    assert "Te-gl_copy.jpg" in report.outcome("given_test_has_no_near_copies_of_training").observed
    assert report.outcome("no_leaks_across_splits").status == "PASS"
    strict = _validate(split, tmp_path, config=ValidationConfig(warn_only=[]))
    assert strict.failures == ["given_test_has_no_near_copies_of_training"]


def test_near_duplicate_between_train_and_val_fails_no_leaks_only(dataset_copy, tmp_path):
    split = split_without_leakage(_manifest(dataset_copy))
    train = split.index[(split["split"] == "train") & (split["label"] == "glioma")][0]
    val = split.index[(split["split"] == "val") & (split["label"] == "glioma")][0]
    split.loc[val, "phash"] = split.loc[train, "phash"]  # a split edited by hand: a near copy across train/val
    report = _validate(split, tmp_path)
    assert report.failures == ["no_leaks_across_splits"]
    assert report.outcome("no_leaks_across_splits").observed.startswith("2 of 48 unexpected")


def test_exact_duplicate_in_one_folder_is_a_warning_by_default_and_a_failure_when_configured(dataset_copy, tmp_path):
    original = dataset_copy / "Training" / "notumor" / "Tr-no_0001.jpg"
    shutil.copy(original, original.with_name("Tr-no_0001 (copy).jpg"))
    manifest = _manifest(dataset_copy)
    default = _validate(manifest, tmp_path)
    assert default.success and default.warnings == ["no_exact_duplicates_within_source_split"]
    strict = _validate(manifest, tmp_path, config=ValidationConfig(warn_only=[]))
    assert strict.failures == ["no_exact_duplicates_within_source_split"]
    observed = strict.outcome("no_exact_duplicates_within_source_split").observed
    assert observed.startswith("2 of 49 unexpected, e.g. ")
    assert "Tr-no_0001.jpg" in observed and "Tr-no_0001 (copy).jpg" in observed


def test_photos_fail_the_image_statistics_only(dataset_copy, tmp_path):
    rng = np.random.default_rng(0)
    training = sorted((dataset_copy / "Training").rglob("*.jpg"))
    for path in training[::3] + training[1::3]:  # two thirds of the training images
        Image.fromarray(_photo(rng, 96)).save(path, quality=90)
    report = _validate(_manifest(dataset_copy), tmp_path)
    assert "black_border_share_in_reference_range" in report.failures
    assert set(report.failures) <= STATISTIC_EXPECTATIONS


def test_class_far_below_its_share_fails_class_share_and_split_cover_only(dataset_copy, tmp_path):
    shutil.rmtree(dataset_copy / "Testing" / "glioma")
    for path in sorted((dataset_copy / "Training" / "glioma").glob("*.jpg"))[2:]:
        path.unlink()
    split = split_without_leakage(_manifest(dataset_copy))
    report = _validate(split, tmp_path)
    # two glioma images cannot fill train, val and test: each shortfall is its own failure
    assert report.failures == ["class_share_at_least_min", "every_class_in_every_split"]
    train = split[split["split"] == "train"]
    share = (train["label"] == "glioma").mean()
    assert share > 0 and float(report.outcome("class_share_at_least_min").observed) == pytest.approx(share, abs=1e-3)
    assert report.outcome("every_class_in_every_split").observed.startswith("2 of ")


def test_a_class_only_in_the_given_test_folder_fails_validation(dataset_copy, tmp_path):
    """Test images cannot make up for a class training never sees (training weighs such a class 0)."""
    for path in (dataset_copy / "Training" / "pituitary").glob("*.jpg"):
        shutil.move(path, dataset_copy / "Testing" / "pituitary" / f"moved {path.name}")
    (dataset_copy / "Training" / "pituitary").rmdir()  # an empty class folder is refused outright
    report = _validate(split_without_leakage(_manifest(dataset_copy)), tmp_path)
    assert report.failures == ["class_share_at_least_min", "every_class_in_every_split"]
    assert float(report.outcome("class_share_at_least_min").observed) == 0.0


def test_a_class_missing_from_the_given_test_folder_fails_validation(dataset_copy, tmp_path):
    """A class with no test image would never be measured."""
    shutil.rmtree(dataset_copy / "Testing" / "glioma")
    report = _validate(split_without_leakage(_manifest(dataset_copy)), tmp_path)
    assert report.failures == ["every_class_in_every_split"]
    assert "Tr-gl_" in report.outcome("every_class_in_every_split").observed


def test_a_class_whose_every_file_is_unusable_has_share_zero(dataset_copy, tmp_path):
    """Copies of another class's images (label conflicts) leave meningioma nothing training would use."""
    for path in (dataset_copy / "Training" / "meningioma").glob("*.jpg"):
        path.unlink()
    for path in (dataset_copy / "Training" / "glioma").glob("*.jpg"):
        shutil.copy(path, dataset_copy / "Training" / "meningioma" / f"m {path.name}")
    report = _validate(_manifest(dataset_copy), tmp_path)  # the folders as delivered (--no-split)
    assert "class_share_at_least_min" in report.failures
    assert float(report.outcome("class_share_at_least_min").observed) == 0.0
    assert report.outcome("no_label_conflicts").status == "WARN"  # named as such; the splitter drops them


def test_label_conflicts_across_training_and_testing_are_a_named_warning(dataset_copy, tmp_path):
    copied = sorted((dataset_copy / "Training" / "glioma").glob("*.jpg"))[:3]
    for path in copied:
        shutil.copy(path, dataset_copy / "Testing" / "meningioma" / f"x {path.name}")
    report = _validate(split_without_leakage(_manifest(dataset_copy)), tmp_path)
    outcome = report.outcome("no_label_conflicts")
    assert report.success and report.warnings == ["no_label_conflicts"]
    assert outcome.observed.startswith("6 of ") and f"x {copied[0].name}" in outcome.observed
    strict = _validate(split_without_leakage(_manifest(dataset_copy)), tmp_path, config=ValidationConfig(warn_only=[]))
    assert strict.failures == ["no_label_conflicts"]


def test_identical_unreadable_files_are_not_exact_duplicates(dataset_copy, tmp_path):
    (dataset_copy / "Training" / "glioma" / "a.jpg").write_bytes(b"")
    (dataset_copy / "Training" / "notumor" / "b.jpg").write_bytes(b"")
    report = _validate(_manifest(dataset_copy), tmp_path)
    assert report.failures == ["files_readable"]
    assert report.outcome("no_exact_duplicates_within_source_split").status == "PASS"
    assert report.outcome("no_label_conflicts").status == "PASS"


def test_copies_do_not_make_up_a_class_share(dataset_copy, tmp_path):
    """Two glioma images copied 15 times each are still two images: the share counts what training would use."""
    shutil.rmtree(dataset_copy / "Testing" / "glioma")
    kept = sorted((dataset_copy / "Training" / "glioma").glob("*.jpg"))
    for path in kept[2:]:
        path.unlink()
    for path in kept[:2]:
        for i in range(15):
            shutil.copy(path, path.with_name(f"{path.stem} copy {i}.jpg"))
    manifest = _manifest(dataset_copy)
    split = split_without_leakage(manifest)
    distinct_training = manifest[manifest["source_split"] == "train"].drop_duplicates("sha256")
    in_train = split[split["split"] == "train"]
    for frame, training in ((manifest, distinct_training), (split, in_train)):  # a manifest and a split alike
        report = _validate(frame, tmp_path)
        assert "class_share_at_least_min" in report.failures
        share = (training["label"] == "glioma").mean()  # 2 images among those training would use
        assert share < 0.1 and float(report.outcome("class_share_at_least_min").observed) == pytest.approx(share, abs=1e-3)


def test_unknown_warn_only_name_is_refused(clean_manifest, tmp_path):
    expected = "unknown expectation 'no_such_check' in warn-only; expected one of labels_known"
    with pytest.raises(ValueError, match=expected):
        _validate(clean_manifest, tmp_path, warn_only={"no_such_check"})


# --- the command ------------------------------------------------------------------------------


def test_cli_passes_on_clean_data_and_prints_the_table(cli_app, clean_dir, tmp_path):
    docs = tmp_path / "docs"
    result = CliRunner().invoke(cli_app, [str(clean_dir), "--docs-dir", str(docs), "--workers", "2"])
    assert result.exit_code == 0, result.output
    for name in expectation_names():
        assert f"{name} " in result.output
    assert "FAIL" not in result.output and "data validation passed" in result.output
    assert f"Data Docs: {(docs / 'index.html').resolve()}" in result.output
    assert "mri_manifest" in (docs / "index.html").read_text()


def test_cli_exact_copy_across_folders_fails_unless_warned(cli_app, dataset_copy, tmp_path):
    original = dataset_copy / "Training" / "pituitary" / "Tr-pi_0002.jpg"
    shutil.copy(original, dataset_copy / "Testing" / "pituitary" / "Te-pi_copy.jpg")
    args = [str(dataset_copy), "--no-split", "--docs-dir", str(tmp_path / "docs"), "--workers", "2"]
    failed = CliRunner().invoke(cli_app, args)
    assert failed.exit_code == 1, failed.output
    assert "data validation FAILED: no_leaks_across_splits" in failed.output
    assert "make it a warning: --warn-only no_leaks_across_splits" in failed.output
    warned = CliRunner().invoke(cli_app, [*args, "--warn-only", "no_leaks_across_splits"])
    assert warned.exit_code == 0, warned.output
    assert "WARN" in warned.output and "with warnings: no_leaks_across_splits" in warned.output


def test_cli_says_why_each_file_is_unreadable(cli_app, dataset_copy, tmp_path):
    (dataset_copy / "Training" / "glioma" / "Tr-gl_0002.jpg").write_bytes(b"not a jpeg")
    (dataset_copy / "Training" / "glioma" / "gone.jpg").symlink_to(tmp_path / "gone.jpg")
    result = CliRunner().invoke(cli_app, [str(dataset_copy), "--docs-dir", str(tmp_path / "docs"), "--workers", "2"])
    assert result.exit_code == 1 and "files_readable" in result.output
    text = " ".join(result.output.split())
    assert f"unreadable file {dataset_copy / 'Training' / 'glioma' / 'Tr-gl_0002.jpg'}: not an image" in text
    assert f"unreadable file {dataset_copy / 'Training' / 'glioma' / 'gone.jpg'}: cannot read file" in text


def test_cli_names_an_unknown_class_folder(cli_app, dataset_copy, tmp_path):
    (dataset_copy / "Training" / "glioma").rename(dataset_copy / "Training" / "tumour_x")
    result = CliRunner().invoke(cli_app, [str(dataset_copy), "--docs-dir", str(tmp_path / "docs")])
    assert result.exit_code == 1
    assert "unknown class folder 'tumour_x'; expected one of " + ", ".join(CLASSES) in result.output


def test_cli_refuses_a_missing_reference_file(cli_app, clean_dir, tmp_path):
    result = CliRunner().invoke(cli_app, [str(clean_dir), "--reference", str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert "nope.json' does not exist" in result.output
    # a folder, or a range that is one number, is named too (they were tracebacks)
    result = CliRunner().invoke(cli_app, [str(clean_dir), "--reference", str(tmp_path)])
    assert result.exit_code == 2 and "cannot be read (Is a directory)" in result.output, result.output
    scalar = _reference_with(tmp_path, mean=0.5)
    result = CliRunner().invoke(cli_app, [str(clean_dir), "--reference", str(scalar)])
    assert result.exit_code == 2 and "lacks a [min, max] range for mean" in result.output, result.output
    assert "Traceback" not in result.output


def _reference_with(tmp_path: Path, name: str = "ref.json", **ranges) -> Path:
    """The shipped statistics reference with some ranges replaced, saved as ``tmp_path/name``."""
    from btc.validation import DEFAULT_REFERENCE_PATH

    reference = json.loads(DEFAULT_REFERENCE_PATH.read_text())
    reference["ranges"].update(ranges)
    path = tmp_path / name
    path.write_text(json.dumps(reference))
    return path


def test_cli_refuses_misuse_before_reading_the_data(cli_app, tmp_path):
    """Each misuse exits 2 naming the option or file; the dataset (absent here) is never reached."""
    (tmp_path / "a_file").write_text("")
    absent = str(tmp_path / "no_data")
    cases = {
        "--docs-dir file": (["--docs-dir", str(tmp_path / "a_file")], "Data Docs folder (--docs-dir) "),
        "--workers 0": (["--workers", "0"], "'--workers'"),
        "min above max": (["--reference", str(_reference_with(tmp_path, "upside_down.json", mean=[0.9, 0.1]))],
                          "upside_down.json': the range of mean is [0.9, 0.1] (min above max)"),
        "not finite": (["--reference", str(_reference_with(tmp_path, "infinite.json", entropy=[0.0, float("inf")]))],
                       "infinite.json': the range of entropy is [0.0, inf] (not finite)"),
        "not numbers": (["--reference", str(_reference_with(tmp_path, "words.json", contrast=["low", "high"]))],
                        "words.json': the range of contrast is ['low', 'high']; expected two numbers"),
        "unknown warn-only": (["--warn-only", "nope"], "unknown expectation 'nope' in warn-only"),
        "sides out of order": (["-s", "validation.min_side_px=100", "-s", "validation.max_side_px=50"],
                               "min_side_px=100 is above max_side_px=50"),
    }
    for case, (extra, message) in cases.items():
        result = CliRunner().invoke(cli_app, [absent, "--docs-dir", str(tmp_path / "docs"), *extra])
        assert result.exit_code == 2, f"{case}: {result.exit_code} {result.output}"
        assert message in " ".join(result.output.split()), f"{case}: {result.output}"
        assert "not a valid dataset" not in result.output and "--warn-only" not in result.output, case
    assert not (tmp_path / "docs").exists()


def test_a_reference_with_min_above_max_is_refused_naming_the_file(clean_manifest, tmp_path):
    path = _reference_with(tmp_path, black_border_share=[0.9, 0.1])
    named = r"statistics reference '.*ref\.json': the range of black_border_share is \[0\.9, 0\.1\] \(min above max\)"
    with pytest.raises(ValueError, match=named):
        _validate(clean_manifest, tmp_path, config=ValidationConfig(reference=path))
    with pytest.raises(ValueError, match=r"the statistics reference: the range of black_border_share"):
        _validate(clean_manifest, tmp_path, reference=load_reference(path))
    assert not (tmp_path / "docs").exists()  # refused before GX ran


def test_an_expectation_that_cannot_run_is_a_failure_with_the_reason(clean_manifest, tmp_path):
    suite = {"name": "broken_suite", "expectations": [{
        "type": "expect_column_values_to_be_in_set", "kwargs": {"column": "no_such_column", "value_set": [1]},
        "meta": {"name": "needs_a_missing_column"},
    }]}
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    no_default_warnings = ValidationConfig(warn_only=[])  # the default names an expectation this suite lacks
    report = _validate(clean_manifest, tmp_path, suite_path=tmp_path / "suite.json", config=no_default_warnings)
    assert report.failures == ["needs_a_missing_column"]
    assert "no_such_column" in report.outcome("needs_a_missing_column").observed
    assert report.outcome("needs_a_missing_column").observed.startswith("error: ")
