"""Deep per-cell features: cell crops, a contrastive encoder the pipeline trains itself, and
the extractor registry (the trained encoder, or a local TorchScript model a user names).

Crops (`cell_crops`): per cell, the maximum over Z of the image within the cell's own voxels
(so planes above or below it do not leak in), on its footprint (its labels projected over
Z), min–max scaled within the footprint to [0, 1], zero outside it, a fixed `size`² window
centred on the footprint's centroid, zero-padded at the FOV edges.
GT and prediction crops use the same labels, so embeddings pair up by (fov, t, cell_id).

Encoder (`CellEncoder`): four conv–BN–ReLU blocks with 2× pooling and a global average pool
to `dim` features; trained SimCLR-style (`train_encoder`): two augmented views of every crop
in a batch (random flip and 90° rotation, intensity scale ±20 %, Gaussian noise σ 0.05,
shift by up to 2 px), a projection head, NT-Xent loss at `temperature`. Everything draws from
one seeded generator, so training is deterministic on the CPU. The embedding is the
encoder's output before the projection head (the usual choice for SimCLR features).

An extractor maps crops (N, 1, H, W) to (N, D). The trained encoder is saved as a plain
checkpoint (`vsbench-encoder/1`: its settings and weights, read back with
`torch.load(weights_only=True)`); a user's local TorchScript model (DINOv3, DynaCLR,
CELL-DINO exported to TorchScript) is loaded from disk only; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vsbench.io import InputError

EXTRACTORS = ("trained", "torchscript", "none")
ENCODER_FORMAT = "vsbench-encoder/1"
ENCODER_DEFAULTS = {
    "kind": "trained",
    "path": None,
    "crop": 32,
    "dim": 32,
    "steps": 200,
    "batch_size": 64,
    "lr": 0.002,
    "temperature": 0.2,
}


def encoder_settings(settings: Mapping | None) -> dict:
    s = {**ENCODER_DEFAULTS, **dict(settings or {})}
    if s["kind"] not in EXTRACTORS:
        raise InputError(
            f"features.encoder.kind {s['kind']!r} unknown (expected one of {EXTRACTORS})"
        )
    if s["kind"] == "torchscript" and not s.get("path"):
        raise InputError("features.encoder.kind 'torchscript' needs features.encoder.path")
    for key in ("crop", "dim", "steps", "batch_size"):
        s[key] = int(s[key])
        if s[key] < 1:
            raise InputError(f"features.encoder.{key} must be >= 1, got {s[key]}")
    return s


def cell_crops(
    image: np.ndarray, labels: np.ndarray, size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(cell ids, crops (N, size, size) float32) of one (Z, Y, X) image (see the module doc)."""
    from scipy import ndimage as ndi

    image, labels = np.asarray(image, dtype=np.float32), np.asarray(labels)
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be equal ZYX shapes")
    ids = np.unique(labels[labels > 0])
    crops = np.zeros((len(ids), size, size), dtype=np.float32)
    if not len(ids):
        return ids.astype(np.int64), crops
    half = size // 2
    foot = (labels > 0).any(axis=0)
    owner = np.where(foot, labels.max(axis=0), 0)  # for the centroids only
    centres = ndi.center_of_mass(np.ones(owner.shape), owner, ids)
    pad = ((0, 0), (half, half), (half, half))
    padded_img, padded_lab = np.pad(image, pad), np.pad(labels, pad)
    for k, (cid, (cy, cx)) in enumerate(zip(ids, centres, strict=True)):
        if not np.isfinite(cy):  # a label hidden under another in every column
            cy, cx = np.argwhere(labels == cid)[:, 1:].mean(axis=0)
        y0, x0 = int(round(cy)), int(round(cx))  # window [c - half, c + half) in padded coords
        inside = padded_lab[:, y0 : y0 + size, x0 : x0 + size] == cid
        mask = inside.any(axis=0)
        win = np.where(inside, padded_img[:, y0 : y0 + size, x0 : x0 + size], -np.inf).max(axis=0)
        vals = win[mask]
        lo, hi = float(vals.min()), float(vals.max())
        if hi > lo:
            crops[k][mask] = (vals - lo) / (hi - lo)
    return ids.astype(np.int64), crops


