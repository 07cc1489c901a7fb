"""Per-subtile optimisation of the illumination tilt and focus, all subtiles in one batch.

The unknowns of each subtile are (zenith, azimuth, z_offset): the tilt angles of the
illumination (radians, the ``"physical"`` convention of :mod:`vsbench.reconstruct.inverse`)
and the focus offset in z slices (z positions ``(−arange(Z) + Z//2 + z_offset)·dz``, as
waveorder's ``api.phase.optimize``). The objective is a sharpness loss
(:mod:`vsbench.reconstruct.losses`, default mid-band power) of the thin-3D phase that the
closed-form Tikhonov inverse reconstructs at those parameters, with a soft pupil (steepness
100) so the loss is smooth. Subtiles are independent, so the batch loss is the sum of the
per-tile losses: one forward/backward pass gives every tile's gradient (and, by one more
backward per parameter, its diagonal curvature), like B independent optimisers.

Methods:

- ``nadam``: torch's NAdam with one parameter group per unknown, learning rate per unknown.
- ``newton``: diagonal Newton with Levenberg–Marquardt damping, per tile: step
  ``δ = −g / (|h|·(1 + μ))`` (``|h|`` so a concave region still steps downhill), clipped to
  ``step_cap``; a step is kept only if the loss falls, then ``μ ← max(μ/3, damping_floor)``,
  else ``μ ← 4μ`` and the tile retries from where it was.

A learning rate of 0 freezes an unknown (it is still passed to the forward model at its
initial value; with ``newton`` the rates only say which unknowns move). Every tile keeps the
best parameters it has evaluated and stops when its loss has improved by less than
``tolerance`` (relative) for ``patience`` iterations. A negative zenith is a tilt towards
azimuth + π; results are reported with zenith ≥ 0 and azimuth in [0, 2π).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vsbench.reconstruct.inverse import (
    CONVENTIONS,
    data_spectrum,
    filter_spectrum,
    half_filter,
)
from vsbench.reconstruct.losses import LOSSES, loss_function

PARAMETERS = ("zenith", "azimuth", "z_offset")
METHODS = ("nadam", "newton")
DEFAULT_LR = {"zenith": 0.01, "azimuth": 0.05, "z_offset": 0.05}
DEFAULT_STEP_CAP = {"zenith": 0.05, "azimuth": 1.5, "z_offset": 0.5}


@dataclass(frozen=True)
class OptimizeSettings:
    """How one batch of subtiles is optimised (the config's ``reconstruct.optimize``)."""

    method: str = "newton"
    lr: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    max_iterations: int = 30
    tolerance: float = 1e-3
    patience: int = 3
    regularization: float = 1e-3
    loss: str = "residual"
    loss_band: tuple[float, float] = (0.125, 0.25)
    pupil_steepness: float = 100.0
    damping: float = 1e-2
    damping_floor: float = 1e-4
    step_cap: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_STEP_CAP))
    batch_size: int = 64  # tiles (or candidates) per forward pass: bounds memory

    def __post_init__(self):
        # a partial table names the rates that differ from the defaults
        for name, default in (("lr", DEFAULT_LR), ("step_cap", DEFAULT_STEP_CAP)):
            object.__setattr__(self, name, {**default, **dict(getattr(self, name))})
        if self.method not in METHODS:
            raise ValueError(f"optimize.method must be one of {METHODS}, got {self.method!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"optimize.loss must be one of {LOSSES}, got {self.loss!r}")
        for name, table in (("lr", self.lr), ("step_cap", self.step_cap)):
            unknown = set(table) - set(PARAMETERS)
            if unknown:
                raise ValueError(f"optimize.{name}: unknown parameter(s) {sorted(unknown)}")
            if any(float(v) < 0 for v in table.values()):
                raise ValueError(f"optimize.{name} values must be >= 0, got {dict(table)}")
        if self.max_iterations < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError("optimize: max_iterations, patience and batch_size must be >= 1")

    @classmethod
    def from_config(cls, mapping: Mapping | None) -> OptimizeSettings:
        m = dict(mapping or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(m) - known
        if unknown:
            raise ValueError(f"reconstruct.optimize: unknown key(s) {sorted(unknown)}")
        if "loss_band" in m:
            m["loss_band"] = tuple(float(b) for b in m["loss_band"])
        return cls(**m)

    def rates(self) -> dict[str, float]:
        return {p: float(self.lr[p]) for p in PARAMETERS}

    def free(self) -> list[str]:
        return [p for p, r in self.rates().items() if r > 0]


@dataclass
class TiltFit:
    """Per-tile result arrays (length B)."""

    zenith: np.ndarray
    azimuth: np.ndarray
    z_offset: np.ndarray
    loss: np.ndarray
    iterations: np.ndarray  # loss evaluations (the last `patience` of them found no progress)
    converged_at: np.ndarray  # the last iteration that improved the loss by more than tolerance
    converged: np.ndarray
    skipped: np.ndarray
    method: str
    wall_s: float
    history: list[np.ndarray] = field(default_factory=list)  # per iteration, loss of each tile

    def __len__(self) -> int:
        return len(self.zenith)

    def params(self) -> dict[str, np.ndarray]:
        return {"zenith": self.zenith, "azimuth": self.azimuth, "z_offset": self.z_offset}


def canonical_tilt(zenith, azimuth):
    """(zenith ≥ 0, azimuth in [0, 2π)) for the same tilt: −θ at φ is θ at φ + π."""
    zen = np.asarray(zenith, dtype=np.float64)
    azi = np.asarray(azimuth, dtype=np.float64) + np.where(zen < 0, math.pi, 0.0)
    return np.abs(zen), np.mod(azi, 2 * math.pi)


class ThinTiltModel:
    """Loss of the thin-3D phase of B stacks as a function of per-tile tilt and focus.

    The normalised data spectrum and the angle-free optics are computed once; each call
    rebuilds only the illumination pupil and the z-dependent propagation.
    """

    def __init__(
        self,
        stacks,
        optics,
        settings: OptimizeSettings | None = None,
        convention: str = "physical",
        device=None,
    ):
        import torch

        from vsbench.reconstruct.optics import TiltOptics

        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.settings = settings or OptimizeSettings()
        data = torch.as_tensor(stacks, dtype=torch.float32, device=device)
        if data.ndim != 4 or data.shape[0] == 0 or data.shape[1] < 2 or min(data.shape[2:]) < 4:
            raise ValueError(
                "expected a non-empty (B, Z, Y, X) batch of brightfield stacks with Z >= 2 and "
                f"Y, X >= 4, got shape {tuple(data.shape)}"
            )
        if not torch.isfinite(data).all():
            raise ValueError("brightfield stacks contain non-finite values")
        self.device = data.device
        self.shape = tuple(int(s) for s in data.shape)
        self.optics = optics
        self.convention = convention
        self.spectrum = data_spectrum(data)
        n_z = self.shape[1]
        self.z_index = -torch.arange(n_z, dtype=torch.float32, device=self.device) + n_z // 2
        self.tilt_optics = TiltOptics(
            self.shape[2:],
            optics.yx_pixel_size,
            optics.wavelength_um,
            optics.index_media,
            optics.na_illumination,
            optics.na_detection,
            zenith=torch.zeros(1, device=self.device),
            azimuth=torch.zeros(1, device=self.device),
            pupil_steepness=self.settings.pupil_steepness,
            device=self.device,
        )
        self._loss = loss_function(self.settings.loss)

    def __len__(self) -> int:
        return self.shape[0]

    def _filter(self, zenith, azimuth, z_offset):
        self.tilt_optics.set_tilt(zenith, azimuth)
        z = (self.z_index[None, :] + z_offset[:, None]) * self.optics.z_pixel_size
        hu, hp = self.tilt_optics.transfer_functions(z)
        return hu, hp, half_filter(hu, hp, self.settings.regularization, self.convention)

    def phase(self, zenith, azimuth, z_offset, index=None):
        """Thin phase (n, Y, X) of tiles ``index`` (default all) at per-element parameters."""
        _, _, filt = self._filter(zenith, azimuth, z_offset)
        spec = self.spectrum if index is None else self.spectrum[index]
        return filter_spectrum(spec, filt, self.shape[2:])[:, 1]

    def loss(self, zenith, azimuth, z_offset, index=None):
        spec = self.spectrum if index is None else self.spectrum[index]
        if self.settings.loss == "residual":
            hu, hp, filt = self._filter(zenith, azimuth, z_offset)
            return residual(spec, hu, hp, filt, self.shape[-1], self.convention)
        o = self.optics
        return self._loss(
            self.phase(zenith, azimuth, z_offset, index),
            o.yx_pixel_size,
            o.wavelength_um,
            o.na_detection,
            self.settings.loss_band,
        )

    def evaluate(self, zenith, azimuth, z_offset, index=None):
        """Loss without gradients, in memory-bounded batches: (n,) float64 numpy."""
        import torch

        zen, azi, off = (
            self._tensor(v, len(index) if index is not None else len(self))
            for v in (zenith, azimuth, z_offset)
        )
        idx = (
            torch.arange(len(self), device=self.device)
            if index is None
            else torch.as_tensor(index, device=self.device)
        )
        out = []
        bs = self.settings.batch_size
        with torch.no_grad():
            for k in range(0, len(idx), bs):
                sl = slice(k, k + bs)
                out.append(self.loss(zen[sl], azi[sl], off[sl], idx[sl]))
        return torch.cat(out).double().cpu().numpy()

    def _tensor(self, value, n):
        import torch

        t = torch.as_tensor(np.asarray(value, dtype=np.float32), device=self.device)
        return t.expand(n).clone() if t.ndim == 0 else t


def residual(spec, hu, hp, filt, nx: int, convention: str = "physical"):
    """Data misfit of the thin model, ‖y − Mx̂‖² / ‖y‖² per tile, from the half spectrum.

    x̂ is the Tikhonov estimate; the forward model consistent with the filter convention is
    ``y_z = conj(Hu_z)·a + conj(Hp_z)·p`` ("physical") or without the conjugates
    ("thin_forward"). Columns of the rfft half-spectrum are weighted as in Parseval.
    """
    import torch

    ncol = spec.shape[-1]
    f = filt[..., :ncol]
    x = (f * spec.unsqueeze(-4)).sum(dim=-3)  # (n, 2, Y, Xh)
    hu, hp = hu[..., :ncol], hp[..., :ncol]
    if convention == "physical":
        hu, hp = hu.conj(), hp.conj()
    r = spec - hu * x[:, 0:1] - hp * x[:, 1:2]
    w = torch.full((ncol,), 2.0, device=spec.device)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    energy = lambda t: ((t.real**2 + t.imag**2) * w).sum(dim=(-3, -2, -1))  # noqa: E731
    return energy(r) / energy(spec).clamp_min(1e-30)


def initial_values(init: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    """Scalars or (n,) arrays per parameter → (n,) float64 arrays (missing → 0)."""
    init = dict(init or {})
    unknown = set(init) - set(PARAMETERS)
    if unknown:
        raise ValueError(f"initial values: unknown parameter(s) {sorted(unknown)}")
    out = {}
    for p in PARAMETERS:
        v = np.asarray(init.get(p, 0.0), dtype=np.float64)
        if v.ndim == 0:
            v = np.full(n, float(v))
        if v.shape != (n,):
            raise ValueError(f"initial {p}: expected a scalar or shape ({n},), got {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError(f"initial {p}: non-finite values")
        out[p] = v
    return out


def grid_candidates(
    max_zenith: float, n_zenith: int, n_azimuth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Zenith 0..max × azimuth grid; zenith 0 once (its azimuth is moot)."""
    zeniths = np.linspace(0.0, float(max_zenith), int(n_zenith)) if n_zenith > 1 else np.zeros(1)
    azimuths = np.arange(int(n_azimuth)) * 2 * math.pi / max(int(n_azimuth), 1)
    cands = [(0.0, 0.0)] + [(z, a) for z in zeniths if z > 0 for a in azimuths]
    zen, azi = np.array(cands).T
    return zen, azi


def grid_search(model: ThinTiltModel, zenith, azimuth, z_offset=0.0) -> dict[str, np.ndarray]:
    """Best candidate per tile: evaluates every (zenith[k], azimuth[k]) on every tile.

    Returns zenith, azimuth, z_offset, loss arrays of length B (the coarse start of a fit).
    """
    zenith, azimuth = np.asarray(zenith, float), np.asarray(azimuth, float)
    n, k = len(model), len(zenith)
    off = np.broadcast_to(np.asarray(z_offset, float), (n,))
    losses = model.evaluate(
        np.tile(zenith, n), np.tile(azimuth, n), np.repeat(off, k), np.repeat(np.arange(n), k)
    ).reshape(n, k)
    best = losses.argmin(axis=1)
    return {
        "zenith": zenith[best],
        "azimuth": azimuth[best],
        "z_offset": off.copy(),
        "loss": losses[np.arange(n), best],
    }


def optimize_tilt(
    model: ThinTiltModel,
    init: Mapping[str, Any] | None = None,
    settings: OptimizeSettings | None = None,
    skip: Sequence[bool] | np.ndarray | None = None,
) -> TiltFit:
    """Optimise every tile of `model` from `init`; tiles with ``skip`` keep `init` verbatim.

    Skipped tiles are evaluated once (their loss is reported) and flagged ``skipped``.
    """
    s = settings or model.settings
    t0 = time.perf_counter()
    n = len(model)
    start = initial_values(init, n)
    skip = np.zeros(n, bool) if skip is None else np.asarray(skip, bool)
    if skip.shape != (n,):
        raise ValueError(f"skip: expected shape ({n},), got {skip.shape}")
    free = s.free()
    if not free and not skip.all():
        raise ValueError(
            "all parameters are frozen (lr == 0 for zenith, azimuth and z_offset): "
            "nothing to optimise; give one a positive learning rate or skip the tiles"
        )
    values = {p: start[p].copy() for p in PARAMETERS}
    loss = np.full(n, np.nan)
    iterations = np.zeros(n, int)
    converged_at = np.zeros(n, int)
    converged = skip.copy()
    history: list[np.ndarray] = []
    if skip.any():
        loss[skip] = model.evaluate(*(values[p][skip] for p in PARAMETERS), np.flatnonzero(skip))
    todo = np.flatnonzero(~skip)
    if len(todo):
        run = _newton if s.method == "newton" else _nadam
        for part in np.array_split(todo, math.ceil(len(todo) / s.batch_size)):
            fit = run(model, {p: values[p][part] for p in PARAMETERS}, part, s, free)
            for p in PARAMETERS:
                values[p][part] = fit["values"][p]
            loss[part], converged[part] = fit["loss"], fit["converged"]
            iterations[part], converged_at[part] = fit["iterations"], fit["converged_at"]
            history.extend(_expand(h, part, n) for h in fit["history"])
    zen, azi = canonical_tilt(values["zenith"], values["azimuth"])
    if skip.any():  # verbatim: no canonicalisation of a warm start
        zen[skip], azi[skip] = start["zenith"][skip], start["azimuth"][skip]
    return TiltFit(
        zenith=zen,
        azimuth=azi,
        z_offset=values["z_offset"],
        loss=loss,
        iterations=iterations,
        converged_at=converged_at,
        converged=converged,
        skipped=skip,
        method=s.method,
        wall_s=time.perf_counter() - t0,
        history=history,
    )


def _expand(h, part, n):
    out = np.full(n, np.nan)
    out[part] = h
    return out


class _Tracker:
    """Best value per tile and the tolerance/patience stopping rule."""

    def __init__(self, values, settings: OptimizeSettings):
        n = len(values["zenith"])
        self.s = settings
        self.best = {p: v.copy() for p, v in values.items()}
        self.best_loss = np.full(n, np.inf)
        self.stale = np.zeros(n, int)
        self.active = np.ones(n, bool)
        self.iterations = np.zeros(n, int)
        self.converged_at = np.zeros(n, int)
        self.history: list[np.ndarray] = []

    def update(self, loss, values, where):
        """Record losses of the tiles `where` (indices) evaluated at `values` (full arrays)."""
        self.iterations[where] += 1
        row = np.full(len(self.best_loss), np.nan)
        row[where] = loss
        self.history.append(row)
        prev = self.best_loss[where]
        improved = loss < prev - self.s.tolerance * np.abs(np.where(np.isfinite(prev), prev, loss))
        better = loss < prev
        for p, v in values.items():
            self.best[p][where[better]] = v[where[better]]
        self.converged_at[where[improved]] = self.iterations[where[improved]]
        self.best_loss[where] = np.minimum(prev, loss)
        self.stale[where] = np.where(improved, 0, self.stale[where] + 1)
        self.active[where] &= self.stale[where] < self.s.patience

    def result(self):
        return {
            "values": self.best,
            "loss": self.best_loss,
            "iterations": self.iterations,
            "converged_at": self.converged_at,
            "converged": ~self.active,
            "history": self.history,
        }


def _iterations(track: _Tracker, s: OptimizeSettings, device):
    """(indices, index tensor) of the still active tiles, once per iteration."""
    import torch

    for _ in range(s.max_iterations):
        where = np.flatnonzero(track.active)
        if not len(where):
            return
        yield where, torch.as_tensor(where, device=device)


def _finite(loss):
    import torch

    if not torch.isfinite(loss).all():
        raise FloatingPointError("non-finite loss during tilt optimisation")
    return loss


def _nadam(model, values, tiles, s: OptimizeSettings, free):
    import torch

    rates = s.rates()
    dev = model.device
    params = {
        p: torch.tensor(values[p], dtype=torch.float32, device=dev, requires_grad=p in free)
        for p in PARAMETERS
    }
    opt = torch.optim.NAdam([{"params": [params[p]], "lr": rates[p]} for p in free])
    track = _Tracker(values, s)
    index = torch.as_tensor(tiles, device=dev)
    for where, w in _iterations(track, s, dev):
        opt.zero_grad(set_to_none=False)
        loss = _finite(model.loss(*(params[p][w] for p in PARAMETERS), index[w]))
        loss.sum().backward()
        now = {p: t.detach().double().cpu().numpy() for p, t in params.items()}
        track.update(loss.detach().double().cpu().numpy(), now, where)
        frozen_rows = torch.as_tensor(~track.active, device=dev)
        keep = {p: params[p].detach().clone() for p in free}
        opt.step()
        with torch.no_grad():  # converged tiles stay where they are (momentum would move them)
            for p in free:
                params[p][frozen_rows] = keep[p][frozen_rows]
    return track.result()


def _newton(model, values, tiles, s: OptimizeSettings, free):
    import torch

    dev = model.device
    cur = {p: torch.tensor(values[p], dtype=torch.float32, device=dev) for p in PARAMETERS}
    cap = {p: float(s.step_cap[p]) for p in PARAMETERS}
    mu = np.full(len(tiles), float(s.damping))
    track = _Tracker(values, s)
    index = torch.as_tensor(tiles, device=dev)
    for where, w in _iterations(track, s, dev):
        leaf = {p: cur[p][w].clone().requires_grad_(p in free) for p in PARAMETERS}
        loss = _finite(model.loss(*(leaf[p] for p in PARAMETERS), index[w]))
        grads = torch.autograd.grad(loss.sum(), [leaf[p] for p in free], create_graph=True)
        # tiles are independent: d/dp_k of Σ_tiles g_k is each tile's own H_kk
        curv = [
            torch.autograd.grad(g.sum(), leaf[p], retain_graph=k < len(free) - 1)[0]
            for k, (g, p) in enumerate(zip(grads, free, strict=True))
        ]
        loss_np = loss.detach().double().cpu().numpy()
        damp = torch.as_tensor(1.0 + mu[where], dtype=torch.float32, device=dev)
        trial = {p: cur[p][w].clone() for p in PARAMETERS}
        with torch.no_grad():
            for p, g, h in zip(free, grads, curv, strict=True):
                step = -g / (h.abs() * damp).clamp_min(1e-12)
                trial[p] += step.clamp(-cap[p], cap[p])
            trial_loss = model.loss(*(trial[p] for p in PARAMETERS), index[w])
        trial_np = trial_loss.double().cpu().numpy()
        accept = np.isfinite(trial_np) & (trial_np < loss_np)
        mu[where] = np.where(accept, np.maximum(mu[where] / 3, s.damping_floor), mu[where] * 4)
        acc = torch.as_tensor(accept, device=dev)
        for p in PARAMETERS:
            cur[p][w] = torch.where(acc, trial[p], cur[p][w])
        now = {p: t.double().cpu().numpy() for p, t in cur.items()}
        track.update(np.where(accept, trial_np, loss_np), now, where)
    return track.result()
