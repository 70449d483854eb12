"""Leakage-free splitting: no image or near duplicate shared between splits, stratified, deterministic."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from btc.data.manifest import build_manifest, phash_words
from btc.data.split import flag_near_duplicates, split_without_leakage


def _hamming(a: str, b: str) -> int:
    wa, wb = phash_words([a])[0], phash_words([b])[0]
    return int(np.bitwise_count(wa ^ wb).sum())


def _assert_no_near_duplicate_across(split, pairs):
    used = split[split["split"].isin(["train", "val", "test"])]
    assert not used["sha256"].duplicated().any()
    for a, b in pairs:
        left, right = used[used["split"] == a], used[used["split"] == b]
        assert not set(left["cluster"]) & set(right["cluster"])
        dists = [_hamming(x, y) for x in left["phash"] for y in right["phash"]]
        assert min(dists) > 40


def test_no_image_or_near_duplicate_across_splits(synth_split):
    # With a Testing folder the test set is given: near duplicates of it are flagged (next tests), not moved.
    _assert_no_near_duplicate_across(synth_split, [("train", "val")])


def test_train_distance_is_the_nearest_train_or_val_image(synth_split):
    seen = synth_split[synth_split["split"].isin(["train", "val"])]
    test = synth_split[synth_split["split"] == "test"]
    for _, row in test.iterrows():
        nearest = min(_hamming(row["phash"], other) for other in seen["phash"])
        assert row["train_distance"] == nearest
        assert row["near_dup_in_train"] == (nearest <= 40)
    assert synth_split.loc[synth_split["split"] != "test", "train_distance"].isna().all()


def test_kaggle_test_folder_is_kept(synth_split):
    test = synth_split[synth_split["split"] == "test"]
    assert (test["source_split"] == "test").all()
    assert (synth_split.loc[synth_split["source_split"] == "test", "split"].isin(["test", "excluded"])).all()


def test_split_is_stratified_and_deterministic(synth_split, synth_root):
    pool = synth_split[synth_split["split"].isin(["train", "val"])]
    val_share = pool.groupby("label")["split"].apply(lambda s: (s == "val").mean())
    largest = pool.groupby(["label", "cluster"]).size().groupby("label").max() / pool.groupby("label").size()
    # Each class's validation share is 0.15 up to the granularity of whole clusters.
    assert ((val_share - 0.15).abs() <= largest + 1e-9).all(), (val_share, largest)
    again = split_without_leakage(build_manifest(synth_root, progress=False), seed=0)
    assert list(again["split"]) == list(synth_split["split"])


def test_exact_and_near_duplicates_are_handled(tmp_path, synth_root):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    src = sorted((root / "Training" / "glioma").iterdir())[0]
    shutil.copy(src, root / "Training" / "glioma" / "exact_copy.jpg")
    # A re-encoding at another quality: a near duplicate with other bytes, placed in Testing.
    Image.open(src).save(root / "Testing" / "glioma" / "reencoded.jpg", quality=60)
    split = split_without_leakage(build_manifest(root, progress=False), seed=0).set_index("path")
    copy, reenc = str(root / "Training/glioma/exact_copy.jpg"), str(root / "Testing/glioma/reencoded.jpg")
    original = str(src)
    excluded = split.loc[[copy, original], "excluded_reason"].tolist()
    assert sum(r.startswith("exact duplicate of") for r in excluded) == 1
    assert split.loc[reenc, "split"] == "test" and split.loc[reenc, "near_dup_in_train"]
    assert split["near_dup_in_train"].sum() >= 1


def test_near_copies_of_given_test_images_train_never_validate(tmp_path, synth_root):
    """Validation chooses the epoch and fits the temperature: it must hold no near copy of a test image."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    copies = []
    for cls in ("glioma", "meningioma", "notumor", "pituitary"):
        for src in sorted((root / "Testing" / cls).iterdir())[:10]:  # every given test image of the fixture
            copies.append(root / "Training" / cls / f"near_{src.stem}.jpg")
            Image.open(src).save(copies[-1], quality=60)
    split = split_without_leakage(build_manifest(root, progress=False), seed=0).set_index("path")
    test_clusters = set(split.loc[split["split"] == "test", "cluster"])
    touching = split[split["cluster"].isin(test_clusters) & (split["split"] != "test")]
    assert len(touching) >= len(copies) and set(touching["split"]) == {"train"}
    assert split.loc[[str(c) for c in copies], "split"].eq("train").all()
    shares = split[split["split"].isin(["train", "val"])].groupby("label")["split"].apply(lambda s: (s == "val").mean())
    assert shares.between(0.10, 0.20).all(), shares  # the val share still counts the copies kept in train


