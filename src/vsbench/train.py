"""Training: random-crop data over HCS OME-Zarr FOVs, a Lightning loop, plain-dict checkpoints.

Inputs are normalized (source, target) pairs of (T, Z, Y, X) float32 arrays, one per
FOV (`load_split` reads them through vsbench.io with the stored statistics;
`VirtualStainingData` is the Lightning DataModule over them). Checkpoints are plain
dicts of tensors and primitives so `torch.load(weights_only=True)` reads them; the step
script writes them (atomically) through the `on_epoch_end` hook.

Regression architectures train with automatic optimisation (optionally accumulating
gradients); an `adversarial` architecture (pix2pix3d) trains with manual optimisation:
per batch one discriminator step, then one generator step, D's learning rate a tenth of
G's. Every architecture reports the same `val_loss`: the configured loss of its
prediction on the fixed validation crops. Early stopping (`patience` epochs without a
better `val_loss`) and an external stop request (SIGTERM/SIGUSR1, see `train_model`)
end training at an epoch boundary: an interrupted epoch is discarded, so the last
checkpoint is always a complete epoch and a resumed run repeats exactly what was lost.

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
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from vsbench.io import InputError
from vsbench.models import ARCHS, REGISTRY, build_model, model_config
from vsbench.models.losses import LOSSES
from vsbench.models.losses import loss_function as _loss_function

CHECKPOINT_FORMAT = "vsbench-model/1"
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "wall_s", "d_loss", "g_loss")
NORMALIZATIONS = ("median_iqr", "mean_std", "p1_p99")
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
    "patience": 0,
    "accumulate": 1,
    "compile": False,
    "num_workers": 0,
    "input_norm": "median_iqr",
    "target_norm": "median_iqr",
    "augment": True,
    "intensity_scale": 0.0,
    "intensity_shift": 0.0,
    "noise_std": 0.0,
    "foreground_fraction": 0.0,
    "foreground_threshold": 1.0,
    "devices": "auto",
}
INT_KEYS = (
    "base_channels",
    "depth",
    "epochs",
    "steps_per_epoch",
    "val_steps",
    "batch_size",
    "accumulate",
)
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
    for key in INT_KEYS:
        s[key] = int(s[key])
        if s[key] < 1:
            raise InputError(f"model {key} must be >= 1, got {s[key]}")
    s["patience"], s["num_workers"] = int(s["patience"]), int(s["num_workers"])
    for key in ("lr", "weight_decay", "intensity_scale", "intensity_shift", "noise_std",
                "foreground_fraction", "foreground_threshold"):  # fmt: skip
        s[key] = float(s[key])
    for key in ("input_norm", "target_norm"):
        if s[key] not in NORMALIZATIONS:
            raise InputError(
                f"model {key} {s[key]!r} is unknown (expected one of {NORMALIZATIONS})"
            )
    if not 0.0 <= s["foreground_fraction"] <= 1.0:
        raise InputError(
            f"model foreground_fraction must be in [0, 1], got {s['foreground_fraction']}"
        )
    if s["accumulate"] > 1 and getattr(REGISTRY[s["arch"]].cls, "adversarial", False):
        raise InputError(
            f"model arch {s['arch']!r}: accumulate > 1 is not supported (manual optimisation)"
        )
    s["compile"], s["augment"] = bool(s["compile"]), bool(s["augment"])
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


def foreground_index(pairs: Sequence[Pair], threshold: float, stride: int = 4) -> list[np.ndarray]:
    """Per pair, (N, 4) voxel indices (t, z, y, x) where the target exceeds `threshold`
    (normalized units; every `stride`-th pixel in Y and X, which bounds the memory)."""
    out = []
    for _, tgt in pairs:
        idx = np.argwhere(tgt[..., ::stride, ::stride] > threshold)
        idx[:, 2:] *= stride
        out.append(idx)
    return out


def sample_crop(
    pairs: Sequence[Pair],
    crop: Sequence[int],
    rng: np.random.Generator,
    augment: bool,
    settings: Mapping | None = None,
    foreground: Sequence[np.ndarray] | None = None,
) -> Pair:
    """One random (source, target) crop (Z, Y, X).

    Geometric augmentation (`augment`) is the XY dihedral group, applied to both: Y/X flips
    and 90° XY rotations, never Z (the optical axis is not symmetric for a brightfield-
    derived phase). With `settings`, the source alone also gets an intensity scale
    (1 ± intensity_scale), shift (± intensity_shift) and Gaussian noise (noise_std), and
    with probability foreground_fraction the crop is centred on a random `foreground` voxel.
    """
    s = settings or {}
    k_pair = int(rng.integers(len(pairs)))
    src, tgt = pairs[k_pair]
    fg = foreground[k_pair] if foreground is not None else None
    if fg is not None and len(fg) and rng.random() < float(s.get("foreground_fraction", 0.0)):
        t, *centre = fg[int(rng.integers(len(fg)))]
        starts = [
            int(np.clip(c - size // 2, 0, n - size))
            for c, size, n in zip(centre, crop, src.shape[1:], strict=True)
        ]
    else:
        t = int(rng.integers(src.shape[0]))
        starts = [int(rng.integers(n - c + 1)) for n, c in zip(src.shape[1:], crop, strict=True)]
    sl = tuple(slice(st, st + c) for st, c in zip(starts, crop, strict=True))
    a, b = src[t][sl], tgt[t][sl]
    if augment:
        k = int(rng.integers(4)) if crop[1] == crop[2] else 2 * int(rng.integers(2))
        flip_y, flip_x = bool(rng.integers(2)), bool(rng.integers(2))
        a, b = np.rot90(a, k, axes=(1, 2)), np.rot90(b, k, axes=(1, 2))
        if flip_y:
            a, b = a[:, ::-1], b[:, ::-1]
        if flip_x:
            a, b = a[:, :, ::-1], b[:, :, ::-1]
    a = np.ascontiguousarray(a, np.float32)
    scale, shift, noise = (
        float(s.get(k, 0.0)) for k in ("intensity_scale", "intensity_shift", "noise_std")
    )
    if scale or shift:
        a = a * np.float32(1.0 + rng.uniform(-scale, scale)) + np.float32(
            rng.uniform(-shift, shift)
        )
    if noise:
        a = a + rng.normal(0.0, noise, size=a.shape).astype(np.float32)
    return a.astype(np.float32, copy=False), np.ascontiguousarray(b, np.float32)


class RandomCropDataset(torch.utils.data.Dataset):
    """`length` augmented crops per epoch; call set_epoch so each epoch draws new ones.

    Crop i of epoch e comes from a generator seeded by (seed, e, i) alone, so the data are
    the same with any number of worker processes, and a resumed run sees the same crops.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        crop: Sequence[int],
        length: int,
        seed: int,
        settings: Mapping | None = None,
    ):
        self.pairs, self.crop, self.length, self.seed = list(pairs), list(crop), length, seed
        self.settings = dict(settings or {})
        self.augment = bool(self.settings.get("augment", True))
        fraction = float(self.settings.get("foreground_fraction", 0.0))
        self.foreground = (
            foreground_index(self.pairs, float(self.settings.get("foreground_threshold", 1.0)))
            if fraction > 0
            else None
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, 1, self.epoch, int(i)])
        a, b = sample_crop(self.pairs, self.crop, rng, self.augment, self.settings, self.foreground)
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


