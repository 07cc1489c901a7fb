"""Warm starts for the tilt optimisation: across the plate (a meniscus map) and across time.

A well's meniscus tilts the illumination radially: the tilt grows from the well centre to
the edge and points outward. :class:`RadialMap` is that model,

    zenith = max_zenith · (r / radius)^power,  azimuth = atan2(y, x) + azimuth_offset,
    z_offset = constant,

over the FOV position (y, x) relative to the well centre, in µm (x along image columns, the
azimuth convention of the simulator and of waveorder's tilted pupil). It is given by the
user or fitted to a first pass: with tilt vectors ``v = zenith·e^{i·azimuth}`` and the model
``v = c·b`` where ``b = (r/radius)^power·e^{iθ}`` and ``c = max_zenith·e^{i·azimuth_offset}``,
the least-squares ``c = Σ b̄v / Σ|b|²`` is closed form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

WARM_START_MODES = ("off", "given", "fit")


@dataclass(frozen=True)
class RadialMap:
    max_zenith: float
    radius_um: float
    power: float = 2.0
    azimuth_offset: float = 0.0
    z_offset: float = 0.0

    def __post_init__(self):
        if not self.radius_um > 0 or self.power <= 0 or self.max_zenith < 0:
            raise ValueError(
                f"warm-start map needs radius_um > 0, power > 0, max_zenith >= 0: {self}"
            )

    def __call__(self, position_yx_um: Sequence[float]) -> dict[str, float]:
        y, x = (float(v) for v in position_yx_um)
        r = math.hypot(x, y)
        return {
            "zenith": self.max_zenith * (r / self.radius_um) ** self.power,
            "azimuth": (math.atan2(y, x) + self.azimuth_offset) % (2 * math.pi),
            "z_offset": self.z_offset,
        }

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def fit(
        cls,
        positions_yx_um,
        zenith,
        azimuth,
        z_offset,
        radius_um: float,
        power: float = 2.0,
    ) -> RadialMap:
        pos = np.asarray(positions_yx_um, dtype=np.float64).reshape(-1, 2)
        zen, azi, off = (
            np.asarray(v, dtype=np.float64).reshape(-1) for v in (zenith, azimuth, z_offset)
        )
        if not len(pos) or not len(pos) == len(zen) == len(azi) == len(off):
            raise ValueError(
                f"warm-start fit needs matching positions and tilts, got {len(pos)} positions "
                f"and {len(zen)}/{len(azi)}/{len(off)} values"
            )
        y, x = pos[:, 0], pos[:, 1]
        b = (np.hypot(x, y) / float(radius_um)) ** float(power) * np.exp(1j * np.arctan2(y, x))
        v = zen * np.exp(1j * azi)
        denom = float(np.sum(np.abs(b) ** 2))
        if denom <= 0:
            raise ValueError("warm-start fit: every position is at the well centre")
        c = np.sum(np.conj(b) * v) / denom
        return cls(
            max_zenith=float(abs(c)),
            radius_um=float(radius_um),
            power=float(power),
            azimuth_offset=float(np.angle(c)) % (2 * math.pi),
            z_offset=float(np.median(off)),
        )


def radial_blend_zenith(zenith: float, r: float, r_max: float) -> float:
    """0 at the well centre → the formula value at r_max (linear in r/r_max, clipped to 1)."""
    if r_max <= 0:
        raise ValueError(f"r_max must be positive, got {r_max}")
    return float(zenith) * min(max(float(r) / float(r_max), 0.0), 1.0)


def is_edge(r: float, r_max: float, threshold: float | None) -> bool:
    """A meniscus-edge position (r/r_max above threshold) gets the full, unfrozen recipe."""
    return threshold is not None and r_max > 0 and float(r) / float(r_max) > float(threshold)


def map_from_config(spec: Mapping, radius_um: float) -> RadialMap:
    """The user's ``warm_start.map`` block (max_zenith required)."""
    try:
        return RadialMap(
            max_zenith=float(spec["max_zenith"]),
            radius_um=float(spec.get("radius_um") or radius_um),
            power=float(spec.get("power", 2.0)),
            azimuth_offset=float(spec.get("azimuth_offset", 0.0)),
            z_offset=float(spec.get("z_offset", 0.0)),
        )
    except KeyError as exc:
        raise ValueError(f"reconstruct.warm_start.map: missing key {exc}") from exc
