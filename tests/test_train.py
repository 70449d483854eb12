"""Training: models' shapes, loss falls, repeatable on CPU, resume, augmentation, GPU smoke."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from btc.checkpoint import load_model
from btc.config import load_config
from btc.data.loaders import ArrayBatches
from btc.models import ARCHS, build_model
from btc.train import fit, predict_logits, resolve_device, train_one_epoch
from btc.training import lr_schedule, min_epochs_of, train_model
from btc.transforms import Augment, preprocess, train_transform


@pytest.mark.parametrize("arch", ARCHS)
def test_models_forward_one_channel_and_explain(arch):
    from btc.explain import gradcam

    model = build_model(arch, width=8)
    # building (which finds the explanation blocks) must not have moved batch-norm statistics
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    assert torch.allclose(model.head(model.features(x)), out) and model.features(x).ndim == 2
    heat, pred = gradcam(model, torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8))
    assert heat.shape == (2, 64, 64) and np.isfinite(heat).all() and pred.shape == (2,)


def test_torchvision_model_files_from_before_layercam_still_load():
    """Up to e6b6a26 the explanation block was registered twice, as backbone.layer4 and as cam."""
    model = build_model("resnet18")
    state = model.state_dict()
    old = {**state, **{f"cam.{k[len('backbone.layer4.'):]}": v for k, v in state.items() if k.startswith("backbone.layer4.")}}
    assert len(old) > len(state)
    build_model("resnet18").load_state_dict(old)  # strict: no unexpected keys left


def test_compact_cnn_depth_adds_blocks_and_survives_save_and_load(tmp_path):
    from btc.checkpoint import ModelSpec, load_model, save_model

    shallow, deep = build_model(width=8), build_model(width=8, depth=2)
    assert (len(shallow.stages), len(deep.stages)) == (4, 8)
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in shallow.parameters())
    deep.eval()
    save_model(tmp_path / "model.pt", deep, ModelSpec(width=8, depth=2))
    loaded, spec = load_model(tmp_path / "model.pt")
    x = torch.randn(3, 1, 64, 64)
    assert spec.depth == 2 and torch.allclose(loaded(x), deep(x))


def test_strided_pointwise_conv_equals_a_strided_1x1_convolution():
    from btc.models import StridedPointwiseConv

    ours = StridedPointwiseConv(8, 16, 2)
    plain = nn.Conv2d(8, 16, 1, 2, bias=False)
    plain.load_state_dict(ours.state_dict())  # same parameters, same keys as before
    for side in (32, 33):
        x = torch.randn(3, 8, side, side)
        assert torch.allclose(ours(x), plain(x), atol=1e-6)


ODD_BATCH_STEPS = """
import torch
from btc.models import build_model
model = build_model(width=8).to(memory_format=torch.channels_last)
for batch in (7, 5, 3, 1):
    x = torch.randn(batch, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    model.eval() if batch == 1 else model.train()  # batch norm cannot train on one image
    model(x).square().mean().backward()
print("ok")
"""


def test_narrow_compact_cnn_trains_on_odd_batches_in_channels_last():
    """torch's strided 1x1 weight gradient aborted the process here (heap corruption); in a
    subprocess so that a crash fails this test instead of killing the suite."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ODD_BATCH_STEPS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_threads_beyond_the_cores_are_capped(caplog):
    import os

    from btc.training import cpu_threads

    cores = os.cpu_count()
    assert cpu_threads(1) == 1
    assert cpu_threads(cores + 5) == cores and f"train.threads={cores + 5} but this machine has {cores}" in caplog.text


def test_a_single_training_image_is_refused_by_name(synth_split, tiny_config):
    from btc.training import split_arrays

    one = synth_split[synth_split["split"] == "train"].head(1)
    with pytest.raises(ValueError, match="the split has 1 'train' image; training needs at least 2"):
        split_arrays(one, "train", tiny_config, tiny_config.output_dir / "cache", progress=False)


def test_unknown_arch_and_missing_weights():
    with pytest.raises(ValueError, match="unknown architecture 'vgg99'; expected one of compact_cnn"):
        build_model("vgg99")
    with pytest.raises(FileNotFoundError, match="--init-weights file"):
        build_model("resnet18", init_weights="/nonexistent.pt")


def test_init_weights_from_rgb_state_dict(tmp_path):
    import torchvision

    rgb = torchvision.models.resnet18(weights=None)
    torch.save(rgb.state_dict(), tmp_path / "r18.pt")
    model = build_model("resnet18", init_weights=tmp_path / "r18.pt")
    assert torch.allclose(model.backbone.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))


