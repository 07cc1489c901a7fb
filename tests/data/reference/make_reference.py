"""Regenerate the stored reference of tests/test_predict.py::test_stored_reference_output.

    .venv/bin/python tests/data/reference/make_reference.py

Trains a tiny unet3d (2 epochs × 4 steps, CPU, seed 0) on a synthetic nonlinear pair,
saves its checkpoint (unet3d.ckpt), a fixed normalized input volume (input.npy) and the
model's sliding-window prediction of it (output.npy). Run only when the architecture or
the checkpoint format changes on purpose: the test exists to catch the changes that
are not on purpose.
"""

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from vsbench.predict import load_model, predict_volume
from vsbench.train import checkpoint, model_settings, train_model

HERE = Path(__file__).resolve().parent
SETTINGS = dict(arch="unet3d", base_channels=4, depth=2, epochs=2, steps_per_epoch=4,
                val_steps=1, batch_size=2, crop=[8, 32, 32], lr=0.01, loss="mse")  # fmt: skip
PREDICT = dict(tile_yx=32, overlap=0.25, batch_size=2)


def volume(seed: int, shape) -> np.ndarray:
    x = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), (0, 0.7, 1.5, 1.5))
    return ((x - x.mean()) / x.std()).astype(np.float32)


def main() -> None:
    torch.set_num_threads(1)
    pairs = []
    for seed in (0, 1, 2):
        x = volume(seed, (1, 8, 48, 48))
        pairs.append((x, np.tanh(2 * x) ** 2))
    s = model_settings(SETTINGS)
    final = train_model(pairs[:2], pairs[2:], s, seed=0)
    torch.save(
        checkpoint(s, final["state_dict"], final["epoch"], final["val_loss"]), HERE / "unet3d.ckpt"
    )
    model, _ = load_model(HERE / "unet3d.ckpt")
    x = volume(7, (1, 8, 48, 48))[0]
    np.save(HERE / "input.npy", x)
    np.save(HERE / "output.npy", predict_volume(model, x, **PREDICT))


if __name__ == "__main__":
    main()
