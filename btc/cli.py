"""The ``btc`` command line: a thin door onto the library (typer)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Brain tumour MRI classification: data, training, evaluation, explanation, prediction.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Demo data, manifests, leakage-free splits and validation.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# data validation (Great Expectations)
from btc.cli_validate import validate_command  # noqa: E402

data_app.command("validate")(validate_command)
# registry (MLflow)
from btc.cli_registry import check_tracking, registry_app, track_training_run  # noqa: E402
app.add_typer(registry_app, name="registry")
# monitoring (Evidently)
from btc.cli_monitor import monitor_command, reference_command, rotate_log_command  # noqa: E402

app.command("monitor")(monitor_command)
app.command("monitor-reference")(reference_command)
app.command("rotate-log")(rotate_log_command)
# serving (BentoML)
from btc.cli_serve import serve_command  # noqa: E402

app.command("serve")(serve_command)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. -s train.epochs=5 (repeatable)")]


from btc.cli_common import config_or_fail as _config  # noqa: E402
from btc.cli_common import fail, writable_file, writable_folder  # noqa: E402


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="folder to write the Kaggle-style dataset into")],
    per_class: Annotated[int, typer.Option(help="images per class")] = 60,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bytes)")] = 0,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 128,
):
    """Generate a synthetic MRI dataset (Training/ and Testing/ class folders, lesions.csv)."""
    from btc.data.synth import generate_synthetic_dataset

    writable_folder(out)
    try:
        root = generate_synthetic_dataset(out, per_class=per_class, seed=seed, size=size)
    except ValueError as err:
        raise fail(str(err)) from None
    typer.echo(f"wrote {per_class} images per class to {root} (lesion boxes: {root / 'lesions.csv'})")
    others = sum(1 for _ in root.rglob("*.jpg")) - per_class * 4
    if others > 0:
        typer.secho(f"{others} other .jpg files were already under {root} and are still there (not in lesions.csv); "
                    "write into an empty folder for a dataset of only these images", fg=typer.colors.YELLOW, err=True)


def _manifest_or_fail(data: Path):
    """The manifest of a dataset folder, or a manifest/split .parquet as it is; exit 2 with the reason."""
    from btc.data.discover import DatasetLayoutError
    from btc.data.manifest import build_manifest, load_manifest, unreadable

    try:
        manifest = load_manifest(data) if data.is_file() else build_manifest(data)  # a file: a manifest or split
    except (DatasetLayoutError, ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    bad = unreadable(manifest)
    for row in bad.itertuples():
        typer.secho(f"skipped unreadable file {row.path}: {row.error}", fg=typer.colors.YELLOW, err=True)
    return manifest


@data_app.command("manifest")
def data_manifest(
    data: Annotated[Path, typer.Argument(help="dataset folder (Kaggle layout or <class>/ folders)")],
    out: Annotated[Path, typer.Option(help="Parquet file to write")] = Path("manifest.parquet"),
):
    """Build the manifest: one row per image with size, mode, hashes and readability."""
    from btc.data.manifest import manifest_digest, save_manifest

    writable_file(out)
    manifest = _manifest_or_fail(data)
    save_manifest(manifest, out)
    typer.echo(f"{len(manifest)} files ({int((~manifest['readable']).sum())} unreadable), "
               f"digest {manifest_digest(manifest)} -> {out}")
    typer.echo(manifest.groupby(["source_split", "label"]).size().to_string())


@data_app.command("split")
def data_split(
    data: Annotated[Path, typer.Argument(help="dataset folder or a manifest .parquet")],
    out: Annotated[Path, typer.Option(help="Parquet file to write")] = Path("split.parquet"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Split without leakage: exact duplicates dropped, near-duplicate clusters kept in one split."""
    from btc.data.split import split_summary, split_without_leakage

    cfg = _config(config, set_)
    writable_file(out)
    manifest = _manifest_or_fail(data)
    d = cfg.data
    try:
        split = split_without_leakage(manifest, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                      near_duplicate_distance=d.near_duplicate_distance, seed=d.seed)
    except ValueError as err:
        raise fail(str(err)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    split.to_parquet(out, index=False)
    cfg.save(out.with_name(f"{out.stem}.config.yaml"))
    typer.echo(split_summary(split).to_string())
    typer.echo(f"test images with a near duplicate in train/val: {int(split['near_dup_in_train'].sum())} -> {out}")


def prepare_split(data: Path, cfg, overrides: list[str]):
    """Manifest + split (and the config) for a dataset folder or manifest .parquet; a split .parquet as it is."""
    from btc.data.split import split_without_leakage

    manifest = _manifest_or_fail(data)
    if "split" in manifest:
        return manifest, _with_split_settings(cfg, data, overrides)
    d = cfg.data
    try:
        return split_without_leakage(manifest, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                     near_duplicate_distance=d.near_duplicate_distance, seed=d.seed), cfg
    except ValueError as err:
        raise fail(str(err)) from None


SPLIT_SETTINGS = ("val_fraction", "test_fraction", "near_duplicate_distance", "seed")


def _with_split_settings(cfg, split_file: Path, overrides: list[str]):
    """``cfg`` with the ``data.*`` settings that made ``split_file`` (from the config saved beside it).

    A run records the settings of the split it trained on, not ones that could not change it.
    """
    made_with = split_file.with_name(f"{split_file.stem}.config.yaml")  # written by `btc data split`
    if not made_with.is_file():
        made_with = split_file.with_name("config.yaml")  # a run folder's split.parquet
    if not made_with.is_file():
        typer.echo(f"warning: no config beside {split_file}; the data.* split settings this run records are "
                   "the config's, which may not be those the split was made with", err=True)
        return cfg
    theirs = _config(made_with, []).data
    changes = {k: getattr(theirs, k) for k in SPLIT_SETTINGS if getattr(cfg.data, k) != getattr(theirs, k)}
    asked = [k for k in changes if any(o.split("=", 1)[0].strip() == f"data.{k}" for o in overrides)]
    if asked:
        made = ", ".join(f"data.{k}={changes[k]}" for k in asked)
        raise fail(f"{split_file} was made with {made} ({made_with}); a split file cannot be split again with "
                   f"other settings: run `btc data split` with them, or train on the dataset folder")
    if changes:
        typer.echo(f"the split's own settings ({made_with}): "
                   + ", ".join(f"data.{k}={v}" for k, v in changes.items()))
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=changes)})


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="dataset folder, or a split .parquet from `btc data split`")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder; default <output_dir>/<timestamp>")] = None,
    arch: Annotated[Optional[str], typer.Option(help="compact_cnn, plain_cnn, resnet18, resnet34, efficientnet_b0, mobilenet_v3_small")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="maximum epochs")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="torchvision ImageNet weights (internet)")] = False,
    init_weights: Annotated[Optional[Path], typer.Option(help="offline weights (state_dict .pt)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from <out>/last.pt, with <out>/config.yaml unless -c")] = False,
    evaluate: Annotated[bool, typer.Option(help="evaluate on the test split afterwards")] = True,
    track: Annotated[bool, typer.Option("--track/--no-track", help="log the run and model to MLflow")] = True,
):
    """Train a CNN on the train split, early-stopping on validation macro-F1."""
    from btc.training import cache_dir_of, check_new_run_folder, train_model

    overrides = list(set_ or [])
    overrides += [f"model.arch={arch}"] if arch else []
    overrides += [f"train.epochs={epochs}"] if epochs is not None else []
    overrides += ["model.pretrained=true"] if pretrained else []
    # quoted: a path is text, even one YAML would read otherwise ("w #1.pt", "[init] w.pt")
    overrides += [f"model.init_weights={json.dumps(str(init_weights))}"] if init_weights else []
    if resume and (out is None or not (out / "last.pt").is_file()):
        raise fail("--resume continues a run from its last.pt; pass --out RUN_DIR of that run" if out is None
                   else f"--resume: no last.pt in {str(out)!r} to continue from")
    cfg = _config(config, overrides, out / "config.yaml" if resume else None)
    run_dir = writable_folder(out or cfg.output_dir / time.strftime("%Y%m%d-%H%M%S"), "run folder")
    if not resume:
        try:
            check_new_run_folder(run_dir)
        except ValueError as err:
            raise fail(str(err)) from None
    writable_folder(cache_dir_of(cfg), "cache folder (data.cache_dir)")
    split, cfg = prepare_split(data, cfg, overrides)
    if track:
        check_tracking()  # fail before training, not after
    try:
        result = train_model(cfg, split, run_dir, resume=resume)
    except (ValueError, RuntimeError, OSError) as err:  # OSError: a disk that filled or a folder that went
        raise fail(str(err)) from None
    best = max(result.history, key=lambda h: h["val_macro_f1"])
    typer.echo(f"trained on {result.device} in {result.seconds:.0f}s; best epoch {best['epoch']} "
               f"val macro-F1 {best['val_macro_f1']:.4f}; temperature {result.temperature:.3f}")
    typer.echo(f"model: {result.model_path}")
    report = None
    if evaluate:
        report = _evaluate(str(result.model_path), run_dir / "split.parquet", "test", run_dir / "evaluation", None, cfg)
    if track:
        track_training_run(cfg, result, split, report, run_dir / "evaluation")