def build_encoder(dim: int = 32):
    import torch
    from torch import nn

    class CellEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c_in = [], 1
            for c_out in (16, 32, 64, 64):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True), nn.MaxPool2d(2)]  # fmt: skip
                c_in = c_out
            self.features = nn.Sequential(*layers)
            self.out = nn.Linear(64, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.features(x).mean(dim=(-2, -1)))

    return CellEncoder()


def augment(x, generator):
    """Two-view augmentation of a (B, 1, H, W) batch (see the module doc), seeded."""
    import torch

    b = x.shape[0]
    out = x.clone()
    k = torch.randint(0, 4, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    shift = torch.randint(-2, 3, (b, 2), generator=generator)
    for i in range(b):
        v = torch.rot90(out[i], int(k[i]), dims=(-2, -1))
        if flip[i]:
            v = torch.flip(v, dims=(-1,))
        out[i] = torch.roll(v, (int(shift[i, 0]), int(shift[i, 1])), dims=(-2, -1))
    scale = 1.0 + 0.4 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return out * scale + 0.05 * torch.randn(out.shape, generator=generator)


def nt_xent(z1, z2, temperature: float):
    """SimCLR's normalized-temperature cross entropy over 2B views (positives: the pair)."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_encoder(crops: np.ndarray, settings: Mapping, seed: int = 0):
    """(encoder in eval mode, per-step loss list) trained contrastively on (N, H, W) crops."""
    import torch
    from torch import nn

    s = encoder_settings(settings)
    if len(crops) < 2:
        raise InputError(f"the encoder needs at least 2 cell crops to train, got {len(crops)}")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        encoder = build_encoder(s["dim"])
        head = nn.Sequential(
            nn.Linear(s["dim"], s["dim"]), nn.ReLU(), nn.Linear(s["dim"], s["dim"])
        )
        params = [*encoder.parameters(), *head.parameters()]
        opt = torch.optim.AdamW(params, lr=float(s["lr"]), weight_decay=1e-4)
        data = torch.as_tensor(np.asarray(crops, dtype=np.float32))[:, None]
        bs = min(s["batch_size"], len(data))
        losses = []
        encoder.train()
        for _ in range(s["steps"]):
            idx = torch.randperm(len(data), generator=gen)[:bs]
            batch = data[idx]
            v1, v2 = augment(batch, gen), augment(batch, gen)
            loss = nt_xent(head(encoder(v1)), head(encoder(v2)), float(s["temperature"]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        torch.use_deterministic_algorithms(was)
    encoder.eval()
    encoder.dim = s["dim"]
    return encoder, losses


def encoder_checkpoint(encoder) -> dict:
    """The trained encoder as tensors and primitives (loadable with weights_only=True)."""
    return {
        "format": ENCODER_FORMAT,
        "dim": int(encoder.dim),
        "state_dict": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
    }


def load_extractor(path):
    """The extractor in a local file: a vsbench encoder checkpoint or the user's TorchScript
    model; every problem is an InputError naming the file."""
    import warnings
    from pathlib import Path

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: feature extractor not found (a local checkpoint or TorchScript file)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a plain checkpoint: a TorchScript archive, or garbage
        ckpt = None
    if isinstance(ckpt, dict) and ckpt.get("format") == ENCODER_FORMAT:
        model = build_encoder(int(ckpt["dim"]))
        result = model.load_state_dict(ckpt["state_dict"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise InputError(
                f"{path}: encoder weights do not fit (missing {result.missing_keys[:3]})"
            )
        return model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises several types for a non-TorchScript file
        raise InputError(
            f"{path}: neither a vsbench encoder nor a TorchScript model ({exc})"
        ) from exc
    return model.eval()


def embed(extractor, crops: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """(N, D) float64 embeddings of (N, H, W) crops, in batches (across FOVs and timepoints)."""
    import torch

    if not len(crops):
        return np.zeros((0, 0))
    extractor = extractor.to(device)
    out = []
    with torch.no_grad():
        for k in range(0, len(crops), batch_size):
            x = torch.as_tensor(
                np.asarray(crops[k : k + batch_size], dtype=np.float32), device=device
            )[:, None]
            e = extractor(x)
            if e.ndim != 2 or e.shape[0] != x.shape[0]:
                raise InputError(
                    f"feature extractor returned shape {tuple(e.shape)} for {tuple(x.shape)}"
                )
            out.append(e.double().cpu().numpy())
    return np.concatenate(out)