@pytest.mark.parametrize("testing", ["Testing", "testing"])
def test_of_exact_copies_the_one_in_the_testing_folder_is_kept(tmp_path, synth_root, testing):
    """The dataset's own test set stays whole, however its folder's name sorts against Training's."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    if testing != "Testing":
        (root / "Testing").rename(root / testing)
    given = sorted((root / testing / "glioma").iterdir())[0]
    copy = root / "Training" / "glioma" / "copy_of_a_test_image.jpg"
    shutil.copy(given, copy)
    split = split_without_leakage(build_manifest(root, progress=False), seed=0).set_index("path")
    assert split.loc[str(given), "split"] == "test"
    assert split.loc[str(copy), "excluded_reason"] == f"exact duplicate of {given}"


def test_own_split_when_no_testing_folder(tmp_path, synth_root):
    flat = tmp_path / "flat"
    for d in (synth_root / "Training").iterdir():
        shutil.copytree(d, flat / d.name)
    split = split_without_leakage(build_manifest(flat, progress=False), val_fraction=0.2, test_fraction=0.2, seed=3)
    shares = split["split"].value_counts(normalize=True)
    assert set(split["split"]) == {"train", "val", "test"}
    assert 0.1 < shares["test"] < 0.3 and 0.1 < shares["val"] < 0.3
    assert not split["near_dup_in_train"].any()
    _assert_no_near_duplicate_across(split, [("train", "val"), ("train", "test"), ("val", "test")])
    assert list(split_without_leakage(build_manifest(flat, progress=False), val_fraction=0.2, test_fraction=0.2,
                                      seed=4)["split"]) != list(split["split"])


def test_near_duplicate_clusters_stay_in_one_split(tmp_path, synth_root):
    """Re-encodings and brightened copies of training images land in their original's split and cluster."""
    flat = tmp_path / "flat"
    for d in (synth_root / "Training").iterdir():
        shutil.copytree(d, flat / d.name)
    groups = []
    for cls in ("glioma", "notumor"):
        for src in sorted((flat / cls).iterdir())[:6]:
            img = Image.open(src).convert("L")
            img.save(flat / cls / f"{src.stem}_q60.jpg", quality=60)
            img.point(lambda v: min(255, int(v * 1.06))).save(flat / cls / f"{src.stem}_bright.png")
            groups.append([str(src), str(flat / cls / f"{src.stem}_q60.jpg"), str(flat / cls / f"{src.stem}_bright.png")])
    split = split_without_leakage(build_manifest(flat, progress=False), seed=0).set_index("path")
    assert set(split["split"]) == {"train", "val", "test"}
    for group in groups:
        assert split.loc[group, "cluster"].nunique() == 1, group
        assert split.loc[group, "split"].nunique() == 1, group
    assert len({split.loc[g[0], "cluster"] for g in groups}) == len(groups)  # one cluster per original, not one blob


def test_same_image_under_two_classes_is_excluded_as_a_label_conflict(tmp_path, synth_root):
    flat = tmp_path / "flat"
    for d in (synth_root / "Training").iterdir():
        shutil.copytree(d, flat / d.name)
    src = sorted((flat / "glioma").iterdir())[0]
    shutil.copy(src, flat / "notumor" / "mislabelled.jpg")
    split = split_without_leakage(build_manifest(flat, progress=False), seed=0).set_index("path")
    for path in (str(src), str(flat / "notumor" / "mislabelled.jpg")):
        assert split.loc[path, "split"] == "excluded"
        assert split.loc[path, "excluded_reason"] == "label conflict: the same image is filed as glioma and notumor"