def _evaluate(model: str, data: Path | None, split: str | None, out_dir: Path, json_path: Path | None, cfg,
              against: Path | None = None) -> dict:
    from btc.data.images import ImageDecodeError
    from btc.evaluate import rows_to_evaluate, summary_lines, write_report
    from btc.predict import Predictor, is_mlflow_uri
    from btc.reports import evaluation_artifacts, load_history

    try:
        predictor = Predictor.load(model)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    writable_folder(out_dir, "evaluation folder")
    if json_path:
        writable_file(json_path, "--json file")
        if Path(out_dir).resolve().is_relative_to(Path(json_path).resolve()):
            raise fail(f"--json {str(json_path)!r} is the evaluation folder (--out {str(out_dir)!r}) or holds it; "
                       "give the JSON a file path of its own")
    if data is None and is_mlflow_uri(model):
        from btc.tracking.model_io import logged_split

        try:
            table = logged_split(model)  # the split the model's run logged
        except ValueError as err:
            raise fail(str(err)) from None
    else:
        if data is None:
            data = Path(model).parent / "split.parquet"
            if not data.is_file():
                raise fail("no --data given and no split.parquet beside the model; pass --data DIR")
        table = _manifest_or_fail(data)
    if split in ("train", "val") and "split" not in table:
        raise fail(f"--split {split}: {data} has no train/val split (a dataset folder or manifest); pass the split "
                   ".parquet the model was trained with (a run folder's split.parquet)")
    try:
        rows = rows_to_evaluate(table, split if "split" in table else ("test" if split else None))
    except ValueError as err:
        raise fail(str(err)) from None
    rows = _flag_against_training(rows, model, against, cfg.data.near_duplicate_distance)
    history = None if is_mlflow_uri(model) else load_history(Path(model))
    try:
        report = evaluation_artifacts(predictor, rows, out_dir, history=history, n_bins=cfg.eval.ece_bins,
                                      gradcam_per_class=cfg.eval.gradcam_per_class, progress=True)
    except ImageDecodeError as err:  # a file gone or changed since the manifest: named, nothing written
        raise fail(str(err)) from None
    cfg.save(out_dir / "config.yaml")
    if json_path:
        write_report(report, json_path)
    for line in summary_lines(report):
        typer.echo(line)
    typer.echo(f"report and plots: {out_dir}")
    return report


