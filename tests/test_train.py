"""train: UNet shapes, learning, determinism, resume, identity baseline, the step script."""

import math
import os
import runpy
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage as ndi

from vsbench import io
from vsbench.models import UNet3D, build_model, model_config, z_levels_for
from vsbench.predict import load_model, predict_volume
from vsbench.preprocess import fov_statistics
from vsbench.train import (
    LOG_COLUMNS,
    TrainingInterrupted,
    epochs_without_progress,
    evaluate_identity,
    fixed_crops,
    foreground_index,
    learning_rate,
    model_settings,
    sample_crop,
    train_model,
    training_crop,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEP = Path(__file__).resolve().parents[1] / "src" / "vsbench" / "steps" / "train.py"
TINY = dict(
    arch="unet3d",
    base_channels=4,
    depth=2,
    epochs=3,
    steps_per_epoch=4,
    val_steps=2,
    batch_size=2,
    crop=[4, 24, 24],
    lr=0.01,
    loss="mse",
)


def synthetic_pair(seed: int, shape=(2, 8, 40, 40), thr: float = 1.0):
    """Target = smoothed (|input| > thr): nonlinear, and uncorrelated with the input."""
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.normal(size=shape), (0, 0.7, 1.5, 1.5))
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    y = ndi.gaussian_filter((np.abs(x) > thr).astype(np.float32), (0, 0.7, 1.0, 1.0))
    y = (y - y.mean()) / y.std()
    return x, y.astype(np.float32)


@pytest.fixture(scope="module")
def pairs():
    return [synthetic_pair(i) for i in range(3)], [synthetic_pair(10)]


def pcc(a, b) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("shape", "depth", "z_levels"),
    [((1, 1, 5, 37, 29), 2, 1), ((2, 1, 8, 64, 64), 2, 2), ((1, 1, 1, 9, 10), 3, 0)],
)
def test_unet_output_shape_for_odd_sizes(shape, depth, z_levels):
    torch.manual_seed(0)
    model = UNet3D(base_channels=4, depth=depth, z_levels=z_levels).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == shape
    assert torch.isfinite(out).all()
    assert model.divisibility == (2**z_levels, 2**depth, 2**depth)


def test_z_downsampling_follows_crop_depth():
    assert z_levels_for(8, 2) == 2  # 8 → 4 → 2
    assert z_levels_for(4, 2) == 1  # 4 → 2, no further
    assert z_levels_for(3, 3) == 0
    assert z_levels_for(16, 3) == 3
    cfg = model_config(model_settings({**TINY, "crop": [4, 24, 24]}))
    assert cfg["z_levels"] == 1
    model = build_model("unet3d", cfg)
    assert model.downs[0][0].stride == (2, 2, 2) and model.downs[1][0].stride == (1, 2, 2)


def test_model_settings_fill_defaults_and_reject_bad_values():
    s = model_settings({"arch": "unet3d"})
    assert s["crop"] == [8, 64, 64] and s["loss"] == "mse" and s["val_steps"] == 4
    with pytest.raises(io.InputError, match="arch"):
        model_settings({"arch": "resnet"})
    with pytest.raises(io.InputError, match="crop"):
        model_settings({"arch": "unet3d", "crop": [8, 64]})
    with pytest.raises(io.InputError, match="loss"):
        model_settings({"arch": "unet3d", "loss": "huber"})


def test_learning_rate_is_cosine_per_epoch():
    s = model_settings(TINY)
    assert learning_rate(s, 0) == pytest.approx(0.01)
    assert learning_rate(s, 3) == pytest.approx(
        0.01 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi)))
    )
    lrs = [learning_rate(s, e) for e in range(3)]
    assert lrs == sorted(lrs, reverse=True)


# --------------------------------------------------------------------------- data


