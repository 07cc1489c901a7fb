"""Benchmark: training and prediction throughput per architecture, and what blending costs.

    .venv/bin/python tests/benchmarks/bench_train_predict.py [--device cpu|cuda] [--threads 2]
        [--steps 20] [--volume 16 128 128]

For each registered trainable architecture at the schema's default sizes (base 8, depth 2,
crop 8×64×64, batch 4): training throughput in crops/s (Lightning loop, `train_model`, two
epochs of `--steps` steps, the first epoch as warm-up), and prediction throughput in
voxels/s over one normalized volume with the default sliding window (64² tiles, 25 %
overlap, tent blending) against plain tiling (no overlap, which is what blending costs).
On CUDA training runs bf16-mixed and prediction under bf16 autocast. Not collected by
pytest.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def timed_predict(model, x, device, sync, **kw) -> float:
    from vsbench.predict import predict_volume

    predict_volume(model, x, device=device, **kw)  # warm-up
    sync()
    t = time.perf_counter()
    predict_volume(model, x, device=device, **kw)
    sync()
    return time.perf_counter() - t


def main() -> None:
    import torch

    from vsbench.models import build_model, model_config
    from vsbench.train import model_settings, train_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--volume", type=int, nargs=3, default=(16, 128, 128))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(2, *args.volume)).astype(np.float32)
    pairs = [(vol, np.tanh(vol).astype(np.float32))]
    voxels = int(np.prod(args.volume))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"device {args.device}, {torch.get_num_threads()} threads, volume {tuple(args.volume)}")
    print(
        f"{'arch':10} {'train crops/s':>14} {'predict Mvox/s':>15} {'plain tiles':>12} {'blend cost':>11}"
    )
    for arch in ("unet3d", "unext2", "pix2pix3d"):
        s = model_settings(
            {"arch": arch, "epochs": 2, "steps_per_epoch": args.steps, "val_steps": 1}
        )
        t0 = time.perf_counter()
        final = train_model(pairs, pairs, s, seed=0, device=args.device)
        sync()
        # epoch 1 alone (the log's wall_s is cumulative per epoch): steady state, no warm-up
        epoch_s = final["history"][1]["wall_s"] - final["history"][0]["wall_s"]
        crops_s = args.steps * s["batch_size"] / epoch_s
        model = build_model(arch, model_config({**s, "crop": s["crop"]})).to(args.device).eval()
        model.load_state_dict(final["state_dict"])
        blended = timed_predict(model, vol[0], args.device, sync, tile_yx=64, overlap=0.25)
        plain = timed_predict(model, vol[0], args.device, sync, tile_yx=64, overlap=0.0)
        print(f"{arch:10} {crops_s:14.1f} {voxels / blended / 1e6:15.2f} {voxels / plain / 1e6:12.2f}"
              f" {blended / plain:10.2f}x   (total {time.perf_counter() - t0:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