def _flag_against_training(rows, model: str, against: Path | None, max_distance: int):
    """Images without near-duplicate flags (a folder): flag them against the model's training split."""
    from btc.data.split import flag_near_duplicates
    from btc.predict import is_mlflow_uri

    if "near_dup_in_train" in rows:
        return rows
    beside = Path(model).parent / "split.parquet"
    if against is None and not is_mlflow_uri(model) and beside.is_file():
        against = beside
    if against is None:
        return rows
    try:
        rows = flag_near_duplicates(rows, _manifest_or_fail(against), max_distance)
    except ValueError as err:
        raise fail(f"{against}: {err}") from None
    typer.echo(f"{int(rows['near_dup_in_train'].sum())} of {len(rows)} images are within {max_distance} bits of a "
               f"training image of {against} (near duplicates; left out of the clean subset)")
    return rows


EVAL_SPLITS = ("test", "val", "train", "all")


def evaluation_folder_name(data: Path | None, split: str) -> str:
    """``evaluation`` for a run's own test split (as ``btc train`` wrote it), else a name of its own, so
    evaluating other data never replaces the run's test evaluation."""
    parts = ([data.stem or data.name] if data is not None else []) + ([split] if split != "test" else [])
    return "-".join(["evaluation", *parts])


@app.command()
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="model.pt path or MLflow URI (models:/name@champion)")],
    data: Annotated[Optional[Path], typer.Option(help="dataset folder, manifest or split .parquet; default the run's split")] = None,
    split: Annotated[str, typer.Option(help="which split of a split file to use: test, val, train or all (every "
                                            "readable image); a folder or manifest has only its test images")] = "test",
    out: Annotated[Optional[Path], typer.Option(
        help="folder for metrics.json and plots; default beside a model.pt: evaluation/ for its own test split (what "
             "btc train wrote), evaluation-<data>[-<split>]/ for other data or splits")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="also write the metrics JSON here")] = None,
    against: Annotated[Optional[Path], typer.Option(
        help="for a folder: flag near duplicates of the model's training images from this split .parquet "
             "(default: the split.parquet beside a model.pt)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Evaluate a model: accuracy, per-class P/R/F1, ROC-AUC, ECE before/after temperature, plots."""
    from btc.predict import is_mlflow_uri

    if split not in EVAL_SPLITS:
        raise fail(f"--split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    local = not is_mlflow_uri(model)
    cfg = _config(config, set_, Path(model).parent / "config.yaml" if local else None)
    out_dir = out or (Path(model).parent / evaluation_folder_name(data, split) if local else Path("evaluation"))
    _evaluate(model, data, None if split == "all" else split, out_dir, json_path, cfg, against)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files (JPEG, PNG, DICOM)")],
    model: Annotated[str, typer.Option("--model", "-m", help="model.pt path or MLflow URI")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
):
    """Print class probabilities for each image."""
    from btc.data.images import ImageDecodeError, read_image_file
    from btc.predict import Predictor

    try:
        predictor = Predictor.load(model)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    failed = 0
    for path in images:
        try:
            result = predictor.predict([read_image_file(path)])[0]
        except (ImageDecodeError, OSError) as err:
            typer.secho(f"{path}: cannot use this image: {err}", fg=typer.colors.RED, err=True)
            failed += 1
            continue
        if as_json:
            typer.echo(json.dumps({"path": str(path), **result}))
        else:
            probs = "  ".join(f"{c} {p:.3f}" for c, p in result["probabilities"].items())
            typer.echo(f"{path}: {result['label']} ({result['confidence']:.3f})  [{probs}]")
    if failed:
        raise typer.Exit(1)


@app.command()
def explain(
    image: Annotated[Path, typer.Argument(help="image file")],
    model: Annotated[str, typer.Option("--model", "-m", help="model.pt path or MLflow URI")],
    out: Annotated[Path, typer.Option(help="folder for <image name>_heatmap.png and <image name>_overlay.png")] = Path("explanation"),
):
    """LayerCAM heatmap (Grad-CAM family) and overlay PNG for one image."""
    import numpy as np
    from PIL import Image

    from btc.data.images import ImageDecodeError, read_image_file
    from btc.predict import Predictor

    try:
        predictor = Predictor.load(model)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    writable_folder(out)
    try:
        heat, over, result = predictor.explain(read_image_file(image))
    except (ValueError, ImageDecodeError, OSError) as err:
        raise fail(f"{image}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    stem = image.stem
    Image.fromarray((heat * 255).astype(np.uint8)).save(out / f"{stem}_heatmap.png")
    Image.fromarray(over).save(out / f"{stem}_overlay.png")
    typer.echo(f"{image}: {result['label']} ({result['confidence']:.3f}); overlay {out / f'{stem}_overlay.png'}")


@app.command("pointing-game")
def pointing_game_cmd(
    data: Annotated[Path, typer.Argument(help="synthetic dataset folder with lesions.csv")],
    model: Annotated[str, typer.Option("--model", "-m", help="model.pt path or MLflow URI")],
    under: Annotated[str | None, typer.Option(help="only images under this subfolder, e.g. Testing")] = None,
    method: Annotated[str, typer.Option(help="layercam or gradcam")] = "layercam",
    max_images: Annotated[int, typer.Option(min=1, help="at most this many images, spread over the classes")] = 400,
):
    """On synthetic data: how often the heatmap's peak falls inside the lesion's box (pointing game)."""
    from btc.explain_eval import pointing_game_on_folder

    try:
        result = pointing_game_on_folder(model, data, max_images=max_images, under=under, method=method)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    typer.echo(json.dumps(result, indent=2))


def main() -> None:  # pragma: no cover
    app()
