"""Training: random-crop data from in-memory volumes, a Lightning loop, plain-dict checkpoints.

Inputs are normalized (source, target) pairs of (T, Z, Y, X) float32 arrays, one
per FOV; the step script reads and normalizes them. Checkpoints are plain dicts
of tensors and primitives so `torch.load(weights_only=True)` reads them; the
step script writes them (atomically) through the `on_epoch_end` hook, so this
module does no file I/O.

Determinism: every training crop is drawn from a generator seeded by
(seed, epoch, index) and the learning rate is a pure function of the epoch, so
a run resumed from `last.ckpt` takes exactly the steps an uninterrupted run
would have taken (bitwise on CPU).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from vsbench.io import InputError
from vsbench.models import ARCHS, build_model, model_config
from vsbench.models.losses import LOSSES
from vsbench.models.losses import loss_function as _loss_function

CHECKPOINT_FORMAT = "vsbench-model/1"
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "wall_s")
# mirrors the model defaults in workflow/schemas/config.schema.yaml (for hand-run steps)
MODEL_DEFAULTS = {
    "base_channels": 8,
    "depth": 2,
    "epochs": 5,
    "steps_per_epoch": 20,
    "val_steps": 4,
    "batch_size": 4,
    "crop": [8, 64, 64],
    "lr": 0.002,
    "weight_decay": 0.0,
    "loss": "mse",
}
MIN_LR_FRACTION = 0.05
log = logging.getLogger(__name__)

Pair = tuple[np.ndarray, np.ndarray]


def model_settings(params: Mapping) -> dict:
    """Model/training settings with defaults filled, checked, as plain JSON types."""
    s = {**MODEL_DEFAULTS, **dict(params)}
    if s.get("arch") not in ARCHS:
        raise InputError(f"model arch {s.get('arch')!r} is unknown (expected one of {list(ARCHS)})")
    if s["loss"] not in LOSSES:
        raise InputError(f"model loss {s['loss']!r} is unknown (expected one of {list(LOSSES)})")
    crop = [int(c) for c in s["crop"]]
    if len(crop) != 3 or min(crop) < 1:
        raise InputError(f"model crop {s['crop']!r}: expected three positive sizes [z, y, x]")
    s["crop"] = crop
    for key in ("base_channels", "depth", "epochs", "steps_per_epoch", "val_steps", "batch_size"):
        s[key] = int(s[key])
        if s[key] < 1:
            raise InputError(f"model {key} must be >= 1, got {s[key]}")
    s["lr"], s["weight_decay"] = float(s["lr"]), float(s["weight_decay"])
    return s


def effective_crop(crop: Sequence[int], pairs: Sequence[Pair]) -> list[int]:
    """The crop, shrunk per axis to the smallest volume so every FOV can supply one."""
    smallest = np.min([p[0].shape[1:] for p in pairs], axis=0)
    return [int(min(c, s)) for c, s in zip(crop, smallest, strict=True)]


def training_crop(settings: Mapping, pairs: Sequence[Pair]) -> list[int]:
    """The crop actually trained on: fits every volume and is a multiple of the model's
    divisibility, so training never pads (replicate-pad backward is not deterministic on CUDA).
    """
    crop = effective_crop(settings["crop"], pairs)
    div = build_model(settings["arch"], model_config({**settings, "crop": crop})).divisibility
    fitted = [c - c % d if c >= d else c for c, d in zip(crop, div, strict=True)]
    if fitted != list(settings["crop"]):
        log.warning(
            "training crop %s instead of %s (volume size / divisibility)", fitted, settings["crop"]
        )
    return fitted


def check_pairs(pairs: Sequence[Pair], what: str) -> None:
    if not pairs:
        raise InputError(f"no {what} FOVs: the {what} split is empty")
    for src, tgt in pairs:
        if src.ndim != 4 or src.shape != tgt.shape:
            raise InputError(
                f"{what} pair: expected matching (T, Z, Y, X) source/target, "
                f"got {src.shape} and {tgt.shape}"
            )


def sample_crop(
    pairs: Sequence[Pair], crop: Sequence[int], rng: np.random.Generator, augment: bool
) -> Pair:
    """One random (source, target) crop (Z, Y, X); augmentation = the XY dihedral group.

    Only Y/X flips and 90° XY rotations: the optical axis (Z) is not symmetric
    for a brightfield-derived phase, so Z is never flipped.
    """
    src, tgt = pairs[int(rng.integers(len(pairs)))]
    t = int(rng.integers(src.shape[0]))
    starts = [int(rng.integers(n - c + 1)) for n, c in zip(src.shape[1:], crop, strict=True)]
    sl = tuple(slice(s, s + c) for s, c in zip(starts, crop, strict=True))
    a, b = src[t][sl], tgt[t][sl]
    if augment:
        k = int(rng.integers(4)) if crop[1] == crop[2] else 2 * int(rng.integers(2))
        flip_y, flip_x = bool(rng.integers(2)), bool(rng.integers(2))
        a, b = np.rot90(a, k, axes=(1, 2)), np.rot90(b, k, axes=(1, 2))
        if flip_y:
            a, b = a[:, ::-1], b[:, ::-1]
        if flip_x:
            a, b = a[:, :, ::-1], b[:, :, ::-1]
    return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


class RandomCropDataset(torch.utils.data.Dataset):
    """`length` augmented crops per epoch; call set_epoch so each epoch draws new ones."""

    def __init__(self, pairs: Sequence[Pair], crop: Sequence[int], length: int, seed: int):
        self.pairs, self.crop, self.length, self.seed = list(pairs), list(crop), length, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, 1, self.epoch, int(i)])
        a, b = sample_crop(self.pairs, self.crop, rng, augment=True)
        return torch.from_numpy(a[None]), torch.from_numpy(b[None])


def fixed_crops(
    pairs: Sequence[Pair], crop: Sequence[int], n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation set: `n` crops fixed by the seed, no augmentation, (n, 1, z, y, x)."""
    rng = np.random.default_rng([seed, 2])
    crops = [sample_crop(pairs, crop, rng, augment=False) for _ in range(n)]
    src = torch.from_numpy(np.stack([c[0] for c in crops])[:, None])
    tgt = torch.from_numpy(np.stack([c[1] for c in crops])[:, None])
    return src, tgt


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss by name (see vsbench.models.losses)."""
    return _loss_function(name)


def learning_rate(settings: Mapping, epoch: int) -> float:
    """Cosine decay per epoch to MIN_LR_FRACTION·lr: a pure function of the epoch (resumable)."""
    lr, epochs = settings["lr"], settings["epochs"]
    lo = lr * MIN_LR_FRACTION
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def resume_key(settings: Mapping, seed: int, data: object) -> str:
    """What must match for last.ckpt to be continued (settings, seed, data and splits)."""
    return json.dumps({"settings": settings, "seed": seed, "data": data}, sort_keys=True)


def checkpoint(
    settings: Mapping, state_dict: Mapping[str, torch.Tensor], epoch: int, val_loss: float, **extra
) -> dict:
    """A checkpoint dict (tensors on CPU, primitives only): loadable with weights_only=True."""
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": settings["arch"],
        "model_config": model_config(settings),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "epoch": int(epoch),
        "val_loss": float(val_loss),
        "normalization": "median_iqr",
        "settings": copy.deepcopy(dict(settings)),
        **extra,
    }


def _batches(src: torch.Tensor, tgt: torch.Tensor, batch_size: int):
    return [
        (src[i : i + batch_size], tgt[i : i + batch_size]) for i in range(0, len(src), batch_size)
    ]


def evaluate_identity(
    train_pairs: Sequence[Pair], val_pairs: Sequence[Pair], settings: Mapping, seed: int
) -> dict:
    """The identity baseline's log row: its real loss on one epoch of train crops and the val crops."""
    check_pairs(train_pairs, "train")
    check_pairs(val_pairs, "val")
    t0 = time.perf_counter()
    crop = effective_crop(settings["crop"], [*train_pairs, *val_pairs])
    loss_fn = loss_function(settings["loss"])
    n_train = settings["steps_per_epoch"] * settings["batch_size"]
    train = RandomCropDataset(train_pairs, crop, n_train, seed)
    train_losses = [float(loss_fn(*train[i])) for i in range(n_train)]
    src, tgt = fixed_crops(val_pairs, crop, settings["val_steps"] * settings["batch_size"], seed)
    val = [float(loss_fn(a, b)) for a, b in _batches(src, tgt, settings["batch_size"])]
    return {
        "epoch": 0,
        "train_loss": float(np.mean(train_losses)),
        "val_loss": float(np.mean(val)),
        "lr": 0.0,
        "wall_s": time.perf_counter() - t0,
    }