def test_preprocess_and_augment_share_the_fixed_part():
    x = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)
    identity = Augment(rotation_degrees=0, scale_jitter=0, hflip=False, intensity_jitter=0, gamma_jitter=0, translate=0)
    ev = preprocess(x)
    assert ev.shape == (4, 1, 32, 32)
    assert torch.allclose(ev.mean((1, 2, 3)), torch.zeros(4), atol=1e-5)
    # With the random part switched off (and an identity warp), training input == evaluation input.
    assert torch.allclose(train_transform(x, identity), ev, atol=0.05)
    assert not torch.allclose(train_transform(x, Augment()), ev, atol=0.05)
    # every random part can be switched off from the config, the shift included
    from btc.config import load_config
    from btc.training import augment_from

    off = load_config(None, ["train.rotation_degrees=0", "train.scale_jitter=0", "train.hflip=false",
                             "train.intensity_jitter=0", "train.gamma_jitter=0", "train.translate=0"])
    assert augment_from(off) == identity


def _toy_batches(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, (n, 32, 32)).astype(np.uint8)
    for i, c in enumerate(y):  # a bright square whose position is the class
        r, col = divmod(int(c), 2)
        x[i, 4 + r * 14: 14 + r * 14, 4 + col * 14: 14 + col * 14] = 220
    return x, y


def test_loss_falls_over_two_epochs(tmp_path):
    torch.manual_seed(0)
    x, y = _toy_batches()
    model = build_model(width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    batches = ArrayBatches(x, y, 16, shuffle=True)
    aug = Augment(rotation_degrees=0, hflip=False)
    kw = dict(loss_fn=nn.CrossEntropyLoss(), augment=aug, progress=False)
    first = train_one_epoch(model, batches, opt, torch.device("cpu"), **kw)
    for _ in range(3):
        last = train_one_epoch(model, batches, opt, torch.device("cpu"), **kw)
    assert last["loss"] < first["loss"] * 0.8
    assert np.isfinite(last["loss"]) and last["images_per_s"] > 0


def _fit(tmp_path, epochs, resume=False, seed=0):
    torch.manual_seed(seed)
    x, y = _toy_batches()
    model = build_model(width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return fit(model, ArrayBatches(x, y, 16, shuffle=True, seed=seed), ArrayBatches(x[:32], y[:32], 32), opt,
               torch.device("cpu"), epochs=epochs, loss_fn=nn.CrossEntropyLoss(), augment=Augment(),
               checkpoint_dir=tmp_path, patience=10, resume=resume, progress=False), model


@pytest.mark.parametrize("amp", [True, False])
def test_amp_setting_reaches_validation_as_well_as_training(tmp_path, monkeypatch, amp):
    """train.amp=false must keep validation (early stopping) in float32 too, not only the training steps."""
    import btc.train as train_module

    asked, autocast = [], train_module._autocast
    monkeypatch.setattr(train_module, "_autocast", lambda device, amp=True: asked.append(amp) or autocast(device, amp))
    x, y = _toy_batches()
    model = build_model(width=8)
    fit(model, ArrayBatches(x, y, 16), ArrayBatches(x[:32], y[:32], 32), torch.optim.AdamW(model.parameters()),
        torch.device("cpu"), epochs=1, loss_fn=nn.CrossEntropyLoss(), augment=Augment(), checkpoint_dir=tmp_path,
        progress=False, amp=amp)
    assert len(asked) == len(x) // 16 + 1 and set(asked) == {amp}  # every training step and the validation batch


def test_cpu_training_is_repeatable(tmp_path):
    h1, _ = _fit(tmp_path / "a", 2)
    h2, _ = _fit(tmp_path / "b", 2)
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]


def test_resume_continues_from_last_checkpoint(tmp_path):
    """Two epochs, stop, resume to four: the same losses and weights as four epochs unbroken."""
    h1, _ = _fit(tmp_path / "broken", 2)
    h2, resumed = _fit(tmp_path / "broken", 4, resume=True)
    unbroken, model = _fit(tmp_path / "unbroken", 4)
    assert [r["epoch"] for r in h2] == [1, 2, 3, 4]
    assert h2[:2] == h1
    assert [r["train_loss"] for r in h2] == [r["train_loss"] for r in unbroken]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))
    assert (tmp_path / "broken" / "best.pt").is_file()


