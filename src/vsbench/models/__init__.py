"""Model registry: every architecture is one module in this package, registered by name.

Every model maps (B, 1, Z, Y, X) → (B, C_out, Z, Y, X) for any input size (it
pads to its divisibility with edge replication and crops back), so the trainer
and the sliding-window predictor never need to know its internals;
`divisibility` (z, y, x) is exposed so callers can avoid that padding.

Adding an architecture = adding one file here that decorates its class with
`@register("name", config=settings_to_kwargs)`: every non-underscore module of
the package is imported below, so nothing else has to be edited (apart from the
config schema's `arch` enum).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

from torch import nn

from vsbench.io import InputError
from vsbench.models._registry import REGISTRY, Arch, register
from vsbench.models.identity import IdentityModel
from vsbench.models.unet3d import UNet3D, z_levels_for

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

ARCHS = tuple(REGISTRY)

__all__ = [
    "ARCHS",
    "REGISTRY",
    "Arch",
    "IdentityModel",
    "UNet3D",
    "build_model",
    "describe",
    "model_config",
    "register",
    "z_levels_for",
]


def _arch(name: str) -> Arch:
    if name not in REGISTRY:
        raise InputError(f"unknown model arch {name!r} (expected one of {list(REGISTRY)})")
    return REGISTRY[name]


def model_config(settings: Mapping) -> dict:
    """Constructor arguments of the model described by train settings (stored in checkpoints)."""
    return _arch(settings["arch"]).config(settings)


def build_model(arch: str, config: Mapping) -> nn.Module:
    spec = _arch(arch)
    if arch == "identity" and config:
        raise InputError(f"identity model takes no configuration, got {dict(config)}")
    try:
        return spec.cls(**config)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad {arch} model_config {dict(config)}: {exc}") from exc


def describe(arch: str, settings: Mapping, input_shape=None) -> dict:
    """Parameter count and input/output shapes of `arch` built from `settings` (CPU, no grad)."""
    import torch

    settings = {**settings, "arch": arch}
    config = model_config(settings)
    model = build_model(arch, config).eval()
    shape = tuple(input_shape or (1, 1, *settings["crop"]))
    with torch.no_grad():
        out = model(torch.zeros(shape))
    disc = getattr(model, "discriminator", None)
    return {
        "arch": arch,
        "params": sum(p.numel() for p in model.parameters()),
        "discriminator_params": sum(p.numel() for p in disc.parameters()) if disc else 0,
        "input": shape,
        "output": tuple(out.shape),
        "divisibility": tuple(getattr(model, "divisibility", (1, 1, 1))),
        "config": config,
    }
