"""predict: run a trained model over the predict set's FOVs → {target}_prediction plate.

The input Phase3D is normalized per FOV with its fov_statistics, as in training;
the output stays in the normalized target space (downstream metrics are
affine-invariant).
"""

from pathlib import Path

import numpy as np

from vsbench import io
from vsbench.predict import load_model, predict_volume
from vsbench.preprocess import normalize
from vsbench.steps import resolve_device, setup, torch_threads

log = setup(snakemake, "predict")
threads = torch_threads(snakemake)
ckpt_path = str(snakemake.input.ckpt)
phase_path = str(snakemake.input.phase)
out_path = str(snakemake.output.store)
target = str(snakemake.params.target)
fovs = list(snakemake.params.fovs)
settings = {
    "tile_yx": 64,
    "overlap": 0.25,
    "tile_z": None,
    "z_overlap": 0.5,
    "weights": "tent",
    "batch_size": 4,
    "overwrite": False,
    **dict(snakemake.params.settings),
}
device = resolve_device(str(snakemake.params.device))

if not fovs:
    raise io.InputError(f"{phase_path}: no FOVs to predict (empty predict split)")
if Path(out_path).exists() and any(Path(out_path).iterdir()) and not settings["overwrite"]:
    raise io.InputError(
        f"{out_path}: a prediction store exists; set predict.overwrite: true to replace it"
    )
model, meta = load_model(ckpt_path, device)  # a missing or placeholder file fails here
if meta.get("target") not in (None, target):
    raise io.InputError(
        f"{ckpt_path}: checkpoint was trained for target {meta['target']!r}, not {target!r}"
    )
channel = f"{target}_prediction"
log.info(
    "model %s (epoch %s, val_loss %.5f) on %d FOVs, device %s, %d threads, %s",
    meta["arch"],
    meta.get("epoch"),
    float(meta.get("val_loss", float("nan"))),
    len(fovs),
    device,
    threads,
    settings,
)

with io.open_plate(phase_path) as phase:
    known = set(io.fov_names(phase))
    missing = [f for f in fovs if f not in known]
    if missing:
        raise io.InputError(f"{phase_path}: FOV(s) {missing} not found")
    with io.create_plate(out_path, [channel]) as out:
        for fov in fovs:
            where = f"{phase_path} FOV {fov}"
            pos = io.position(phase, fov, phase_path)
            try:
                stats = io.channel_statistics(pos, "Phase3D")["fov_statistics"]
            except (io.InputError, KeyError) as exc:
                raise io.InputError(f"{where}: no Phase3D fov_statistics ({exc})") from exc
            tzyx = io.read_channel(pos, "Phase3D", where)
            T, Z, Y, X = tzyx.shape
            out_pos = io.create_fov(out, fov, (T, 1, Z, Y, X), io.scale_zyx(pos))
            for t in range(T):
                x = normalize(tzyx[t].astype(np.float32), stats, meta.get("normalization"))
                pred = predict_volume(
                    model,
                    x,
                    tile_yx=int(settings["tile_yx"]),
                    overlap=float(settings["overlap"]),
                    batch_size=int(settings["batch_size"]),
                    device=device,
                    tile_z=settings["tile_z"],
                    z_overlap=float(settings["z_overlap"]),
                    weights=str(settings["weights"]),
                )
                if pred.shape != (Z, Y, X):
                    raise RuntimeError(f"{where}: prediction shape {pred.shape} != {(Z, Y, X)}")
                out_pos["0"][t, 0] = pred.astype(np.float32)
            log.info("FOV %s: %d timepoint(s) of %s", fov, T, (Z, Y, X))
        out.zattrs["prediction"] = io.to_jsonable(
            {
                "checkpoint": ckpt_path,
                "arch": meta["arch"],
                "epoch": meta.get("epoch"),
                "target": target,
                "target_channel": meta.get("target_channel"),
                "normalization": meta.get("normalization"),
                "source": phase_path,
                **settings,
            }
        )
log.info("wrote %s", out_path)