def test_resume_with_other_epochs_is_refused(tmp_path):
    x, y = _toy_batches()

    def run(epochs, resume):
        model, batches = build_model(width=8), ArrayBatches(x, y, 16, shuffle=True)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=epochs * len(batches))
        return fit(model, batches, ArrayBatches(x, y, 32), opt,
                   torch.device("cpu"), epochs=epochs, loss_fn=nn.CrossEntropyLoss(), augment=Augment(),
                   checkpoint_dir=tmp_path, scheduler=sched, resume=resume, progress=False)

    run(2, False)
    with pytest.raises(ValueError, match="run of 2 epochs.*resume it with epochs=2, not 3"):
        run(3, True)


@pytest.mark.parametrize(("min_epochs", "epochs_run"), [(0, 3), (6, 6)])
def test_early_stopping_stops(tmp_path, min_epochs, epochs_run):
    """Patience 2 stops after epoch 3, unless min_epochs holds it (as while the one-cycle rate is high)."""
    torch.manual_seed(0)
    x, y = _toy_batches()
    model = build_model(width=8)
    for m in model.modules():  # frozen BN statistics + zero learning rate: validation never improves
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    h = fit(model, ArrayBatches(x, y, 16), ArrayBatches(x, y, 32), opt, torch.device("cpu"), epochs=10,
            loss_fn=nn.CrossEntropyLoss(), augment=Augment(), checkpoint_dir=tmp_path, patience=2,
            min_epochs=min_epochs, progress=False)
    assert len(h) == epochs_run


def test_min_epochs_defaults_to_half_the_schedule():
    assert min_epochs_of(load_config(overrides=["train.epochs=30"])) == 15
    assert min_epochs_of(load_config(overrides=["train.epochs=30", "train.min_epochs=3"])) == 3


@pytest.mark.parametrize("total_steps", range(1, 13))
def test_lr_schedule_runs_any_number_of_steps(total_steps):
    """OneCycleLR alone divides by zero at 5 steps (a 1-epoch run of 5 batches); the schedule must not."""
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=0.01)
    schedule = lr_schedule(opt, 0.01, total_steps)
    rates = []
    for _ in range(total_steps):  # as fit does: one optimizer step at the current rate, then the schedule's
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert all(np.isfinite(r) and 0 < r <= 0.01 + 1e-12 for r in rates)
    if total_steps >= 4:  # warms up, then anneals to well below the peak
        assert max(rates) > 0.9 * 0.01 and rates[-1] < 0.01 * 0.01