def test_crops_are_seeded_and_augmentation_keeps_pairs_aligned(pairs):
    train, _ = pairs
    a1 = sample_crop(train, [4, 24, 24], np.random.default_rng(3), augment=True)
    a2 = sample_crop(train, [4, 24, 24], np.random.default_rng(3), augment=True)
    np.testing.assert_array_equal(a1[0], a2[0])
    # augmentation acts identically on source and target: the target is still f(source)
    x, _ = train[0]
    ident = [(x, x * 2.0 + 1.0)]
    for seed in range(8):
        src, tgt = sample_crop(ident, [4, 24, 24], np.random.default_rng(seed), augment=True)
        np.testing.assert_allclose(tgt, src * 2.0 + 1.0, rtol=1e-6)
    s1, t1 = fixed_crops(train, [4, 24, 24], 5, seed=0)
    s2, _ = fixed_crops(train, [4, 24, 24], 5, seed=0)
    assert s1.shape == (5, 1, 4, 24, 24) and torch.equal(s1, s2)


def test_intensity_augmentation_and_noise_touch_the_source_only(pairs):
    train, _ = pairs
    aug = {"intensity_scale": 0.2, "intensity_shift": 0.1, "noise_std": 0.05}
    plain = sample_crop(train, [4, 24, 24], np.random.default_rng(5), augment=False)
    src, tgt = sample_crop(train, [4, 24, 24], np.random.default_rng(5), False, aug)
    np.testing.assert_array_equal(tgt, plain[1])  # same crop, target untouched
    assert not np.allclose(src, plain[0])
    resid = src - np.polyval(np.polyfit(plain[0].ravel(), src.ravel(), 1), plain[0])
    assert 0.03 < resid.std() < 0.07  # the added noise; the rest is an affine map
    again = sample_crop(train, [4, 24, 24], np.random.default_rng(5), False, aug)
    np.testing.assert_array_equal(again[0], src)  # seeded


def test_foreground_crops_are_centred_on_bright_target():
    x = np.zeros((1, 8, 64, 64), np.float32)
    y = np.zeros_like(x)
    y[0, 4, 50:54, 10:14] = 5.0  # one small bright object
    fg = foreground_index([(x, y)], threshold=1.0, stride=1)
    assert len(fg[0]) == 16
    hits = 0
    for seed in range(20):
        _, tgt = sample_crop([(x, y)], [4, 16, 16], np.random.default_rng(seed), False,
                             {"foreground_fraction": 1.0}, fg)  # fmt: skip
        hits += tgt.max() > 0
    assert hits == 20
    random = sum(
        sample_crop([(x, y)], [4, 16, 16], np.random.default_rng(s), False)[1].max() > 0
        for s in range(20)
    )
    assert random < 10


def test_worker_processes_do_not_change_the_data(pairs):
    train, val = pairs
    s = model_settings({**TINY, "epochs": 2, "steps_per_epoch": 3})
    a = train_model(train, val, s, seed=4)["state_dict"]
    b = train_model(train, val, {**s, "num_workers": 2}, seed=4)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_and_gradient_accumulation(pairs):
    train, val = pairs
    anti = [(x, -y) for x, y in val]  # learning the train mapping makes this val set worse
    s = model_settings({**TINY, "epochs": 8, "patience": 2})
    final = train_model(train, anti, s, seed=0)
    assert final["stopped_early"] and len(final["history"]) < 8
    assert epochs_without_progress(final["history"]) == 2
    assert (
        epochs_without_progress([{"epoch": 0, "val_loss": 1.0}, {"epoch": 1, "val_loss": 0.99999}])
        == 1
    )
    again = train_model(train, val, s, seed=0, resume=final)  # a finished run stays finished
    assert again["epoch"] == final["epoch"]
    acc = model_settings({**TINY, "epochs": 1, "accumulate": 2})
    assert len(train_model(train, val, acc, seed=0)["history"]) == 1