def load_split(entry: Mapping, split: str, input_norm: str, target_norm: str) -> list[Pair]:
    """Normalized (Phase3D, target) (T, Z, Y, X) pairs of one dataset's split, read from its
    HCS stores with each FOV's own stored statistics. `entry`: phase, fluorescence, channel
    and the split's FOV list (the rule's `params.data` item)."""
    from vsbench import io
    from vsbench.preprocess import normalize

    def stats(pos, channel, where):
        try:
            return io.channel_statistics(pos, channel)["fov_statistics"]
        except (InputError, KeyError) as exc:
            raise InputError(f"{where}: no fov_statistics for channel {channel!r} ({exc})") from exc

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
                raise InputError(
                    f"{where_p}: Phase3D shape {src.shape} differs from {entry['channel']} "
                    f"{tgt.shape} in {entry['fluorescence']}"
                )
            src = normalize(src.astype(np.float32), stats(p_pos, "Phase3D", where_p), input_norm)
            tgt = normalize(
                tgt.astype(np.float32), stats(f_pos, entry["channel"], where_f), target_norm
            )
            for arr, what in ((src, where_p), (tgt, where_f)):
                if not np.isfinite(arr).all():
                    raise InputError(f"{what}: non-finite values after normalization")
            pairs.append((np.ascontiguousarray(src, np.float32), np.ascontiguousarray(tgt)))
    return pairs


