"""The ``btc`` command line end to end on tiny generated data, and its error messages."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from btc.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_synth_manifest_split(tmp_path):
    res = invoke("data", "synth", "--out", tmp_path / "d", "--per-class", 6, "--seed", 2, "--size", 64)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "lesions.csv").is_file()
    res = invoke("data", "synth", "--out", tmp_path / "d", "--per-class", 5, "--seed", 2, "--size", 64)
    # 5 per class names the test image Te-*_0004 and leaves the 6-per-class run's Tr-*_0004 and Te-*_0005.
    assert res.exit_code == 0 and "8 other .jpg files were already under" in res.output
    res = invoke("data", "synth", "--out", tmp_path / "fresh", "--per-class", 6, "--seed", 2, "--size", 64)
    assert res.exit_code == 0 and "other .jpg" not in res.output
    res = invoke("data", "manifest", tmp_path / "fresh", "--out", tmp_path / "m.parquet")
    assert res.exit_code == 0 and "24 files (0 unreadable)" in res.output
    res = invoke("data", "split", tmp_path / "m.parquet", "--out", tmp_path / "s.parquet", "-s", "data.seed=3")
    assert res.exit_code == 0 and "total" in res.output and (tmp_path / "s.parquet").is_file()
    assert "seed: 3" in (tmp_path / "s.config.yaml").read_text()  # the config that made it, beside it


def test_bad_inputs_have_clear_messages(tmp_path):
    (tmp_path / "tumour_x").mkdir()
    (tmp_path / "tumour_x" / "a.jpg").write_bytes(b"x")
    res = invoke("data", "manifest", tmp_path)
    assert res.exit_code == 2 and "unknown class folder 'tumour_x'" in res.output
    res = invoke("data", "synth", "--out", tmp_path / "x", "--per-class", 0)
    assert res.exit_code == 2 and "per_class=0" in res.output
    res = invoke("data", "manifest", tmp_path, "--out", tmp_path)
    assert res.exit_code == 2 and f"output file {str(tmp_path)!r} is a folder" in res.output
    (tmp_path / "file").write_text("x")
    res = invoke("data", "synth", "--out", tmp_path / "file", "--per-class", 2)
    assert res.exit_code == 2 and f"output folder {str(tmp_path / 'file')!r} exists and is not a folder" in res.output
    res = invoke("data", "split", tmp_path, "--out", tmp_path / "file" / "s.parquet")
    assert res.exit_code == 2 and f"folder of the output file {str(tmp_path / 'file')!r} exists and is not a folder" in res.output
    res = invoke("train", tmp_path / "missing")
    assert res.exit_code == 2 and "does not exist" in res.output
    res = invoke("train", tmp_path, "-s", "train.epochs=zero")
    assert res.exit_code == 2 and "train.epochs" in res.output
    res = invoke("predict", tmp_path / "a.jpg", "--model", tmp_path / "nope.pt")
    assert res.exit_code == 2 and "does not exist" in res.output
    for command in (["data", "split"], ["train"]):
        res = invoke(*command, tmp_path / "missing.parquet")
        assert res.exit_code == 2 and "missing.parquet' does not exist" in res.output, command
    (tmp_path / "text.parquet").write_text("not parquet")
    res = invoke("train", tmp_path / "text.parquet")
    assert res.exit_code == 2 and "is not a readable Parquet file" in res.output
    import pandas as pd

    pd.DataFrame({"path": ["a.jpg"], "label": ["glioma"]}).to_parquet(tmp_path / "other.parquet")
    res = invoke("data", "split", tmp_path / "other.parquet")
    assert res.exit_code == 2 and "lacks the columns source_split, width" in res.output
    res = invoke("train", tmp_path, "--resume")
    assert res.exit_code == 2 and "pass --out RUN_DIR" in res.output
    res = invoke("train", tmp_path, "--resume", "--out", tmp_path / "no_run")
    assert res.exit_code == 2 and "no last.pt in" in res.output
    res = invoke("train", tmp_path, "--pretrained")
    assert res.exit_code == 2 and "compact_cnn has no pretrained weights" in res.output
    for setting in ("train.seed=-1", "data.seed=4294967296", "train.threads=30000", "eval.ece_bins=10000000",
                    "monitoring.drift_share_threshold=0", "registry.gates.min_tumour_recall={glioma: 5}",
                    "registry.gates.min_tumour_recall={tumour_x: 0.5}", "validation.min_side_px=5000"):
        res = invoke("train", tmp_path, "-s", setting)
        assert res.exit_code == 2 and f"invalid config: {setting.split('=')[0].rsplit('.', 1)[0]}" in res.output, setting


def test_train_evaluate_predict_explain(tmp_path, synth_root):
    run = tmp_path / "run"
    res = invoke("train", synth_root, "--out", run, "--epochs", 2, "-s", f"output_dir={tmp_path}",
                 "-s", "data.image_size=64", "-s", "model.width=8", "-s", "train.batch_size=16",
                 "-s", "eval.gradcam_per_class=1", "--no-track")
    assert res.exit_code == 0, res.output
    assert "model:" in res.output and (run / "evaluation" / "metrics.json").is_file()
    model = run / "model.pt"

    res = invoke("evaluate", "--model", model, "--json", tmp_path / "m.json", "--out", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev" / "config.yaml").is_file()
    res = invoke("train", synth_root, "--out", run, "--resume", "--epochs", 5, "--no-track")
    assert res.exit_code == 2 and "resume it with epochs=2, not 5" in res.output
    assert "epochs: 2" in (run / "config.yaml").read_text()  # the refused resume left the run as it was
    res = invoke("train", synth_root, "--out", run, "--resume", "--no-track", "-s", "train.batch_size=8")
    assert res.exit_code == 2 and "train.batch_size was 16, now 8" in res.output
    assert "batch_size: 16" in (run / "config.yaml").read_text()
    res = invoke("evaluate", "--model", model, "--json", tmp_path)
    assert res.exit_code == 2 and f"--json file {str(tmp_path)!r} is a folder" in res.output
    res = invoke("evaluate", "--model", model, "--out", tmp_path / "ev_z", "--json", tmp_path / "ev_z")
    assert res.exit_code == 2 and "is the evaluation folder (--out" in res.output
    assert not (tmp_path / "ev_z" / "metrics.json").exists()  # refused before any work
    res = invoke("evaluate", "--model", model, "--split", "tset")
    assert res.exit_code == 2 and "--split 'tset': expected one of test, val, train, all" in res.output
    res = invoke("evaluate", "--model", model, "--data", synth_root, "--split", "train")
    assert res.exit_code == 2 and "has no train/val split (a dataset folder or manifest)" in res.output
    res = invoke("data", "split", synth_root, "--out", tmp_path / "mysplit.pq")  # no .parquet suffix
    assert res.exit_code == 0, res.output
    res = invoke("evaluate", "--model", model, "--data", tmp_path / "mysplit.pq", "--split", "val",
                 "--out", tmp_path / "ev_pq", "--json", tmp_path / "pq.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "pq.json").read_text())["n_train_val_images"] > 0
    res = invoke("train", synth_root, "--out", model, "--no-track")
    assert res.exit_code == 2 and f"run folder {str(model)!r} exists and is not a folder" in res.output
    res = invoke("train", synth_root, "--out", run, "--resume", "--no-evaluate", "--no-track")
    assert res.exit_code == 0 and "best epoch" in res.output  # the run's own config: 2 epochs, 64 px, width 8
    assert "image_size: 64" in (tmp_path / "ev" / "config.yaml").read_text()  # evaluation used the run's config
    # A folder from elsewhere (as the held-out Kaggle Testing folder would be): one training image and one
    # test image per class; the copies of training images are flagged against the run's split and left out.
    import pandas as pd
    import shutil

    split = pd.read_parquet(run / "split.parquet")
    for cls in ("glioma", "meningioma", "notumor", "pituitary"):
        (tmp_path / "ext" / cls).mkdir(parents=True)
        for name in ("train", "test"):
            src = split.loc[(split["split"] == name) & (split["label"] == cls), "path"].iloc[0]
            shutil.copy(src, tmp_path / "ext" / cls / f"{name}.jpg")
    res = invoke("evaluate", "--model", model, "--data", tmp_path / "ext", "--json", tmp_path / "ext.json")
    assert res.exit_code == 0, res.output
    assert "4 of 8 images are within 40 bits of a training image" in res.output
    ext = json.loads((tmp_path / "ext.json").read_text())
    assert ext["n_images"] == 8 and ext["clean"]["n_images"] == 4 and ext["n_near_duplicates_of_train"] == 4
    # other data gets a folder of its own beside the model: the run's test evaluation stays as btc train wrote it
    assert json.loads((run / "evaluation-ext" / "metrics.json").read_text())["n_images"] == 8
    assert json.loads((run / "evaluation" / "metrics.json").read_text())["n_images"] != 8
    assert (tmp_path / "ev" / "gradcam_grid.png").is_file()
    res = invoke("evaluate", "--model", model, "--out", tmp_path / "ev", "-s", "eval.gradcam_per_class=0")
    assert res.exit_code == 0 and not (tmp_path / "ev" / "gradcam_grid.png").exists()  # no plot of the last one
    res = invoke("evaluate", "--model", model, "--data", tmp_path / "ext", "--against", tmp_path / "ext")
    assert res.exit_code == 2 and "not a split (no 'split' column)" in res.output
    res = invoke("evaluate", "--model", model, "--data", tmp_path / "missing.parquet")
    assert res.exit_code == 2 and "missing.parquet' does not exist" in res.output
    # A manifest whose image was replaced since: named, not evaluated with its old label.
    from btc.data.manifest import build_manifest, save_manifest

    save_manifest(build_manifest(tmp_path / "ext", progress=False), tmp_path / "ext.parquet")
    changed = tmp_path / "ext" / "glioma" / "test.jpg"
    shutil.copy(tmp_path / "ext" / "notumor" / "test.jpg", changed)
    res = invoke("evaluate", "--model", model, "--data", tmp_path / "ext.parquet", "--out", tmp_path / "ev2")
    assert res.exit_code == 2 and f"{changed}: changed since the manifest was built" in res.output, res.output
    assert "Traceback" not in res.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert {"accuracy", "macro_f1", "ece", "n_images", "per_class"} <= set(report)

    image = next((synth_root / "Testing" / "glioma").iterdir())
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    res = invoke("predict", image, bad, "--model", model, "--json")
    assert res.exit_code == 1
    line = json.loads(res.stdout.strip().splitlines()[0])
    assert line["label"] in ("glioma", "meningioma", "notumor", "pituitary")
    assert "bad.jpg: cannot use this image: not an image" in res.output

    res = invoke("explain", image, "--model", model, "--out", tmp_path / "ex")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ex" / f"{image.stem}_overlay.png").is_file()

    res = invoke("pointing-game", synth_root, "--model", model)
    assert res.exit_code == 0 and '"pointing_game"' in res.output


def test_train_refuses_a_used_run_folder_and_an_unusable_cache_and_keeps_weight_paths_whole(tmp_path, synth_root):
    tiny = ["--epochs", 1, "-s", "data.image_size=64", "-s", "model.width=8", "--no-track", "--no-evaluate"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"a half-trained run")
    res = invoke("train", synth_root, "--out", tmp_path / "run", *tiny)
    assert res.exit_code == 2 and "already holds a run (last.pt)" in res.output and "--resume" in res.output
    assert not (tmp_path / "run" / "config.yaml").exists()
    (tmp_path / "file").write_text("x")
    res = invoke("train", synth_root, "--out", tmp_path / "new", *tiny, "-s", f"data.cache_dir={tmp_path / 'file' / 'c'}")
    assert res.exit_code == 2 and f"cache folder (data.cache_dir) {str(tmp_path / 'file' / 'c')!r} cannot be made" in res.output
    for name in ("w #1.pt", "[init] w.pt", "no"):  # YAML would cut, refuse or turn these into something else
        res = invoke("train", synth_root, "--out", tmp_path / "new", *tiny, "--arch", "resnet18",
                     "--init-weights", tmp_path / name)
        assert res.exit_code == 2 and str(tmp_path / name) in res.output and "does not exist" in res.output, res.output


def test_a_mapping_for_a_whole_section_merges_into_it(tmp_path):
    from btc.config import load_config

    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.01\n  patience: 100\n")
    cfg = load_config(tmp_path / "c.yaml", ["train={epochs: 3}", "registry.gates={max_ece: 0.2}"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.patience) == (3, 0.01, 100)  # the file's settings stay
    assert cfg.registry.gates.max_ece == 0.2 and cfg.registry.gates.min_macro_f1 == 0.80
    floors = load_config(None, ["registry.gates.min_tumour_recall={glioma: 0.9}"]).registry.gates.min_tumour_recall
    assert floors == {"glioma": 0.9}  # a dict-valued setting is replaced whole, as written


@pytest.mark.parametrize("args", [["--help"], ["data", "--help"]])
def test_help(args):
    assert invoke(*args).exit_code == 0


def test_training_on_a_split_file_records_the_settings_that_made_it(tmp_path, synth_root):
    split = tmp_path / "s.parquet"
    res = invoke("data", "split", synth_root, "--out", split, "-s", "data.val_fraction=0.3", "-s", "data.seed=7")
    assert res.exit_code == 0, res.output
    tiny = ["--epochs", 1, "-s", "data.image_size=64", "-s", "model.width=8", "--no-track", "--no-evaluate"]
    res = invoke("train", split, "--out", tmp_path / "run", *tiny)
    assert res.exit_code == 0, res.output
    assert f"the split's own settings ({tmp_path / 's.config.yaml'}): data.val_fraction=0.3, data.seed=7" in res.output
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert "val_fraction: 0.3" in recorded and "  seed: 7" in recorded  # data.seed; train.seed stays 0
    res = invoke("train", split, "--out", tmp_path / "other", *tiny, "-s", "data.seed=3")
    assert res.exit_code == 2 and "s.parquet was made with data.seed=7" in res.output and "btc data split" in res.output
    assert not (tmp_path / "other" / "model.pt").exists()
    (tmp_path / "s.config.yaml").unlink()
    res = invoke("train", split, "--out", tmp_path / "bare", *tiny)
    assert res.exit_code == 0 and "warning: no config beside" in res.output, res.output


def test_serve_reads_the_model_and_workers_from_the_environment_as_documented(tmp_path, monkeypatch):
    """$BTC_MODEL_URI and $BTC_API_WORKERS stand in for --model and --workers (checked before any server starts)."""
    missing = tmp_path / "no" / "model.pt"
    monkeypatch.setenv("BTC_MODEL_URI", str(missing))
    res = runner.invoke(app, ["serve"])
    assert res.exit_code == 2 and f"model {str(missing)!r} is neither an existing model.pt" in res.output
    monkeypatch.setenv("BTC_API_WORKERS", "0")
    res = runner.invoke(app, ["serve"], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "Invalid value for '--workers' (env var: 'BTC_API_WORKERS')" in res.output


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_serve_refuses_a_port_outside_1_to_65535(port):
    res = runner.invoke(app, ["serve", "--model", "models:/btc-classifier@champion", "--port", port],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "Invalid value for '--port'" in res.output
