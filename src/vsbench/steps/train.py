"""train: fit one model on a train set; best checkpoint + training curve (+ last.ckpt for resume).

Source = Phase3D from phase.zarr, target = the target's fluorescence channel from
preprocessed.zarr, each normalized per FOV with its own fov_statistics
(median/IQR). Predictions therefore live in the normalized target space.
"""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vsbench import io
from vsbench.preprocess import normalize
from vsbench.steps import resolve_device, setup, torch_threads
from vsbench.train import (
    LOG_COLUMNS,
    checkpoint,
    evaluate_identity,
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
NORM = "median_iqr"


def fov_stats(pos, channel: str, where: str) -> dict:
    try:
        return io.channel_statistics(pos, channel)["fov_statistics"]
    except (io.InputError, KeyError) as exc:
        raise io.InputError(f"{where}: no fov_statistics for channel {channel!r} ({exc})") from exc


def load_pairs(entry: dict, split: str) -> list:
    """Normalized (phase, fluorescence) (T, Z, Y, X) pairs of one dataset's split."""
    pairs = []
    with io.open_plate(entry["phase"]) as phase, io.open_plate(entry["fluorescence"]) as fl:
        for fov in entry[split]:
            where_p = f"{entry['phase']} FOV {fov}"
            where_f = f"{entry['fluorescence']} FOV {fov}"
            p_pos = io.position(phase, fov, entry["phase"])
            f_pos = io.position(fl, fov, entry["fluorescence"])
            src = io.read_channel(p_pos, "Phase3D", where_p)
            tgt = io.read_channel(f_pos, entry["channel"], where_f)
            if src.shape != tgt.shape:
                raise io.InputError(
                    f"{where_p}: Phase3D shape {src.shape} differs from {entry['channel']} "
                    f"{tgt.shape} in {entry['fluorescence']}"
                )
            src = normalize(src.astype(np.float32), fov_stats(p_pos, "Phase3D", where_p), NORM)
            tgt = normalize(
                tgt.astype(np.float32), fov_stats(f_pos, entry["channel"], where_f), NORM
            )
            for arr, what in ((src, where_p), (tgt, where_f)):
                if not np.isfinite(arr).all():
                    raise io.InputError(f"{what}: non-finite values after normalization")
            pairs.append((np.ascontiguousarray(src, np.float32), np.ascontiguousarray(tgt)))
    return pairs


def save(obj: dict, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_curve(history: list) -> None:
    io.write_table(pd.DataFrame(history, columns=list(LOG_COLUMNS)), curve_path)


for entry in data:
    for split in ("train", "val"):
        if not entry.get(split):
            raise io.InputError(f"dataset {entry.get('dataset')!r}: the {split} split is empty")
train_pairs = [p for entry in data for p in load_pairs(entry, "train")]
val_pairs = [p for entry in data for p in load_pairs(entry, "val")]
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
        log.info(
            "epoch %d/%d: train_loss %.5f val_loss %.5f lr %.2e (%.1f s)",
            h["epoch"] + 1,
            settings["epochs"],
            h["train_loss"],
            h["val_loss"],
            h["lr"],
            h["wall_s"],
        )

    final = train_model(
        train_pairs,
        val_pairs,
        settings,
        seed,
        device,
        resume=resume,
        on_epoch_end=on_epoch_end,
        root_dir=str(ckpt_path.parent),
        extra={**extra, "resume_key": key},
    )
    best = final["best"]
    save(
        checkpoint(settings, best["state_dict"], best["epoch"], best["val_loss"], **extra),
        ckpt_path,
    )
    write_curve(final["history"])
    log.info("best epoch %d: val_loss %.5f", best["epoch"] + 1, best["val_loss"])
log.info("wrote %s and %s", ckpt_path, curve_path)