def test_train_model_writes_artifacts(trained_run):
    out = trained_run.out_dir
    for name in ("model.pt", "config.yaml", "history.json", "split.parquet", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert 0.05 < trained_run.temperature < 20


def test_balanced_sampler_draws_classes_evenly():
    y = np.array([0] * 90 + [1] * 10)
    w = 1 / np.bincount(y)
    batches = ArrayBatches(np.zeros((100, 4, 4), np.uint8), y, 100, sample_weights=w[y], seed=0)
    drawn = np.concatenate([b[1].numpy() for b in batches])
    assert 0.35 < (drawn == 1).mean() < 0.65


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(RuntimeError, match="MPS is not available"):
            resolve_device("mps")


@pytest.mark.parametrize("arch", ["compact_cnn", "plain_cnn"])
def test_pretrained_is_refused_for_models_without_weights(arch):
    with pytest.raises(ValueError, match=f"{arch} has no pretrained weights.*resnet18.*--init-weights"):
        build_model(arch, pretrained=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mixed_precision_smoke(tmp_path):
    x, y = _toy_batches()
    model = build_model(width=16)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    h = fit(model, ArrayBatches(x, y, 16, shuffle=True), ArrayBatches(x, y, 32), opt, torch.device("cuda"),
            epochs=2, loss_fn=nn.CrossEntropyLoss(weight=torch.ones(4, device="cuda")),  # class-weighted, as by default
            augment=Augment(), checkpoint_dir=tmp_path, progress=False)
    assert np.isfinite(h[-1]["train_loss"]) and np.isfinite(h[-1]["val_loss"])
    logits, _ = predict_logits(model, ArrayBatches(x, y, 32), torch.device("cuda"))
    assert logits.shape == (len(y), 4)


def test_an_interrupted_run_resumed_by_train_model_equals_an_unbroken_one(trained_run, tiny_config, synth_split,
                                                                          tmp_path, monkeypatch):
    """The real path: one-cycle schedule, class weights, the decoded cache; stopped inside epoch 3 of 3."""
    import btc.train as train_module
    from btc.training import train_model

    real_epoch, calls = train_module.train_one_epoch, []

    def crash_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_model(tiny_config, synth_split, tmp_path / "run", progress=False)
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    resumed = train_model(tiny_config, synth_split, tmp_path / "run", resume=True, progress=False)
    drop = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in trained_run.history]
    ours, theirs = load_model(resumed.model_path)[0].state_dict(), load_model(trained_run.model_path)[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert resumed.temperature == trained_run.temperature


def test_resume_refuses_other_settings_and_keeps_the_run_as_it_was(trained_run, tiny_config, synth_split, tmp_path):
    from btc.training import train_model

    run = tmp_path / "run"
    shutil.copytree(trained_run.out_dir, run)
    saved = (run / "config.yaml").read_text()
    changed = tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"width": 16})})
    with pytest.raises(ValueError, match="model.width was 8, now 16. Resume with the run's own settings"):
        train_model(changed, synth_split, run, resume=True, progress=False)
    assert (run / "config.yaml").read_text() == saved
    fewer = synth_split.drop(synth_split.index[synth_split["split"] == "train"][:3])
    with pytest.raises(ValueError, match="cannot resume .* on other data: 3 of its train/val images are not in this"):
        train_model(tiny_config, fewer, run, resume=True, progress=False)
    (run / "last.pt").write_text("garbage")
    with pytest.raises(ValueError, match=f"cannot resume from {str(run / 'last.pt')!r}: not a readable checkpoint"):
        train_model(tiny_config, synth_split, run, resume=True, progress=False)


def test_a_run_that_is_refused_leaves_the_run_in_its_folder_as_it_was(trained_run, tiny_config, synth_split,
                                                                       tmp_path):
    """A new run into a folder holding a run, or one whose cache folder cannot be made, writes nothing."""
    from btc.training import train_model

    run = tmp_path / "run"
    shutil.copytree(trained_run.out_dir, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    other = tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"width": 16})})
    with pytest.raises(ValueError, match=f"{run} already holds a run \\(last.pt, model.pt\\); a new run would "
                                         "overwrite it. Train into a new folder, or continue that run with resume"):
        train_model(other, synth_split, run, progress=False)
    (tmp_path / "file").write_text("x")
    blocked = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(
        update={"cache_dir": tmp_path / "file" / "cache"})})
    with pytest.raises(ValueError, match=f"cannot use {tmp_path / 'file' / 'cache'} as the cache folder"):
        train_model(blocked, synth_split, run, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    (run / "last.pt").unlink()
    (run / "model.pt").unlink()  # no run left: a new one may use the folder
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="cannot use .* as the cache folder"):
        train_model(blocked, synth_split, fresh, progress=False)
    with pytest.raises(ValueError, match="the split has no 'val' images"):
        train_model(tiny_config, synth_split[synth_split["split"] != "val"], fresh, progress=False)
    assert not fresh.exists()


