"""train: fit one model on a train set; best checkpoint + training curve (+ last.ckpt for resume).

Source = Phase3D from phase.zarr, target = the target's fluorescence channel from
preprocessed.zarr, each normalized per FOV with its own fov_statistics (the model's
input_norm / target_norm, median/IQR by default). Predictions therefore live in the
normalized target space. SIGTERM/SIGUSR1 stop training at the next batch; last.ckpt then
holds the last complete epoch and the job exits with 128 + the signal number.
"""

import logging
import signal
from pathlib import Path

import pandas as pd
import torch

from vsbench import io
from vsbench.steps import resolve_device, setup, torch_threads
from vsbench.train import (
    LOG_COLUMNS,
    TrainingInterrupted,
    checkpoint,
    evaluate_identity,
    is_global_zero,
    load_split,
    model_settings,
    resume_key,
    train_model,
)

log = setup(snakemake, "train")
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
threads = torch_threads(snakemake)
ckpt_path = Path(str(snakemake.output.ckpt))
curve_path = Path(str(snakemake.output.curve))
last_path = ckpt_path.parent / "last.ckpt"
settings = model_settings(snakemake.params.model)
data = [dict(d) for d in snakemake.params.data]
seed = int(snakemake.params.seed)
device = resolve_device(str(snakemake.params.device))
target = getattr(getattr(snakemake, "wildcards", None), "target", None)

# SLURM sends SIGTERM (or SIGUSR1 with --signal) before a preemption or the time limit:
# finish the current batch, keep last.ckpt at the last complete epoch, exit non-zero so
# Snakemake's retry (or a rerun) resumes from it.
stop_requested: list[int] = []


def request_stop(signum, _frame) -> None:
    log.warning("received %s: stopping at the next batch", signal.Signals(signum).name)
    stop_requested.append(signum)


for _sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_sig, request_stop)


def save(obj: dict, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_curve(history: list) -> None:
    io.write_table(pd.DataFrame(history, columns=list(LOG_COLUMNS)), curve_path)


for entry in data:
    for split in ("train", "val"):
        if not entry.get(split):
            raise io.InputError(f"dataset {entry.get('dataset')!r}: the {split} split is empty")
norms = (settings["input_norm"], settings["target_norm"])
train_pairs = [p for entry in data for p in load_split(entry, "train", *norms)]
val_pairs = [p for entry in data for p in load_split(entry, "val", *norms)]
log.info(
    "model %s: %d train / %d val FOVs, device %s, %d threads",
    settings["arch"],
    len(train_pairs),
    len(val_pairs),
    device,
    threads,
)
channels = sorted({entry["channel"] for entry in data})
extra = {
    "target": target,
    "target_channel": channels[0] if len(channels) == 1 else ",".join(channels),
    "input_channel": "Phase3D",
    "seed": seed,
    "datasets": [entry["dataset"] for entry in data],
}
key = resume_key(settings, seed, data)

if settings["arch"] == "identity":
    row = evaluate_identity(train_pairs, val_pairs, settings, seed)
    log.info("identity baseline: val_loss %.5f", row["val_loss"])
    save(checkpoint(settings, {}, 0, row["val_loss"], **extra), ckpt_path)
    write_curve([row])
else:
    resume = None
    if last_path.exists():
        try:
            state = torch.load(last_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a stale or foreign file must not block training
            log.warning("ignoring unreadable %s (%s)", last_path, exc)
            state = None
        if state is not None and state.get("resume_key") == key:
            resume = state
            log.info("resuming from %s after epoch %d", last_path, state["epoch"])
        elif state is not None:
            log.info("ignoring %s: it was written for other settings or data", last_path)

    def on_epoch_end(state: dict) -> None:
        save(state, last_path)
        write_curve(state["history"])
        h = state["history"][-1]
        gan = f" D {h['d_loss']:.4f} G {h['g_loss']:.4f}" if h["d_loss"] == h["d_loss"] else ""
        log.info(
            "epoch %d/%d: train_loss %.5f val_loss %.5f lr %.2e (%.1f s)%s",
            h["epoch"] + 1,
            settings["epochs"],
            h["train_loss"],
            h["val_loss"],
            h["lr"],
            h["wall_s"],
            gan,
        )

    try:
        final = train_model(
            train_pairs,
            val_pairs,
            settings,
            seed,
            device,
            resume=resume,
            on_epoch_end=on_epoch_end,
            should_stop=lambda: bool(stop_requested),
            root_dir=str(ckpt_path.parent),
            extra={**extra, "resume_key": key},
        )
    except TrainingInterrupted as exc:
        log.error("%s (%s)", exc, last_path)
        raise SystemExit(128 + stop_requested[0]) from exc
    if final.get("stopped_early"):
        log.info("early stop: no progress for %d epochs", settings["patience"])
    if not is_global_zero():  # DDP: rank 0 writes the outputs
        raise SystemExit(0)
    best = final["best"]
    save(
        checkpoint(settings, best["state_dict"], best["epoch"], best["val_loss"], **extra),
        ckpt_path,
    )
    write_curve(final["history"])
    log.info("best epoch %d: val_loss %.5f", best["epoch"] + 1, best["val_loss"])
log.info("wrote %s and %s", ckpt_path, curve_path)