def data_module(train_pairs, val_pairs, settings: Mapping, seed: int):
    """The Lightning DataModule: random training crops, fixed validation crops."""
    import lightning as L

    bs = int(settings["batch_size"])
    crop = list(settings["crop"])

    class VirtualStainingData(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.train = RandomCropDataset(
                train_pairs,
                crop,
                settings["steps_per_epoch"] * bs * settings["accumulate"],
                seed,
                settings,
            )
            self.val = torch.utils.data.TensorDataset(
                *fixed_crops(val_pairs, crop, settings["val_steps"] * bs, seed)
            )

        def train_dataloader(self):
            workers = int(settings["num_workers"])
            return torch.utils.data.DataLoader(
                self.train, batch_size=bs, shuffle=False, num_workers=workers,
                persistent_workers=False,
            )  # fmt: skip

        def val_dataloader(self):
            return torch.utils.data.DataLoader(self.val, batch_size=bs, shuffle=False)

    return VirtualStainingData()


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss by name (see vsbench.models.losses)."""
    return _loss_function(name)


def epochs_without_progress(history: Sequence[Mapping], min_delta: float = 1e-4) -> int:
    """Epochs since val_loss last fell by more than `min_delta` (relative): early stopping's
    clock, a pure function of the log, so a resumed run stops where an uninterrupted one would."""
    best, last = math.inf, -1
    for h in history:
        if h["val_loss"] < best - min_delta * abs(
            best if math.isfinite(best) else 0.0
        ) or not math.isfinite(best):
            best, last = h["val_loss"], h["epoch"]
    return int(history[-1]["epoch"]) - last if history else 0


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
        "normalization": settings.get("input_norm", "median_iqr"),
        "target_normalization": settings.get("target_norm", "median_iqr"),
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
        "d_loss": math.nan,
        "g_loss": math.nan,
    }


class TrainingInterrupted(RuntimeError):
    """Training was asked to stop (a signal); `epoch` is the last complete one (or None)."""

    def __init__(self, epoch: int | None):
        self.epoch = epoch
        done = f"after epoch {epoch}" if epoch is not None else "before its first epoch ended"
        super().__init__(f"training stopped on request {done}; a rerun resumes from last.ckpt")


def distributed_plan(device: str, devices="auto", environ=None, n_cuda: int | None = None) -> dict:
    """Lightning's accelerator / devices / strategy / cluster environment for one job.

    On CUDA, ``devices: auto`` uses every GPU the job sees; more than one means DDP, with
    one rank per GPU. Under SLURM the step's task count decides: a step that srun started
    as one task per GPU runs one rank per task, the way Lightning expects; a one-task step
    (Snakemake's SLURM executor runs every job as `srun -n1`, also inside a 4-task
    allocation) lets Lightning start the other ranks itself.
    Lightning's SIGUSR1 auto-requeue is always off: Snakemake's retries resume instead.
    """
    env = os.environ if environ is None else environ
    if device == "cpu":
        return {"accelerator": "cpu", "devices": 1, "strategy": "auto", "cluster": "default"}
    if not device.startswith("cuda"):
        raise ValueError(f"unsupported device {device!r} (expected cpu, cuda or cuda:N)")
    if ":" in device:
        return {"accelerator": "gpu", "devices": [int(device.split(":")[1])], "strategy": "auto",
                "cluster": "default"}  # fmt: skip
    if n_cuda is None:
        n_cuda = torch.cuda.device_count()
    n = n_cuda if devices in (None, "auto") else int(devices)
    if n < 1 or n > n_cuda:
        raise InputError(f"model devices {devices!r}: this job sees {n_cuda} GPU(s)")
    slurm_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    cluster = "default"
    if "SLURM_JOB_ID" in env:
        if slurm_tasks > 1 and slurm_tasks != n:
            raise InputError(
                f"SLURM step has {slurm_tasks} tasks for {n} GPU(s): start one task per "
                "GPU (one DDP rank per task), or one task"
            )
        cluster = "slurm" if slurm_tasks > 1 else "lightning"
    return {"accelerator": "gpu", "devices": n, "strategy": "ddp" if n > 1 else "auto",
            "cluster": cluster}  # fmt: skip


def is_global_zero(environ=None) -> bool:
    """Whether this process is DDP rank 0 (only rank 0 writes outputs): every rank variable
    that is set (torch's RANK, SLURM's task id, Lightning's LOCAL_RANK for the ranks it
    starts itself) is 0."""
    env = os.environ if environ is None else environ
    return all(int(env.get(k) or 0) == 0 for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def _make_module(model, settings, start_epoch, resume, on_epoch_end, extra):
    import lightning as L

    from vsbench.models.pix2pix3d import D_LR_FRACTION, discriminator_loss, generator_loss

    adversarial = bool(getattr(model, "adversarial", False))

    class VirtualStaining(L.LightningModule):
        """Phase → fluorescence; keeps the log, best weights and resume state."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.net = torch.compile(model) if settings["compile"] else model
            self.automatic_optimization = not adversarial
            self.loss_fn = loss_function(settings["loss"])
            self.history = list(resume["history"]) if resume else []
            self.best = dict(resume["best"]) if resume else {"epoch": -1, "val_loss": math.inf}
            self.wall_offset = float(resume["wall_s"]) if resume else 0.0
            self.interrupted = False
            self.final_state = dict(resume) if resume else None
            self._train, self._val, self._d, self._g = [], [], [], []

        def forward(self, x):
            return self.net(x)

        @property
        def global_epoch(self) -> int:
            return start_epoch + self.current_epoch

        def _optimizers(self):
            opts = self.optimizers()
            return list(opts) if isinstance(opts, list | tuple) else [opts]

        def on_train_epoch_start(self):
            lr = learning_rate(settings, self.global_epoch)
            for k, opt in enumerate(self._optimizers()):
                for group in opt.optimizer.param_groups:
                    group["lr"] = lr * (D_LR_FRACTION if k == 1 else 1.0)
            self.trainer.datamodule.train.set_epoch(self.global_epoch)
            self._train, self._val, self._d, self._g = [], [], [], []
            self._t0 = time.perf_counter()

        def training_step(self, batch, _):
            src, tgt = batch
            if not adversarial:
                loss = self.loss_fn(self.net(src).float(), tgt)
                self._train.append(loss.detach())
                return loss
            opt_g, opt_d = self._optimizers()
            fake = self.model.generator(src)
            d = self.model.discriminator
            d_loss = discriminator_loss(d(src, tgt), d(src, fake.detach()))
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            g_loss = generator_loss(d(src, fake), fake, tgt, self.model.l1_weight)
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
            self._train.append(self.loss_fn(fake.detach().float(), tgt))
            self._d.append(d_loss.detach())
            self._g.append(g_loss.detach())
            return None

        def validation_step(self, batch, _):
            src, tgt = batch
            self._val.append(self.loss_fn(self.net(src).float(), tgt).detach())

        def on_train_epoch_end(self):
            if self.interrupted:  # a partial epoch is not recorded: resume repeats it whole
                return
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
            mean = lambda xs: float(torch.stack(xs).mean()) if xs else math.nan  # noqa: E731
            self.history.append(
                {
                    "epoch": epoch,
                    "train_loss": mean(self._train),
                    "val_loss": val_loss,
                    "lr": learning_rate(settings, epoch),
                    "wall_s": self.wall_offset,
                    "d_loss": mean(self._d),
                    "g_loss": mean(self._g),
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
            patience = settings["patience"]
            self.stopped_early = patience > 0 and epochs_without_progress(self.history) >= patience
            if self.stopped_early:
                self.trainer.should_stop = True
            self.final_state = self.last_state()
            if on_epoch_end is not None and self.trainer.is_global_zero:
                on_epoch_end(self.final_state)

        def last_state(self) -> dict:
            opts = [_to_cpu(o.optimizer.state_dict()) for o in self._optimizers()]
            return checkpoint(
                settings,
                self.model.state_dict(),
                self.history[-1]["epoch"],
                self.history[-1]["val_loss"],
                optimizer=opts[0] if len(opts) == 1 else opts,
                best=self.best,
                history=self.history,
                wall_s=self.wall_offset,
                stopped_early=bool(getattr(self, "stopped_early", False)),
                **extra,
            )

        def configure_optimizers(self):
            lr, wd = settings["lr"], settings["weight_decay"]
            if adversarial:  # pix2pix's Adam betas; TTUR: D at a tenth of G's rate
                opts = [
                    torch.optim.AdamW(self.model.generator.parameters(), lr=lr, betas=(0.5, 0.999), weight_decay=wd),
                    torch.optim.AdamW(self.model.discriminator.parameters(), lr=lr * D_LR_FRACTION,
                                      betas=(0.5, 0.999), weight_decay=wd),
                ]  # fmt: skip
            else:
                opts = [torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=wd)]
            if resume:
                states = resume["optimizer"] if adversarial else [resume["optimizer"]]
                for opt, state in zip(opts, states, strict=True):
                    opt.load_state_dict(state)
            return opts if adversarial else opts[0]

    return VirtualStaining()


class _StopWhenAsked:
    """Lightning callback: end training at the next batch when `should_stop()` says so."""

    def __new__(cls, should_stop):
        import lightning as L

        class StopWhenAsked(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args):
                if should_stop():
                    pl_module.interrupted = True
                    trainer.should_stop = True

        return StopWhenAsked()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _plugins(cluster: str) -> list:
    from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

    if cluster == "slurm":
        return [SLURMEnvironment(auto_requeue=False)]
    if cluster == "lightning" or SLURMEnvironment.detect():
        return [LightningEnvironment()]
    return []


def train_model(
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    settings: Mapping,
    seed: int,
    device: str = "cpu",
    *,
    resume: Mapping | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    root_dir: str | None = None,
    callbacks: Sequence = (),
    extra: Mapping | None = None,
) -> dict:
    """Train a model; return the final resume state (with 'best' and 'history').

    `resume` is a previous return value / on_epoch_end state (a last.ckpt): its weights,
    optimizer(s), best score and log are restored and training continues at the next
    epoch. `should_stop` is polled after every batch (the step wires it to SIGTERM/SIGUSR1):
    when it returns True the current epoch is abandoned and `TrainingInterrupted` is raised;
    the last `on_epoch_end` state (last.ckpt) is then the last complete epoch. `extra`
    entries go into every checkpoint.
    """
    import lightning as L

    settings = dict(settings)
    extra = dict(extra or {})
    check_pairs(train_pairs, "train")
    check_pairs(val_pairs, "val")
    if settings["arch"] == "identity":
        raise InputError("the identity model has nothing to train: use evaluate_identity")
    settings["crop"] = training_crop(settings, [*train_pairs, *val_pairs])
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model(settings["arch"], model_config(settings))
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        start_epoch = int(resume["epoch"]) + 1
    module = _make_module(model, settings, start_epoch, resume, on_epoch_end, extra)
    done = resume is not None and (
        start_epoch >= settings["epochs"] or bool(resume.get("stopped_early"))
    )
    if done:
        return dict(resume)

    plan = distributed_plan(device, settings.get("devices", "auto"))
    step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "-")
    log.info("distributed plan %s (SLURM step tasks: %s)", plan, step_tasks)
    data = data_module(train_pairs, val_pairs, settings, seed)
    stop = [_StopWhenAsked(should_stop)] if should_stop is not None else []
    trainer = L.Trainer(
        max_epochs=settings["epochs"] - start_epoch,
        limit_train_batches=settings["steps_per_epoch"] * settings["accumulate"],
        limit_val_batches=settings["val_steps"],
        accumulate_grad_batches=settings["accumulate"],
        num_sanity_val_steps=0,
        accelerator=plan["accelerator"],
        devices=plan["devices"],
        strategy=plan["strategy"],
        precision="bf16-mixed" if plan["accelerator"] == "gpu" else "32-true",
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
        callbacks=[*stop, *callbacks],
        plugins=_plugins(plan["cluster"]),
    )
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")
            trainer.fit(module, datamodule=data)
    except SIGTERMException:  # Lightning's own SIGTERM exit (a SystemExit with code 0)
        module.interrupted = True
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    if module.interrupted:
        done = module.final_state["epoch"] if module.final_state else None
        raise TrainingInterrupted(done)
    return dict(module.final_state)