def test_images_from_elsewhere_are_flagged_against_the_training_split(synth_split):
    test = synth_split[synth_split["split"] == "test"]
    flagged = flag_near_duplicates(test.drop(columns=["train_distance", "near_dup_in_train"]), synth_split, 40)
    assert list(flagged["train_distance"]) == list(test["train_distance"])
    assert list(flagged["near_dup_in_train"]) == list(test["near_dup_in_train"])
    train_copy = synth_split[synth_split["split"] == "train"].head(2)
    assert list(flag_near_duplicates(train_copy, synth_split, 40)["train_distance"]) == [0, 0]


def test_nothing_usable_to_split_is_an_error(tmp_path):
    for cls in ("glioma", "notumor"):
        (tmp_path / cls).mkdir()
    (tmp_path / "glioma" / "a.jpg").write_text("not an image")
    (tmp_path / "notumor" / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable image to split: 2 unreadable"):
        split_without_leakage(build_manifest(tmp_path, progress=False))


def test_a_class_with_no_usable_image_is_named(tmp_path, synth_root):
    flat = tmp_path / "flat"
    for cls in ("glioma", "notumor"):
        shutil.copytree(synth_root / "Training" / cls, flat / cls)
    (flat / "pituitary").mkdir()
    (flat / "pituitary" / "x.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="class 'pituitary' has no usable image: all 1 of its files are excluded "
                                         r"\(first: .*x.jpg: unreadable: not an image"):
        split_without_leakage(build_manifest(flat, progress=False))


def test_a_class_too_small_for_every_split_is_warned_about(tmp_path, synth_root, caplog):
    flat = tmp_path / "flat"
    shutil.copytree(synth_root / "Training" / "glioma", flat / "glioma")
    (flat / "notumor").mkdir()
    for src in sorted((synth_root / "Training" / "notumor").iterdir())[:2]:
        shutil.copy(src, flat / "notumor" / src.name)
    with caplog.at_level("WARNING", logger="btc.data.split"):
        split = split_without_leakage(build_manifest(flat, progress=False))
    missing = {s for s in ("train", "val", "test") if not ((split["label"] == "notumor") & (split["split"] == s)).any()}
    assert missing and caplog.messages == [
        f"class 'notumor' has no images in {s} (2 usable images in all): too few to split" for s in sorted(
            missing, key=["train", "val", "test"].index)]


def test_a_class_missing_from_the_given_testing_folder_is_warned_about_as_such(tmp_path, synth_root, caplog):
    data = shutil.copytree(synth_root, tmp_path / "data")
    shutil.rmtree(data / "Testing" / "glioma")
    with caplog.at_level("WARNING", logger="btc.data.split"):
        split_without_leakage(build_manifest(data, progress=False))
    assert caplog.messages == ["class 'glioma' has no images in test (the dataset's Testing folder has none)"]


def test_a_testing_folder_of_unreadable_files_alone_is_not_blamed_for_an_empty_test_class(tmp_path, synth_root, caplog):
    """Its only file unreadable, the Testing folder gives no test split: the test split is drawn from training."""
    data = tmp_path / "data"
    for label in ("glioma", "meningioma", "notumor"):
        shutil.copytree(synth_root / "Training" / label, data / "Training" / label)
    (data / "Training" / "pituitary").mkdir(parents=True)
    for src in sorted((synth_root / "Training" / "pituitary").iterdir())[:2]:
        shutil.copy(src, data / "Training" / "pituitary" / src.name)
    (data / "Testing" / "glioma").mkdir(parents=True)
    (data / "Testing" / "glioma" / "empty.jpg").write_bytes(b"")
    with caplog.at_level("WARNING", logger="btc.data.split"):
        split_without_leakage(build_manifest(data, progress=False))
    assert caplog.messages and all("too few to split" in m and "Testing folder" not in m for m in caplog.messages)
