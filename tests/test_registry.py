"""Model registry on a real SQLite store: register, gates, promotion against the champion, rollback, errors, races.

Two runs are logged once per module into the embedded default store (``BTC_HOME`` in a
temporary folder, no ``MLFLOW_TRACKING_URI``: the path where MLflow's own global-URI lookups
would escape into the working directory, so the module checks that nothing does): the tiny
trained model from conftest, and a constant model (zeroed classifier: uniform
probabilities, always ``glioma``) whose macro-F1 on the balanced test split is exactly 0.1,
so it is the worse of the two by construction. Each test registers what it needs under its own
model name, so tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import shlex
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from btc.checkpoint import ModelSpec, save_model
from btc.cli import app
from btc.config import GatesConfig, load_config
from btc.data.cache import decode_all
from btc.evaluate import evaluate_predictor, rows_to_evaluate
from btc.predict import Predictor
from btc.tracking import registry, store
from btc.tracking.gates import evaluate_gates, flip_change_share, intensity_change_share, scale_brightness
from btc.reference import load_reference
from btc.tracking.registry import RegistryError, promote, register, registry_lock, rollback
from btc.tracking.run_logging import log_training_run
from btc.training import TrainResult

PERMISSIVE = ["registry.gates.min_macro_f1=0", "registry.gates.min_tumour_recall={}", "registry.gates.max_ece=1",
              "registry.gates.max_flip_change=1", "registry.gates.max_intensity_change=1",
              "registry.gates.min_margin_over_champion=0"]


def permissive(*extra: str):
    return load_config(None, PERMISSIVE + list(extra))


def constant_predictor(image_size: int = 64) -> Predictor:
    """Zeroed classifier: uniform probabilities, argmax always class 0 (glioma)."""
    spec = ModelSpec(width=8, image_size=image_size, temperature=1.0)
    model = spec.build()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return Predictor(model, spec)


def embedded_store(mp: pytest.MonkeyPatch, home: Path) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        mp.delenv(var, raising=False)
    mp.setenv("BTC_HOME", str(home))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_run, synth_split, tiny_config):
    """A SQLite store (via MLFLOW_TRACKING_URI) holding the trained run, the constant run and a run without a model."""
    root = tmp_path_factory.mktemp("registry")
    home = root / "btc_home"
    stray = [p for p in (Path("mlflow.db"), Path("mlruns"), Path(".btc")) if not p.exists()]
    with pytest.MonkeyPatch.context() as mp:
        embedded_store(mp, home)
        rows = rows_to_evaluate(synth_split, "test")
        good_report = evaluate_predictor(Predictor.from_checkpoint(trained_run.model_path), rows)
        good = log_training_run(tiny_config, trained_run, synth_split, good_report)

        constant = constant_predictor()
        out = root / "constant_run"
        path = save_model(out / "model.pt", constant.model, constant.spec)
        history = [{"epoch": 1, "train_loss": 1.386, "val_macro_f1": 0.1}]
        bad_report = evaluate_predictor(constant, rows)
        bad = log_training_run(tiny_config, TrainResult(out, path, history, 1.0, 0.0, "cpu"), synth_split, bad_report)

        client = store.client()
        bare = client.create_run(client.get_experiment_by_name("btc").experiment_id).info.run_id
        client.set_terminated(bare)
        split_file = root / "split.parquet"
        synth_split.to_parquet(split_file)
        yield SimpleNamespace(home=home, good=good, bad=bad, bare=bare, rows=rows, split_file=split_file,
                              good_f1=good_report["macro_f1"], bad_f1=bad_report["macro_f1"])
    assert not [str(p) for p in stray if p.exists()], "the registry wrote outside BTC_HOME (into the working directory)"


@pytest.fixture
def reg(runs, isolated_stores, monkeypatch):
    """Each test sees the module's store (conftest's autouse fixture points elsewhere)."""
    embedded_store(monkeypatch, runs.home)
    return runs


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def aliases(name: str) -> dict[str, str]:
    return {a: str(v) for a, v in store.client().get_registered_model(name).aliases.items()}


def version_tags(name: str, version: str) -> dict[str, str]:
    return store.client().get_model_version(name, version).tags


def test_constant_model_is_worse_by_construction(reg):
    assert reg.bad_f1 == pytest.approx(0.1)
    assert reg.good_f1 > reg.bad_f1 + 0.02, "the trained fixture model should beat a constant guess"


def test_register_adds_versions_and_moves_challenger(reg):
    assert register(reg.good, "reg") == "1"
    assert aliases("reg") == {"challenger": "1"}
    res = cli("registry", "register", reg.bad, "--name", "reg")
    assert res.exit_code == 0, res.output
    assert "reg v2; challenger -> v2" in res.output and aliases("reg") == {"challenger": "2"}
    versions = {v["version"]: v for v in registry.list_versions("reg")}
    assert versions["1"]["run_id"] == reg.good and versions["2"]["aliases"] == ["challenger"]
    assert versions["1"]["test_macro_f1"] == pytest.approx(reg.good_f1)


GOOD = {"macro_f1": 0.90, "ece": 0.05,
        "per_class": {c: {"recall": 0.85, "support": 8} for c in ("glioma", "meningioma", "notumor", "pituitary")}}


@pytest.mark.parametrize("change, failing", [
    (None, None),
    (lambda c, ch, m: c.update(macro_f1=0.79), "macro_f1"),
    (lambda c, ch, m: c["per_class"]["meningioma"].update(recall=0.70), "recall_meningioma"),
    (lambda c, ch, m: c["per_class"]["pituitary"].update(support=0), "recall_pituitary"),
    (lambda c, ch, m: ch.update(macro_f1=0.91), "beats_champion"),
    (lambda c, ch, m: c.update(ece=0.11), "ece"),
    (lambda c, ch, m: m.update(flip_change=0.2), "flip_change"),
    (lambda c, ch, m: m.update(intensity_change=0.15), "intensity_change"),
])
def test_each_gate_passes_within_and_fails_outside_its_threshold(change, failing):
    challenger = json.loads(json.dumps(GOOD))
    champion = {"macro_f1": 0.70}
    measured = {"flip_change": 0.05, "intensity_change": 0.0}
    if change:
        change(challenger, champion, measured)
    results = evaluate_gates(challenger, champion, measured, GatesConfig())
    assert [g.name for g in results] == ["macro_f1", "recall_glioma", "recall_meningioma", "recall_pituitary",
                                         "beats_champion", "ece", "flip_change", "intensity_change"]
    assert [g.name for g in results if not g.passed] == ([failing] if failing else [])


def test_margin_gate_uses_the_configured_margin_and_passes_without_champion():
    gates = GatesConfig(min_margin_over_champion=0.05)
    measured = {"flip_change": 0.0, "intensity_change": 0.0}
    (margin,) = [g for g in evaluate_gates(GOOD, {"macro_f1": 0.86}, measured, gates) if g.name == "beats_champion"]
    assert not margin.passed and margin.number == pytest.approx(0.04) and "0.9000 vs 0.8600" in margin.value
    (first,) = [g for g in evaluate_gates(GOOD, None, measured, gates) if g.name == "beats_champion"]
    assert first.passed and first.value == "no champion"


class LeftRight(nn.Module):
    """Reads which half of the slice is brighter: not flip-invariant by construction."""

    def forward(self, x):
        half = x.shape[-1] // 2
        d = x[..., :half].mean((1, 2, 3)) - x[..., half:].mean((1, 2, 3))
        return torch.stack([d, -d, torch.zeros_like(d), torch.zeros_like(d)], 1) * 100


class BrightnessReader(Predictor):
    """A model that sees absolute brightness, as one would if preprocessing lost its standardisation."""

    threshold = 0.0

    def logits_of_batch(self, batch):
        m = batch.float().mean((1, 2))
        return torch.stack([m - self.threshold, self.threshold - m, torch.zeros_like(m), torch.zeros_like(m)], 1)


def test_behavioural_measures(synth_split):
    images = decode_all(list(rows_to_evaluate(synth_split, "test")["path"]), 64, progress=False)
    constant = constant_predictor()
    assert flip_change_share(constant, images) == 0 and intensity_change_share(constant, images) == 0
    assert flip_change_share(Predictor(LeftRight(), constant.spec), images) > 0.5

    reader = BrightnessReader(constant.model, constant.spec)
    k = int(np.argmin(images.mean((1, 2))))
    reader.threshold = float((images[k].mean() + scale_brightness(images[k:k + 1], 1.05).mean()) / 2)
    assert intensity_change_share(reader, images) >= 1 / len(images)
    assert intensity_change_share(reader, images, shift=0.0) == 0
    assert scale_brightness(np.array([[[200, 250]]], np.uint8), 1.05).tolist() == [[[210, 255]]]


def test_promotion_against_champion_and_rollback(reg, tmp_path):
    name = "scenario"
    register(reg.bad, name)
    first = promote(name, permissive())
    assert first.promoted and aliases(name)["champion"] == "1"
    assert {g.name: g.value for g in first.gates}["beats_champion"] == "no champion"

    register(reg.good, name)  # v2: better than the champion
    second = promote(name, permissive())
    margin = {g.name: g for g in second.gates}["beats_champion"]
    assert second.promoted and margin.passed and margin.number == pytest.approx(reg.good_f1 - reg.bad_f1)
    assert aliases(name) == {"champion": "2", "challenger": "2"}
    tags = version_tags(name, "2")
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_before"] == "1"
    assert tags["gate.beats_champion"].endswith("pass") and "gate.flip_change" in tags

    register(reg.bad, name)  # v3: worse than the champion, judged on an explicit frozen set
    res = cli("registry", "promote", "--name", name, "--data", reg.split_file, *sum((["-s", s] for s in PERMISSIVE), []))
    assert res.exit_code == 1, res.output
    assert "gate" in res.output and "threshold" in res.output and "beats_champion" in res.output
    assert f"{reg.bad_f1:.4f} vs {reg.good_f1:.4f}" in res.output and "FAIL" in res.output
    assert f"--data {reg.split_file}: {len(reg.rows)} images" in res.output
    assert "REJECTED" in res.output and aliases(name)["champion"] == "2"
    assert version_tags(name, "3")["promotion.decision"] == "rejected"
    assert version_tags(name, "3")["gate.beats_champion"].endswith("fail")
    history = json.loads(store.client().get_registered_model(name).tags["champion_history"])
    assert history == ["1", "2"]

    res = cli("registry", "list", "--name", name)
    assert res.exit_code == 0 and "champion" in res.output and "rejected" in res.output
    assert f"{reg.good_f1:.4f}" in res.output

    # `btc evaluate` on the registry champion reports what the checkpoint it came from scores.
    res = cli("evaluate", "--model", f"models:/{name}@champion", "--data", reg.split_file,
              "--json", tmp_path / "m.json", "--out", tmp_path / "ev", "-s", "eval.gradcam_per_class=0")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "m.json").read_text())
    direct = evaluate_predictor(Predictor.from_checkpoint(reg_checkpoint(reg)), reg.rows)
    for key in ("n_images", "accuracy", "macro_f1", "ece"):
        assert report[key] == pytest.approx(direct[key])
    assert report["confusion_matrix"] == direct["confusion_matrix"]
    assert report["model"] == {"name": name, "version": "2"}
    # without --data: the test split that the champion's own run logged
    res = cli("evaluate", "--model", f"models:/{name}@champion", "--json", tmp_path / "own.json",
              "--out", tmp_path / "ev_own", "-s", "eval.gradcam_per_class=0")
    assert res.exit_code == 0, res.output
    run_id = store.client().get_model_version_by_alias(name, "champion").run_id
    assert json.loads((tmp_path / "own.json").read_text())["n_images"] == len(registry.frozen_eval_rows(store.client(), run_id)[0])

    settings = tmp_path / "monitoring.yaml"  # where this deployment's monitoring reads its reference
    settings.write_text(f"monitoring:\n  reference_dir: {tmp_path / 'reference'}\n")
    res = cli("registry", "rollback", "--name", name, "-c", settings, "-s", "monitoring.pca_components=2")
    assert res.exit_code == 0 and "champion v2 -> v1" in res.output
    assert aliases(name)["champion"] == "1"
    hint = shlex.split(res.output.split("or monitoring reports the mismatch: ")[1])
    assert hint[:2] == ["btc", "monitor-reference"] and hint[-4:] == ["-c", str(settings), "-s", "monitoring.pca_components=2"]
    res = cli(*hint[1:])  # exactly as printed: the reference lands where monitoring reads it
    assert res.exit_code == 0 and f"for {name} v1 ->" in res.output, res.output
    assert load_reference(tmp_path / "reference").metadata["model_version"] == "1"
    res = cli("registry", "rollback", "--name", name)
    assert res.exit_code == 2 and "no earlier one to roll back to" in res.output
    assert aliases(name)["champion"] == "1"


def test_a_rolled_back_challenger_is_not_promoted_again(reg):
    name = "undone"
    register(reg.bad, name)
    promote(name, permissive())
    register(reg.good, name)
    assert promote(name, permissive()).promoted
    rollback(name)  # v2 -> v1; challenger still points at v2
    res = cli("registry", "promote", "--name", name, *sum((["-s", s] for s in PERMISSIVE), []))
    assert res.exit_code == 2 and "challenger v2 was rolled back as champion" in res.output, res.output
    assert aliases(name)["champion"] == "1"
    register(reg.good, name)  # registering the run again asks for a new decision
    assert promote(name, permissive()).promoted and aliases(name)["champion"] == "3"


def test_promotion_refuses_a_challenger_registered_by_someone_else(reg):
    """The pipeline promotes the version it registered, never one another run registered meanwhile."""
    name = "overtaken"
    mine = register(reg.bad, name)
    theirs = register(reg.good, name)  # another run registered after this one, before its gates
    with pytest.raises(RegistryError, match=rf"challenger is v{theirs}, not v{mine}: another run was registered"):
        promote(name, permissive(), expected_challenger=mine)
    assert "champion" not in aliases(name) and "promotion.decision" not in version_tags(name, theirs)
    assert promote(name, permissive(), expected_challenger=theirs).promoted


def test_model_names_with_quotes(reg):
    register(reg.good, "it's")
    res = cli("registry", "list", "--name", "it's")
    assert res.exit_code == 0 and "challenger" in res.output, res.output
    with pytest.raises(RegistryError, match="holds both ' and \""):
        register(reg.good, "it's \"quoted\"")
    with pytest.raises(RegistryError, match="model name 'x@y' holds '@', which model URIs use for aliases"):
        register(reg.good, "x@y")


def reg_checkpoint(reg) -> Path:
    run = store.client().get_run(reg.good)
    return Path(run.data.tags["btc.run_dir"]) / "model.pt"


def test_strict_thresholds_reject_and_leave_no_champion(reg):
    name = "strict"
    register(reg.good, name)
    res = cli("registry", "promote", "--name", name, "-s", "registry.gates.min_macro_f1=1.0",
              "-s", "registry.gates.max_ece=0.0")
    assert res.exit_code == 1, res.output
    assert "REJECTED" in res.output and "macro_f1" in res.output and "ece" in res.output
    assert "champion" not in aliases(name)
    tags = version_tags(name, "1")
    assert tags["promotion.decision"] == "rejected" and tags["gate.macro_f1"].endswith("fail")
    assert "test split of the challenger's run" in tags["promotion.eval_set"]


def test_bad_inputs_have_clear_messages_and_change_nothing(reg):
    store.client().create_registered_model("empty")
    before = sorted(m.name for m in store.client().search_registered_models())

    res = cli("registry", "promote", "--name", "nope")
    assert res.exit_code == 2 and "unknown model name 'nope'" in res.output and "registered models:" in res.output
    for command in ("rollback", "list"):
        res = cli("registry", command, "--name", "nope")
        assert res.exit_code == 2 and "unknown model name 'nope'" in res.output
    res = cli("registry", "promote", "--name", "empty")
    assert res.exit_code == 2 and "has no 'challenger' alias" in res.output
    res = cli("registry", "rollback", "--name", "empty")
    assert res.exit_code == 2 and "has no champion" in res.output
    res = cli("registry", "register", reg.bare, "--name", "fresh")
    assert res.exit_code == 2 and f"run {reg.bare!r} has no logged model named 'model'" in res.output
    res = cli("registry", "register", "0" * 32, "--name", "fresh")
    assert res.exit_code == 2 and "does not exist" in res.output
    res = cli("registry", "promote", "--name", "empty", "--data", reg.split_file.parent / "missing.parquet")
    assert res.exit_code == 2 and "does not exist" in res.output
    res = cli("evaluate", "--model", "models:/nope@champion", "--data", reg.split_file)
    assert res.exit_code == 2 and "cannot load model 'models:/nope@champion'" in res.output
    for args in (("register", reg.bare), ("promote",), ("rollback",), ("list",)):  # not the default model
        res = cli("registry", *args, "--name", " ")
        assert res.exit_code == 2 and "--name is blank" in res.output, args

    assert sorted(m.name for m in store.client().search_registered_models()) == before
    assert store.client().get_registered_model("empty").aliases == {}


def test_unreachable_server_gives_clear_error(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    for args in (["register", "abc"], ["promote"], ["rollback"], ["list"]):
        res = cli("registry", *args)
        assert res.exit_code == 2, res.output
        assert f"cannot reach MLflow tracking server at http://127.0.0.1:{port}" in res.output


def test_concurrent_promotions_leave_exactly_one_valid_champion(reg):
    name = "race"
    register(reg.good, name)
    cfg, barrier, results, errors = permissive(), threading.Barrier(2), [], []

    def worker():
        barrier.wait()
        try:
            results.append(promote(name, cfg))
        except Exception as err:  # any error would be a failed promotion: collect it for the assertion
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(r.promoted for r in results) == [False, True]
    assert "already champion" in next(r for r in results if not r.promoted).reason
    assert aliases(name) == {"champion": "1", "challenger": "1"}
    assert json.loads(store.client().get_registered_model(name).tags["champion_history"]) == ["1"]


def test_promotion_waits_for_the_lock_and_times_out(reg):
    name = "locked"
    register(reg.good, name)
    with registry_lock(store.tracking_uri()):
        with pytest.raises(RegistryError, match="has held .* for over 0.3s; nothing changed"):
            promote(name, permissive(), lock_timeout=0.3)
        with pytest.raises(RegistryError, match="for over 0.3s"):
            rollback(name, lock_timeout=0.3)
    assert "champion" not in aliases(name)


def test_challenger_moved_during_evaluation_aborts_with_nothing_changed(reg, monkeypatch):
    # A concurrent `register` (which takes no lock) is simulated by registering for real
    # from inside the evaluation step, so the race happens at a known point.
    name = "moved"
    register(reg.good, name)
    real = registry.evaluate_predictor

    def evaluate_while_someone_registers(*args, **kwargs):
        if aliases(name)["challenger"] == "1":
            register(reg.bad, name)
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "evaluate_predictor", evaluate_while_someone_registers)
    with pytest.raises(RegistryError, match="challenger moved from 1 to 2 during evaluation; nothing changed"):
        promote(name, permissive())
    assert aliases(name) == {"challenger": "2"}
    assert "promotion.decision" not in version_tags(name, "1")


def test_a_retried_registration_reuses_the_version_its_first_try_added(reg, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = "retried"
    real, calls = MlflowClient.set_registered_model_alias, []

    def fail_once(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("database is locked")  # after create_model_version, before the alias
        return real(self, *args)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail_once)
    with pytest.raises(MlflowException, match="database is locked"):
        register(reg.good, name, reuse_undecided=True)
    assert register(reg.good, name, reuse_undecided=True) == "1"  # the pipeline's retry
    assert [str(mv.version) for mv in registry.versions_of(store.client(), name)] == ["1"]
    assert aliases(name) == {"challenger": "1"}
    promote(name, permissive())
    assert register(reg.good, name, reuse_undecided=True) == "2"  # judged already: a new decision, a new version
    assert register(reg.good, name) == "3"  # by hand: always a new version


@pytest.mark.parametrize("moved", ["all", "alias only", "nothing"])
def test_a_failure_while_moving_the_champion_leaves_a_true_record_and_a_retry_completes(reg, monkeypatch, moved):
    """What a Prefect retry meets: the store fails once, after the alias and history moved, between
    the two, or before either."""
    from mlflow.exceptions import MlflowException

    name = f"flaky-{moved.replace(' ', '-')}"
    register(reg.bad, name)
    assert promote(name, permissive()).promoted  # v1: champion, so v2 has one to follow in the history
    version = register(reg.good, name)
    real, calls = registry._move_champion, []

    def move_then_fail_once(client, model, challenger, champion):
        calls.append(1)
        if len(calls) == 1:
            if moved == "all":
                real(client, model, challenger, champion)
            elif moved == "alias only":
                client.set_registered_model_alias(model.name, "champion", challenger)
            raise MlflowException("database is locked")
        return real(client, model, challenger, champion)

    monkeypatch.setattr(registry, "_move_champion", move_then_fail_once)
    with pytest.raises(MlflowException, match="database is locked"):
        promote(name, permissive(), expected_challenger=version)
    decision = version_tags(name, version)["promotion.decision"]
    if moved == "nothing":
        assert aliases(name)["champion"] == "1"
        assert decision == "passed the gates, but moving champion failed (MlflowException)"
    else:
        assert aliases(name)["champion"] == version and decision == "promoted"
    again = promote(name, permissive(), expected_challenger=version)  # the flow's retry
    assert aliases(name)["champion"] == version and again.champion_after == version  # the flow serves champion_after
    assert again.promoted and again.champion_before == "1", again.reason
    assert version_tags(name, version)["promotion.decision"] == "promoted"
    history = json.loads(store.client().get_registered_model(name).tags["champion_history"])
    assert history == ["1", version]  # what rollback follows
    by_hand = promote(name, permissive())  # not the retry of anything: nothing to do
    assert not by_hand.promoted and "already champion" in by_hand.reason


def test_evaluation_images_the_challenger_trained_on_are_refused(reg, tmp_path):
    name = "overlap"
    register(reg.good, name)
    split = pd.read_parquet(reg.split_file)
    trained_on = split.index[split["split"] == "train"][:5]
    split.loc[trained_on, "split"] = "test"  # five training images passed off as a frozen evaluation set
    split.to_parquet(tmp_path / "leaky.parquet")
    res = cli("registry", "promote", "--name", name, "--data", tmp_path / "leaky.parquet",
              *sum((["-s", s] for s in PERMISSIVE), []))
    assert res.exit_code == 2, res.output
    assert f"5 of the {len(reg.rows) + 5} evaluation images were in the challenger's (v1) train/val split" in res.output
    assert "champion" not in aliases(name) and "promotion.decision" not in version_tags(name, "1")

    # Without the challenger's logged split nothing tells its training images apart: refused, not waved through.
    logged = next(reg.home.rglob(f"{reg.good}/artifacts/data/split.parquet"))
    hidden = logged.rename(tmp_path / "hidden.parquet")
    try:
        res = cli("registry", "promote", "--name", name, "--data", tmp_path / "leaky.parquet",
                  *sum((["-s", s] for s in PERMISSIVE), []))
    finally:
        hidden.rename(logged)
    assert res.exit_code == 2 and f"cannot read the split the challenger's (v1) run {reg.good} logged" in res.output
    assert "champion" not in aliases(name) and "promotion.decision" not in version_tags(name, "1")


def test_a_later_decision_leaves_no_gate_of_an_earlier_one(reg):
    name = "regated"
    register(reg.bad, name)  # always answers glioma: the default recall floors fail
    first = promote(name, load_config(None, []))
    assert not first.promoted and version_tags(name, "1")["gate.recall_meningioma"].endswith("fail")
    assert promote(name, permissive()).promoted  # no recall floors this time
    tags = version_tags(name, "1")
    assert tags["promotion.decision"] == "promoted" and not [k for k in tags if k.startswith("gate.recall")]
    assert all(v.endswith("pass") for k, v in tags.items() if k.startswith("gate."))


def test_list_survives_a_purged_run_and_says_what_was_rolled_back(reg, tmp_path):
    import subprocess
    import sys

    client = store.client()
    name = "purged"
    register(reg.bad, name)
    promote(name, permissive())
    register(reg.good, name)
    promote(name, permissive())
    rollback(name)
    decisions = {r["version"]: r["decision"] for r in registry.list_versions(name)}
    assert decisions["1"] == "promoted" and decisions["2"].startswith("rolled back 20"), decisions
    gone = client.create_run(client.get_experiment_by_name("btc").experiment_id).info.run_id
    client.create_model_version(name, source=str(tmp_path), run_id=gone)
    client.delete_run(gone)
    gc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "gc", "--backend-store-uri", store.tracking_uri(), "--tracking-uri", store.tracking_uri(),
                         "--run-ids", gone], capture_output=True, text=True, timeout=300)
    assert gc.returncode == 0, gc.stderr[-3000:]
    rows = {r["version"]: r for r in registry.list_versions(name)}
    assert sorted(rows) == ["1", "2", "3"] and rows["3"]["test_macro_f1"] is None
    assert rows["2"]["test_macro_f1"] == pytest.approx(reg.good_f1)


def test_reading_a_store_that_does_not_exist_creates_nothing(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for args in (("list",), ("promote",), ("rollback",)):
        res = cli("registry", *args, "--name", "btc-classifier")
        assert res.exit_code == 2 and f"no MLflow store at {uri}" in res.output, res.output
    res = cli("evaluate", "--model", "models:/btc-classifier@champion")
    assert res.exit_code == 2 and "no MLflow store at" in res.output, res.output
    assert not (tmp_path / "typo").exists()


def test_rollback_skips_a_deleted_champion_and_says_so(reg):
    name = "deleted"
    register(reg.bad, name)
    assert promote(name, permissive()).promoted
    register(reg.good, name)
    assert promote(name, permissive()).promoted
    store.client().delete_model_version(name, "1")
    res = cli("registry", "rollback", "--name", name)
    assert res.exit_code == 2, res.output
    assert "v2 is the first champion (earlier champions v1 were deleted)" in res.output
    assert aliases(name)["champion"] == "2"