def test_a_stop_request_discards_the_partial_epoch(pairs):
    train, val = pairs
    s = model_settings(TINY)
    seen, batches = [], []

    def should_stop():
        batches.append(1)
        return len(batches) == s["steps_per_epoch"] + 2  # two batches into epoch 1

    with pytest.raises(TrainingInterrupted, match="after epoch 0") as info:
        train_model(train, val, s, seed=1, on_epoch_end=seen.append, should_stop=should_stop)
    assert info.value.epoch == 0 and [st["epoch"] for st in seen] == [0]
    full = train_model(train, val, s, seed=1)
    resumed = train_model(train, val, s, seed=1, resume=seen[-1])
    assert all(
        torch.equal(full["state_dict"][k], resumed["state_dict"][k]) for k in full["state_dict"]
    )


def test_training_crop_fits_volumes_and_divisibility(pairs):
    train, _ = pairs  # volumes (2, 8, 40, 40)
    assert training_crop(model_settings({**TINY, "crop": [5, 30, 30]}), train) == [4, 28, 28]
    assert training_crop(model_settings({**TINY, "crop": [16, 64, 64]}), train) == [8, 40, 40]
    assert training_crop(model_settings({**TINY, "crop": [3, 24, 24]}), train) == [3, 24, 24]


def test_identity_val_loss_is_the_real_loss(pairs):
    train, val = pairs
    s = model_settings({**TINY, "arch": "identity"})
    row = evaluate_identity(train, val, s, seed=0)
    src, tgt = fixed_crops(val, s["crop"], s["val_steps"] * s["batch_size"], seed=0)
    expected = float(np.mean((src.numpy() - tgt.numpy()) ** 2))
    assert row["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert set(row) == set(LOG_COLUMNS) and row["epoch"] == 0
    s_l1 = model_settings({**TINY, "arch": "identity", "loss": "l1"})
    expected_l1 = float(np.mean(np.abs(src.numpy() - tgt.numpy())))
    assert evaluate_identity(train, val, s_l1, seed=0)["val_loss"] == pytest.approx(expected_l1)


# --------------------------------------------------------------------------- training


def test_training_learns_a_nonlinear_target_and_beats_identity(pairs):
    train, val = pairs
    s = model_settings({**TINY, "epochs": 4, "steps_per_epoch": 12, "batch_size": 4})
    final = train_model(train, val, s, seed=0)
    hist = final["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert hist[-1]["val_loss"] < 0.6 * hist[0]["val_loss"]
    identity = evaluate_identity(train, val, s, seed=0)["val_loss"]
    assert final["best"]["val_loss"] < 0.5 * identity
    # quality gate on a whole held-out volume: PCC of the trained model beats identity's
    model = build_model("unet3d", model_config(s))
    model.load_state_dict(final["best"]["state_dict"])
    x, y = val[0]
    pred = predict_volume(model, x[0], tile_yx=24, overlap=0.25, batch_size=4)
    assert abs(pcc(x[0], y[0])) < 0.3  # the input alone is a poor predictor here
    assert pcc(pred, y[0]) > 0.6


def test_same_seed_same_weights_on_cpu(pairs):
    train, val = pairs
    s = model_settings({**TINY, "epochs": 2, "steps_per_epoch": 3})
    a = train_model(train, val, s, seed=7)["state_dict"]
    b = train_model(train, val, s, seed=7)["state_dict"]
    c = train_model(train, val, s, seed=8)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class Killed(Exception):
    pass


def test_resume_continues_where_it_stopped(pairs, tmp_path):
    train, val = pairs
    s = model_settings(TINY)
    full = train_model(train, val, s, seed=1)

    last = tmp_path / "last.ckpt"

    def persist_then_die(state):
        torch.save(state, last)
        if state["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train_model(train, val, s, seed=1, on_epoch_end=persist_then_die)
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 2

    epochs_run = []
    resumed = train_model(
        train, val, s, seed=1, resume=state, on_epoch_end=lambda st: epochs_run.append(st["epoch"])
    )
    assert epochs_run == [2]  # only the unfinished epoch
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    for h_full, h_res in zip(full["history"], resumed["history"], strict=True):
        assert h_res["val_loss"] == pytest.approx(h_full["val_loss"], rel=1e-6)
    assert all(
        torch.equal(full["state_dict"][k], resumed["state_dict"][k]) for k in full["state_dict"]
    )
    # resuming a finished run does nothing
    again = train_model(
        train, val, s, seed=1, resume=resumed, on_epoch_end=lambda st: epochs_run.append(-1)
    )
    assert epochs_run == [2] and again["epoch"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_bf16(pairs):
    train, val = pairs
    s = model_settings({**TINY, "epochs": 2})
    final = train_model(train, val, s, seed=0, device="cuda")
    assert all(math.isfinite(h["val_loss"]) for h in final["history"])
    assert all(v.device.type == "cpu" for v in final["state_dict"].values())


# --------------------------------------------------------------------------- step script


def write_plates(root: Path, fovs, shape=(2, 8, 40, 40)):
    """phase.zarr (Phase3D) + preprocessed.zarr (BF, Nucleus), with per-FOV statistics."""
    phase_path, fl_path = root / "phase.zarr", root / "preprocessed.zarr"
    scale = (2.0, 0.325, 0.325)
    with (
        io.create_plate(phase_path, ["Phase3D"]) as phase,
        io.create_plate(fl_path, ["BF", "Nucleus"]) as fl,
    ):
        for i, fov in enumerate(fovs):
            x, y = synthetic_pair(i, shape)
            x_raw = x * 0.05 + 0.01  # phase in radians-like units
            y_raw = y * 30.0 + 200.0  # fluorescence counts
            bf = np.random.default_rng(i).normal(1.0, 0.1, size=shape).astype(np.float32)
            p = io.write_fov(phase, fov, x_raw[:, None].astype(np.float32), scale)
            f = io.write_fov(fl, fov, np.stack([bf, y_raw], axis=1).astype(np.float32), scale)
            for pos, chans in ((p, {"Phase3D": x_raw}), (f, {"BF": bf, "Nucleus": y_raw})):
                norm = {}
                for name, arr in chans.items():
                    fs, ts = fov_statistics(arr, stride=4)
                    norm[name] = {"fov_statistics": fs, "timepoint_statistics": ts}
                pos.zattrs.update(io.to_jsonable({"normalization": norm}))
    return phase_path, fl_path


def run_train_step(tmp_path, model, phase, fl, fovs, target="nucleus"):
    out = tmp_path / "target" / target / "demo" / model["arch"]
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(phase=[str(phase)], fluorescence=[str(fl)]),
        output=types.SimpleNamespace(
            ckpt=str(out / "model.ckpt"), curve=str(out / "train_log.csv")
        ),
        params=types.SimpleNamespace(
            model=model,
            data=[
                {
                    "dataset": "demo",
                    "phase": str(phase),
                    "fluorescence": str(fl),
                    "channel": "Nucleus",
                    "train": fovs[:2],
                    "val": fovs[2:3],
                }
            ],
            seed=0,
            device="cpu",
        ),
        wildcards=types.SimpleNamespace(target=target),
        log=[],
        threads=1,
        rule="train",
    )
    runpy.run_path(str(STEP), init_globals={"snakemake": ns})
    return out


FOVS = ["A/1/0", "A/1/1", "A/1/2"]


def test_train_step_identity(tmp_path, restore_threads):
    phase, fl = write_plates(tmp_path, FOVS)
    out = run_train_step(tmp_path, model_settings({**TINY, "arch": "identity"}), phase, fl, FOVS)
    ckpt = torch.load(out / "model.ckpt", weights_only=True)
    assert ckpt["format"] == "vsbench-model/1" and ckpt["arch"] == "identity"
    assert ckpt["target"] == "nucleus" and ckpt["target_channel"] == "Nucleus"
    curve = pd.read_csv(out / "train_log.csv")
    assert list(curve.columns) == list(LOG_COLUMNS) and len(curve) == 1
    assert curve["val_loss"][0] == pytest.approx(ckpt["val_loss"]) and ckpt["val_loss"] > 0.1


def test_train_step_unet_writes_best_and_resumes(tmp_path, restore_threads):
    phase, fl = write_plates(tmp_path, FOVS)
    settings = model_settings({**TINY, "epochs": 2, "steps_per_epoch": 3})
    out = run_train_step(tmp_path, settings, phase, fl, FOVS)
    curve = pd.read_csv(out / "train_log.csv")
    assert list(curve["epoch"]) == [0, 1] and list(curve.columns) == list(LOG_COLUMNS)
    ckpt = torch.load(out / "model.ckpt", weights_only=True)
    assert ckpt["val_loss"] == pytest.approx(curve["val_loss"].min(), rel=1e-6)
    assert ckpt["epoch"] == int(curve["val_loss"].idxmin())
    assert ckpt["normalization"] == "median_iqr" and "optimizer" not in ckpt
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and "optimizer" in last
    model, meta = load_model(out / "model.ckpt", "cpu")
    assert meta["arch"] == "unet3d" and not any(Path(out).glob(".*.tmp"))

    # rerun (e.g. Snakemake deleted the outputs after a kill): nothing is retrained
    mtime = (out / "last.ckpt").stat().st_mtime_ns
    (out / "model.ckpt").unlink()
    run_train_step(tmp_path, settings, phase, fl, FOVS)
    assert (out / "last.ckpt").stat().st_mtime_ns == mtime
    again = torch.load(out / "model.ckpt", weights_only=True)
    assert all(
        torch.equal(again["state_dict"][k], ckpt["state_dict"][k]) for k in ckpt["state_dict"]
    )
    pd.testing.assert_frame_equal(pd.read_csv(out / "train_log.csv"), curve)

    # other settings: last.ckpt is ignored and replaced
    run_train_step(tmp_path, {**settings, "lr": 0.02}, phase, fl, FOVS)
    assert torch.load(out / "last.ckpt", weights_only=True)["settings"]["lr"] == 0.02


def test_train_step_rejects_missing_statistics(tmp_path, restore_threads):
    phase, fl = write_plates(tmp_path, FOVS)
    with io.open_plate(phase, mode="r+") as plate:
        plate["A/1/1"].zattrs["normalization"] = {}
    with pytest.raises(io.InputError, match=r"phase.zarr FOV A/1/1.*Phase3D"):
        run_train_step(tmp_path, model_settings(TINY), phase, fl, FOVS)


def test_model_defaults_equal_the_schema_defaults():
    import yaml

    from vsbench.train import MODEL_DEFAULTS

    schema = yaml.safe_load((STEP.parents[3] / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["models"]["additionalProperties"]["properties"]
    for key, value in MODEL_DEFAULTS.items():
        assert props[key]["default"] == value, key


# --------------------------------------------------------------------------- kill / signal


def start_train_process(root: Path, phase: Path, fl: Path, model: dict):
    import json
    import subprocess
    import sys

    out = root / "out"
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "model": model,
        "data": [{"dataset": "demo", "phase": str(phase), "fluorescence": str(fl),
                  "channel": "Nucleus", "train": FOVS[:2], "val": FOVS[2:3]}],
        "seed": 0,
        "device": "cpu",
    }  # fmt: skip
    (root / "params.json").write_text(json.dumps(params))
    cmd = [sys.executable, "-m", "vsbench.steps", "train", "--input", f"phase={phase}",
           "--input", f"fluorescence={fl}", "--output", f"ckpt={out / 'model.ckpt'}",
           "--output", f"curve={out / 'train_log.csv'}", "--params", str(root / "params.json"),
           "--log", str(root / "train.log")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def epochs_logged(out: Path) -> int:
    try:
        return len(pd.read_csv(out / "train_log.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def interrupt_mid_epoch(proc, out: Path, sig, after_epochs: int = 2) -> int:
    """Send `sig` a little after epoch `after_epochs` was logged; return epochs logged then."""
    import time

    deadline = time.time() + 120
    while epochs_logged(out) < after_epochs:
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.15)  # into the next epoch
    done = epochs_logged(out)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return done


KILL_MODEL = {**TINY, "epochs": 5, "steps_per_epoch": 25, "crop": [4, 16, 16]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    phase, fl = write_plates(root, FOVS)
    ref, ref_out = start_train_process(root / "ref", phase, fl, KILL_MODEL)
    assert ref.wait(timeout=300) == 0
    return phase, fl, ref_out


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_kill_or_sigterm_mid_epoch_costs_at_most_one_epoch(tmp_path, sig, uninterrupted):
    """A real process killed (kill -9) or asked to stop (SIGTERM, as SLURM does) mid-epoch;
    the rerun resumes from last.ckpt and ends with the uninterrupted run's weights."""
    import signal as signal_mod

    phase, fl, ref_out = uninterrupted
    model = KILL_MODEL
    proc, out = start_train_process(tmp_path / "run", phase, fl, model)
    done = interrupt_mid_epoch(proc, out, getattr(signal_mod, sig))
    if sig == "SIGTERM":
        assert proc.returncode == 128 + signal_mod.SIGTERM  # stopped at a batch, not killed
        assert "stopping at the next batch" in (tmp_path / "run" / "train.log").read_text()
    else:
        assert proc.returncode == -signal_mod.SIGKILL
    assert not (out / "model.ckpt").exists()  # nothing final was written
    state = torch.load(out / "last.ckpt", weights_only=True)
    assert state["epoch"] == done - 1  # the last complete epoch
    rerun, _ = start_train_process(tmp_path / "run", phase, fl, model)
    assert rerun.wait(timeout=300) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"resuming from {out / 'last.ckpt'} after epoch {done - 1}" in log
    # at most one epoch lost: only the interrupted one is trained again
    a = torch.load(ref_out / "model.ckpt", weights_only=True)
    b = torch.load(out / "model.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    curve_a, curve_b = pd.read_csv(ref_out / "train_log.csv"), pd.read_csv(out / "train_log.csv")
    np.testing.assert_allclose(curve_a.val_loss, curve_b.val_loss, rtol=1e-6)


def test_distributed_plan_and_rank_zero():
    from vsbench.train import distributed_plan, is_global_zero

    assert distributed_plan("cpu")["strategy"] == "auto"
    plan = distributed_plan("cuda", "auto", environ={}, n_cuda=4)
    assert plan == {"accelerator": "gpu", "devices": 4, "strategy": "ddp", "cluster": "default"}
    assert distributed_plan("cuda", 1, environ={}, n_cuda=4)["strategy"] == "auto"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}
    assert distributed_plan("cuda", "auto", environ=slurm, n_cuda=4)["cluster"] == "slurm"
    one_task = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}
    # the executor's `srun -n1` step inside a 4-task allocation: Lightning starts the ranks
    step = {**slurm, "SLURM_STEP_NUM_TASKS": "1"}
    assert distributed_plan("cuda", "auto", environ=step, n_cuda=4)["cluster"] == "lightning"
    assert distributed_plan("cuda", "auto", environ=one_task, n_cuda=4)["cluster"] == "lightning"
    with pytest.raises(io.InputError, match="2 tasks for 4 GPU"):
        distributed_plan("cuda", "auto", environ={**slurm, "SLURM_STEP_NUM_TASKS": "2"}, n_cuda=4)
    with pytest.raises(io.InputError, match="sees 2 GPU"):
        distributed_plan("cuda", 4, environ={}, n_cuda=2)
    assert distributed_plan("cuda:1", environ={}, n_cuda=2)["devices"] == [1]
    assert is_global_zero({}) and is_global_zero({"SLURM_PROCID": "0", "LOCAL_RANK": "0"})
    assert not is_global_zero({"SLURM_PROCID": "0", "LOCAL_RANK": "2"})
    assert not is_global_zero({"RANK": "3"})
