"""Predictor, evaluation report, plots and Grad-CAM on a tiny trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from btc.checkpoint import load_model
from btc.data.images import ImageDecodeError
from btc.evaluate import evaluate_predictor, rows_to_evaluate, summary_lines
from btc.explain import gradcam, overlay, pointing_game
from btc.explain_eval import pointing_game_on_folder
from btc.labels import CLASSES
from btc.predict import Predictor
from btc.reports import evaluation_artifacts


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.from_checkpoint(trained_run.model_path)


def test_checkpoint_loads_safely_and_rejects_other_files(trained_run, tmp_path):
    model, spec = load_model(trained_run.model_path)
    assert spec.classes == CLASSES and spec.image_size == 64 and not model.training
    torch.save({"some": "thing"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a btc model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_predict_proba_accepts_paths_bytes_arrays_and_pil(predictor, synth_split):
    path = synth_split.loc[synth_split["split"] == "test", "path"].iloc[0]
    gray = np.asarray(Image.open(path).convert("L"))
    inputs = [path, open(path, "rb").read(), gray, Image.open(path),
              gray[..., None], gray[None], gray.astype(np.float32) / 255, gray.astype(np.uint16) * 256,
              np.asarray(Image.open(path).convert("RGB"))]
    probs = predictor.predict_proba(inputs)
    assert probs.shape == (len(inputs), 4)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    # The same image in nine forms (file, bytes, arrays HxW, HxWx1, 1xHxW, float in [0, 1], uint16, RGB, PIL):
    # the same answer, up to the rounding of a stretched intensity range.
    assert np.abs(probs - probs[0]).max() < 0.02
    result = predictor.predict([path])[0]
    assert result["label"] in CLASSES and set(result["probabilities"]) == set(CLASSES)


@pytest.mark.parametrize(("array", "reason"), [
    (np.zeros((2, 3, 4, 5), dtype=np.uint8), r"shape \(2, 3, 4, 5\) is not an image"),
    (np.zeros((0, 8), dtype=np.uint8), r"shape \(0, 8\) is not an image"),
    (np.zeros((8, 8), dtype=bool), "type bool is not an image"),
    (np.zeros((8, 8, 3), dtype=bool), "type bool is not an image"),
    (np.full((8, 8), np.nan, dtype=np.float32), "NaN or infinite"),
])
def test_predict_proba_names_what_is_wrong_with_an_array(predictor, array, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        predictor.predict_proba([array])


def test_temperature_changes_confidence_not_ranking(predictor, synth_split):
    paths = list(synth_split.loc[synth_split["split"] == "test", "path"][:8])
    raw, cal = predictor.predict_proba(paths, calibrated=False), predictor.predict_proba(paths)
    assert (raw.argmax(1) == cal.argmax(1)).all()
    if abs(predictor.spec.temperature - 1) > 1e-3:
        assert not np.allclose(raw, cal)


def test_one_pass_probabilities_and_embeddings_equal_the_separate_calls(predictor, synth_split):
    paths = list(synth_split.loc[synth_split["split"] == "test", "path"][:5])
    probs, embeddings = predictor.proba_and_embed(paths, batch_size=2)  # batches of 2, 2 and 1
    np.testing.assert_allclose(probs, predictor.predict_proba(paths), atol=1e-5)
    np.testing.assert_allclose(embeddings, predictor.embed(paths), atol=1e-4)
    empty_probs, _ = predictor.proba_and_embed([])
    assert empty_probs.shape == (0, 4)


def test_evaluation_matches_sklearn_and_writes_plots(predictor, synth_split, tmp_path, trained_run):
    rows = rows_to_evaluate(synth_split, "test")
    report = evaluation_artifacts(predictor, rows, tmp_path, history=trained_run.history, gradcam_per_class=2)
    y = [CLASSES.index(p["label"]) for p in report["predictions"]]
    pred = [CLASSES.index(p["predicted"]) for p in report["predictions"]]
    assert report["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert report["n_images"] == len(rows)
    for key in ("accuracy", "macro_f1", "ece", "ece_before_temperature", "n_images", "per_class", "clean"):
        assert key in report
    for name in ("confusion_matrix", "roc", "reliability", "training_curves", "gradcam_grid"):
        png = report["artifacts"][name]
        assert Image.open(png).size[0] > 200, name
    assert json.loads((tmp_path / "metrics.json").read_text())["n_images"] == len(rows)


def test_clean_subset_excludes_near_duplicates(predictor, synth_split):
    rows = rows_to_evaluate(synth_split, "test").copy()
    rows.loc[rows.index[:3], "near_dup_in_train"] = True
    report = evaluate_predictor(predictor, rows)
    assert report["clean"]["n_images"] == report["n_images"] - 3
    assert report["n_near_duplicates_of_train"] == 3


def test_clean_subset_is_unknown_without_near_duplicate_flags(predictor, synth_split):
    rows = rows_to_evaluate(synth_split, "test").drop(columns=["near_dup_in_train", "train_distance"])
    report = evaluate_predictor(predictor, rows)
    assert report["clean"] is None and report["n_near_duplicates_of_train"] is None
    assert any(line.startswith("clean subset unknown") for line in summary_lines(report))


def test_an_empty_clean_subset_is_said(predictor, synth_split):
    rows = rows_to_evaluate(synth_split, "test").copy()
    rows["near_dup_in_train"] = True
    report = evaluate_predictor(predictor, rows)
    assert report["clean"] is None and report["n_near_duplicates_of_train"] == len(rows)
    assert f"clean subset empty: all {len(rows)} images are the model's training or validation images or near " \
        "duplicates of them" in "\n".join(summary_lines(report))


def test_train_and_val_images_of_a_split_are_never_clean(predictor, synth_split):
    everything = rows_to_evaluate(synth_split, None)
    report = evaluate_predictor(predictor, everything)
    n_test = int((everything["split"] == "test").sum())
    clean_test = int((~everything.loc[everything["split"] == "test", "near_dup_in_train"]).sum())
    assert report["clean"]["n_images"] == clean_test and report["n_train_val_images"] == len(everything) - n_test
    excluded = synth_split.copy()
    excluded.loc[excluded.index[:2], "split"] = "excluded"  # an exact copy or a label conflict: never evaluated
    assert len(rows_to_evaluate(excluded, None)) == len(rows_to_evaluate(synth_split, None)) - 2
    train = evaluate_predictor(predictor, rows_to_evaluate(synth_split, "train"))
    assert train["clean"] is None and "clean subset empty" in "\n".join(summary_lines(train))


def test_accuracy_by_distance_to_training(predictor, synth_split):
    rows = rows_to_evaluate(synth_split, "test").copy()
    rows["train_distance"] = [10, 45, 45, 60] * (len(rows) // 4) + [100] * (len(rows) % 4)
    report = evaluate_predictor(predictor, rows)
    bands = {b["bits"]: b for b in report["by_train_distance"]}
    assert sum(b["n_images"] for b in bands.values()) == len(rows)
    correct = np.array([p["predicted"] == p["label"] for p in report["predictions"]])
    for bits, (lo, hi) in zip(("0-40", "41-48", "57-64"), ((10, 10), (45, 45), (60, 60))):
        inside = rows["train_distance"].between(lo, hi).to_numpy()
        assert bands[bits]["n_images"] == inside.sum()
        assert bands[bits]["accuracy"] == pytest.approx(correct[inside].mean())
    assert "49-56" not in bands
    assert any(line.startswith("accuracy by bits to the nearest training image") for line in summary_lines(report))


def test_rows_to_evaluate_errors(synth_split):
    with pytest.raises(ValueError, match="no readable images"):
        rows_to_evaluate(synth_split, "nonexistent")
    bad = synth_split.copy()
    bad.loc[bad.index[0], "label"] = "tumour_x"
    with pytest.raises(ValueError, match="tumour_x"):
        rows_to_evaluate(bad, None)


def test_a_manifest_is_evaluated_on_its_test_images_whatever_the_split_asked(synth_split):
    """--split all on a dataset folder means its Testing images, never the Training ones a model learnt from."""
    manifest = synth_split.drop(columns=["split"])
    testing = manifest[manifest["readable"] & (manifest["source_split"] == "test")]
    for split in ("test", None):
        assert sorted(rows_to_evaluate(manifest, split)["path"]) == sorted(testing["path"])
    flat = manifest.assign(source_split="")  # a flat folder: nothing says which images are test ones
    assert len(rows_to_evaluate(flat, None)) == int(flat["readable"].sum())


def test_gradcam_shapes_and_overlay(predictor, synth_split):
    paths = list(synth_split.loc[synth_split["split"] == "test", "path"][:3])
    batch = torch.from_numpy(np.stack([predictor.to_array(p) for p in paths]))
    heat, pred = gradcam(predictor.model, batch)
    assert heat.shape == (3, 64, 64) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1 and pred.shape == (3,)
    over = overlay(batch[0].numpy(), heat[0])
    assert over.shape == (64, 64, 3) and over.dtype == np.uint8


def test_pointing_game_counts_hits():
    cams = np.zeros((2, 10, 10))
    cams[0, 2, 3] = 1  # peak at x=3, y=2
    cams[1, 9, 9] = 1
    assert pointing_game(cams, np.array([[2, 1, 5, 4], [0, 0, 3, 3]])) == 0.5
    assert pointing_game(cams[:1], np.array([[2, 1, 3, 4]])) == 0.0  # x1 is exclusive: column 3 lies outside


def test_pointing_game_on_synthetic_folder(predictor, synth_root):
    result = pointing_game_on_folder(predictor, synth_root)
    assert result["n_images"] == 3 * 40  # every tumour image of the fixture (40 per class) has a box
    assert set(result["per_class"]) == {"glioma", "meningioma", "pituitary"}
    assert 0 < result["chance"] < 0.2  # lesions are small against the whole slice
    assert result["pointing_game"] > result["chance"]
    occ = result["occlusion"]
    assert occ["accuracy_after"] < occ["accuracy_before"]  # painting the lesion out changes the answers
    few = pointing_game_on_folder(predictor, synth_root, max_images=30)
    assert few["n_images"] == 30 and set(few["per_class"]) == {"glioma", "meningioma", "pituitary"}
    four = pointing_game_on_folder(predictor, synth_root, max_images=4)  # 2, 1, 1: no class left out
    assert four["n_images"] == 4 and set(four["per_class"]) == {"glioma", "meningioma", "pituitary"}


def test_pointing_game_names_a_sidecar_or_image_it_cannot_use(predictor, tmp_path):
    from btc.data.images import ImageDecodeError

    (tmp_path / "lesions.csv").write_text("file,box\nTraining/glioma/a.jpg,1 2 3 4\n")
    with pytest.raises(ValueError, match="lesions.csv' lacks the columns path, label, x0, y0, x1, y1; expected"):
        pointing_game_on_folder(predictor, tmp_path)
    (tmp_path / "lesions.csv").write_text("path,label,x0,y0,x1,y1\nTraining/glioma/gone.jpg,glioma,1,2,3,4\n")
    with pytest.raises(ImageDecodeError, match=r"Training/glioma/gone.jpg' \(listed in lesions.csv\): cannot read file"):
        pointing_game_on_folder(predictor, tmp_path)


def test_training_curves_keep_every_point_in_view(tmp_path, monkeypatch):
    """A weak first epoch (macro-F1 0.10 under accuracy 0.25) is drawn, not cut off by the axis."""
    from btc import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    history = [{"epoch": 1, "train_loss": 1.4, "val_loss": 1.3, "train_accuracy": 0.3, "val_accuracy": 0.25,
                "val_macro_f1": 0.10},
               {"epoch": 2, "train_loss": 1.0, "val_loss": 1.1, "train_accuracy": 0.6, "val_accuracy": 0.55,
                "val_macro_f1": 0.50}]
    plots.training_curves_plot(history, tmp_path / "curves.png")
    low, high = figures[0].axes[1].get_ylim()
    assert low <= 0.10 and high == 1.0