def _accelerator(device: str) -> tuple[str, object]:
    if device == "cpu":
        return "cpu", 1
    if device.startswith("cuda"):
        return "gpu", [int(device.split(":")[1])] if ":" in device else 1
    raise ValueError(f"unsupported device {device!r} (expected cpu, cuda or cuda:N)")


def _make_module(model, settings, train_data, start_epoch, resume, on_epoch_end, extra):
    import lightning as L

    class VirtualStaining(L.LightningModule):
        """Phase → fluorescence regression; keeps the log, best weights and resume state."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.loss_fn = loss_function(settings["loss"])
            self.history = list(resume["history"]) if resume else []
            self.best = dict(resume["best"]) if resume else {"epoch": -1, "val_loss": math.inf}
            self.wall_offset = float(resume["wall_s"]) if resume else 0.0
            self._train, self._val = [], []

        def forward(self, x):
            return self.model(x)

        @property
        def global_epoch(self) -> int:
            return start_epoch + self.current_epoch

        def on_train_epoch_start(self):
            lr = learning_rate(settings, self.global_epoch)
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = lr
            train_data.set_epoch(self.global_epoch)
            self._train, self._val = [], []
            self._t0 = time.perf_counter()

        def training_step(self, batch, _):
            src, tgt = batch
            loss = self.loss_fn(self.model(src).float(), tgt)
            self._train.append(loss.detach())
            return loss

        def validation_step(self, batch, _):
            src, tgt = batch
            self._val.append(self.loss_fn(self.model(src).float(), tgt).detach())

        def on_train_epoch_end(self):
            if not self._val:
                raise RuntimeError("validation did not run before the end of the epoch")
            epoch = self.global_epoch
            val_loss = float(torch.stack(self._val).mean())
            if not math.isfinite(val_loss):
                raise RuntimeError(
                    f"validation loss is {val_loss} at epoch {epoch}: training diverged "
                    "(try a lower lr)"
                )
            self.wall_offset += time.perf_counter() - self._t0
            self.history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(torch.stack(self._train).mean()),
                    "val_loss": val_loss,
                    "lr": learning_rate(settings, epoch),
                    "wall_s": self.wall_offset,
                }
            )
            if val_loss < self.best["val_loss"]:
                self.best = {
                    "epoch": epoch,
                    "val_loss": val_loss,
                    "state_dict": {
                        k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                    },
                }
            self.final_state = self.last_state()
            if on_epoch_end is not None:
                on_epoch_end(self.final_state)

        def last_state(self) -> dict:
            opt = self.optimizers().optimizer.state_dict()
            return checkpoint(
                settings,
                self.model.state_dict(),
                self.history[-1]["epoch"],
                self.history[-1]["val_loss"],
                optimizer=_to_cpu(opt),
                best=self.best,
                history=self.history,
                wall_s=self.wall_offset,
                **extra,
            )

        def configure_optimizers(self):
            opt = torch.optim.AdamW(
                self.model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"]
            )
            if resume:
                opt.load_state_dict(resume["optimizer"])
            return opt

    return VirtualStaining()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def train_model(
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    settings: Mapping,
    seed: int,
    device: str = "cpu",
    *,
    resume: Mapping | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    root_dir: str | None = None,
    callbacks: Sequence = (),
    extra: Mapping | None = None,
) -> dict:
    """Train a unet model; return the final resume state (with 'best' and 'history').

    `resume` is a previous return value / on_epoch_end state (a last.ckpt): its
    weights, optimizer, best score and log are restored and training continues
    at the next epoch. `extra` entries are copied into every checkpoint dict.
    """
    import lightning as L

    settings = dict(settings)
    extra = dict(extra or {})
    check_pairs(train_pairs, "train")
    check_pairs(val_pairs, "val")
    if settings["arch"] == "identity":
        raise InputError("the identity model has nothing to train: use evaluate_identity")
    settings["crop"] = training_crop(settings, [*train_pairs, *val_pairs])
    bs = settings["batch_size"]
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model(settings["arch"], model_config(settings))
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        start_epoch = int(resume["epoch"]) + 1
    crop = settings["crop"]
    train_data = RandomCropDataset(train_pairs, crop, settings["steps_per_epoch"] * bs, seed)
    val_src, val_tgt = fixed_crops(val_pairs, crop, settings["val_steps"] * bs, seed)
    module = _make_module(model, settings, train_data, start_epoch, resume, on_epoch_end, extra)
    if start_epoch >= settings["epochs"]:
        return dict(resume)

    accelerator, devices = _accelerator(device)
    loader = torch.utils.data.DataLoader(train_data, batch_size=bs, shuffle=False, num_workers=0)
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(val_src, val_tgt), batch_size=bs, shuffle=False
    )
    trainer = L.Trainer(
        max_epochs=settings["epochs"] - start_epoch,
        limit_train_batches=settings["steps_per_epoch"],
        limit_val_batches=settings["val_steps"],
        num_sanity_val_steps=0,
        accelerator=accelerator,
        devices=devices,
        precision="bf16-mixed" if accelerator == "gpu" else "32-true",
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
        callbacks=list(callbacks),
    )
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")
            trainer.fit(module, loader, val_loader)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return module.final_state
