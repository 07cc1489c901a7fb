"""Prediction: load a vsbench checkpoint, sliding-window inference with blended tiles.

Tiles cover the whole Z stack and overlap in Y and X; each tile's output is
weighted by the tent of :mod:`vsbench.tiling`, so tile borders — where a
convolutional network sees padding instead of context — count least, and the
normalized weighted sum has no seams.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from vsbench.io import InputError
from vsbench.models import build_model
from vsbench.tiling import blend_weights, tile_origins, tile_starts
from vsbench.train import CHECKPOINT_FORMAT

REQUIRED_KEYS = ("format", "arch", "model_config", "state_dict")


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, checkpoint metadata without the weights).

    Reads only tensors and primitives (weights_only=True); every problem —
    missing file, not a checkpoint, wrong format, weights that do not fit the
    recorded architecture — is an InputError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-checkpoint
        text, tag = str(exc), "WeightsUnpickler error:"
        refused = tag in text  # torch's weights_only refusal: the reason follows the tag
        lines = [x.strip() for x in text.split(tag)[-1].splitlines() if x.strip()]
        reason = lines[0] if lines else type(exc).__name__
        reason = f"weights_only=True refused it: {reason}" if refused else reason
        raise InputError(f"{path}: not a readable torch checkpoint ({reason})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(f"{path}: expected a {CHECKPOINT_FORMAT!r} checkpoint, got {got!r}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise InputError(f"{path}: checkpoint lacks key(s) {missing}")
    try:
        model = build_model(ckpt["arch"], ckpt["model_config"])
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
    try:
        result = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()
        raise InputError(
            f"{path}: weights do not fit architecture {ckpt['arch']!r} ({first})"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{path}: weights do not fit architecture {ckpt['arch']!r} "
            f"(missing {list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]})"
        )
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "best")}
    return model, meta


def _divisibility(model: torch.nn.Module) -> tuple[int, int, int]:
    return tuple(int(d) for d in getattr(model, "divisibility", (1, 1, 1)))


@torch.inference_mode()
def predict_volume(
    model: torch.nn.Module,
    zyx: np.ndarray,
    tile_yx: int = 64,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: str = "cpu",
    tile_z: int | None = None,
    z_overlap: float = 0.5,
    weights: str = "tent",
) -> np.ndarray:
    """Predict one normalized (Z, Y, X) volume by overlapping 3D windows.

    Windows are `tile_z` slices (default: the model's own `z_window` if it has one, else
    the whole stack) by `tile_yx`², overlapping by `z_overlap` / `overlap`, blended with
    separable tent or Gaussian weights (`vsbench.tiling`). A window shallower than the
    model's Z divisibility is edge-padded and cropped back; windows are batched, so memory
    is bounded by the batch (plus the output). The accumulator has the model's output
    channels. Returns (Z, Y, X) for a one-channel model, (C, Z, Y, X) otherwise.
    """
    if zyx.ndim != 3:
        raise InputError(f"predict_volume expects a (Z, Y, X) volume, got shape {zyx.shape}")
    model.eval()
    Z, Y, X = zyx.shape
    dz = _divisibility(model)[0]
    tz = min(int(tile_z or getattr(model, "z_window", 0) or Z), Z)
    x = torch.from_numpy(np.ascontiguousarray(zyx, dtype=np.float32)).to(device)
    ty, tx = min(int(tile_yx), Y), min(int(tile_yx), X)
    origins = [
        (z0, y0, x0)
        for z0 in tile_starts(Z, tz, z_overlap)
        for y0, x0 in tile_origins((Y, X), tile_yx, overlap)
    ]
    w = torch.from_numpy(blend_weights(tz, ty, tx, kind=weights)).to(device)
    weight_sum = torch.zeros((Z, Y, X), dtype=torch.float32, device=device)
    pad_z = (-tz) % dz
    out = None
    use_bf16 = torch.device(device).type == "cuda"
    for i in range(0, len(origins), batch_size):
        chunk = origins[i : i + batch_size]
        batch = torch.stack([x[z0 : z0 + tz, y0 : y0 + ty, x0 : x0 + tx] for z0, y0, x0 in chunk])
        batch = batch[:, None]
        if pad_z:
            batch = torch.nn.functional.pad(batch, (0, 0, 0, 0, 0, pad_z), mode="replicate")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            pred = model(batch)
        pred = pred.float()[:, :, :tz]
        if out is None:
            out = torch.zeros((pred.shape[1], Z, Y, X), dtype=torch.float32, device=device)
        for p, (z0, y0, x0) in zip(pred, chunk, strict=True):
            out[:, z0 : z0 + tz, y0 : y0 + ty, x0 : x0 + tx] += p * w
            weight_sum[z0 : z0 + tz, y0 : y0 + ty, x0 : x0 + tx] += w
    out = (out / weight_sum).cpu().numpy()
    return out[0] if out.shape[0] == 1 else out
