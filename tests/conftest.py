"""Shared fixtures: tiny generated data, a tiny trained model, and isolation from the user's stores."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from btc.config import load_config
from btc.data.manifest import build_manifest
from btc.data.split import split_without_leakage
from btc.data.synth import generate_synthetic_dataset


@pytest.fixture(autouse=True)
def prevent_leaking_rng():
    """Every test leaves Python's, NumPy's and torch's RNGs as it found them."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


@pytest.fixture(autouse=True)
def isolated_stores(tmp_path, monkeypatch):
    """No test writes to the user's MLflow store, BentoML home or Prefect home."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("BTC_HOME", str(tmp_path / "btc_home"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic Kaggle-layout dataset (Training/ + Testing/), shared read-only."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", per_class=40, seed=1, size=96)


@pytest.fixture(scope="session")
def synth_split(synth_root):
    return split_without_leakage(build_manifest(synth_root, progress=False), near_duplicate_distance=40, seed=0)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return load_config(None, [f"output_dir={out}", "data.image_size=64", "model.width=8", "train.epochs=3",
                              "train.batch_size=16", "train.lr=0.005", "train.patience=3", "eval.gradcam_per_class=2"])


@pytest.fixture(scope="session")
def trained_run(tiny_config, synth_split, tmp_path_factory):
    """A tiny model trained for a few epochs on the synthetic split (session-wide, ~20 s)."""
    from btc.training import train_model

    torch.manual_seed(0)
    return train_model(tiny_config, synth_split, tmp_path_factory.mktemp("run") / "run", progress=False)