def test_a_diverging_run_stops_with_a_clear_error(tmp_path):
    x, y = _toy_batches()
    model = build_model(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=1e12)
    with pytest.raises(ValueError, match=r"training diverged in epoch 1 .*train again into a new folder \(--out NEW\) "
                                         r"with a lower learning rate \(train.lr\) or weight decay") as stopped:
        fit(model, ArrayBatches(x, y, 16, shuffle=True), ArrayBatches(x, y, 32), opt, torch.device("cpu"), epochs=3,
            loss_fn=nn.CrossEntropyLoss(), augment=Augment(), checkpoint_dir=tmp_path, progress=False)
    assert "last.pt" not in str(stopped.value)  # resuming would repeat the same settings, and diverge again


def test_history_records_the_learning_rate_each_epoch_ended_with(tmp_path):
    x, y = _toy_batches(n=32)
    model = build_model(width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = fit(model, ArrayBatches(x, y, 16, shuffle=True, drop_last=True), ArrayBatches(x, y, 32), opt,
                  torch.device("cpu"), epochs=2, loss_fn=nn.CrossEntropyLoss(), augment=Augment(),
                  checkpoint_dir=tmp_path, scheduler=lr_schedule(opt, 3e-3, 4), progress=False)
    assert history[0]["lr"] == pytest.approx(3e-3)  # the peak of the one-cycle warm-up (steps 1-2)
    assert history[-1]["lr"] < 1e-6  # annealed to almost nothing at its last step, not the schedule's next
    assert not list(tmp_path.glob("*.tmp"))


def test_a_validation_class_that_training_lacks_is_no_divergence(tiny_config, synth_split, tmp_path):
    glioma, split = synth_split["label"] == "glioma", synth_split["split"]
    lacking = synth_split[((split == "train") & ~glioma) | ((split == "val") & glioma) | (split == "test")]
    result = train_model(tiny_config, lacking, tmp_path / "run", progress=False)  # class-weighted by default
    assert all(np.isfinite(h["val_loss"]) for h in result.history)


def test_train_threads_are_restored_for_whatever_runs_next(tiny_config, synth_split, tmp_path):
    before = torch.get_num_threads()
    one = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"threads": 1, "epochs": 1})})
    train_model(one, synth_split, tmp_path / "run", progress=False)
    assert torch.get_num_threads() == before


def test_an_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from btc.train import save_checkpoint

    def write_then_interrupt(state, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last.pt", epoch=1)
    assert list(tmp_path.iterdir()) == []


def test_init_weights_files_btc_writes_and_files_that_do_not_fit(tmp_path, trained_run):
    import torchvision

    own = build_model(width=8, init_weights=trained_run.model_path)  # btc's own model.pt ("state_dict" inside)
    assert torch.equal(own.state_dict()["stem.0.0.weight"], load_model(trained_run.model_path)[0].state_dict()["stem.0.0.weight"])
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(ValueError, match="is not a PyTorch weights file"):
        build_model("resnet18", init_weights=tmp_path / "text.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state_dict of tensors"):
        build_model("resnet18", init_weights=tmp_path / "list.pt")
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mobilenet.pt")
    with pytest.raises(ValueError, match=r"matches only \d+ of the model's \d+ weight tensors.*another architecture"):
        build_model("efficientnet_b0", init_weights=tmp_path / "mobilenet.pt")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pt")
    with pytest.raises(ValueError, match=r"resnet34.pt' holds 96 tensors this TorchvisionClassifier has no place for "
                                         r"\(backbone.layer1.2.*another, larger architecture"):
        build_model("resnet18", init_weights=tmp_path / "resnet34.pt")  # every resnet18 tensor is in it
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pt")
    build_model("resnet18", init_weights=tmp_path / "resnet18.pt")  # ImageNet's 1,000-class fc is not loaded, as meant


def test_a_model_file_whose_spec_and_weights_do_not_fit_is_refused(tmp_path, trained_run):
    blob = torch.load(trained_run.model_path, weights_only=True)
    for name, change in (("extra", {"spec": {**blob["spec"], "colour": "red"}}),
                         ("nospec", {"spec": None}),
                         ("width", {"spec": {**blob["spec"], "width": 16}})):
        torch.save({**blob, **change}, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match="is not a usable btc model file: its spec and weights do not fit"):
            load_model(tmp_path / f"{name}.pt")
