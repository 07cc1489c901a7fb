"""The architecture registry: name → (model class, settings → constructor arguments)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Arch:
    name: str
    cls: type[nn.Module]
    config: Callable[[Mapping], dict]


REGISTRY: dict[str, Arch] = {}


def register(name: str, config: Callable[[Mapping], dict]):
    """Class decorator: make `cls` buildable as `arch: name`; `config` maps train settings to
    the constructor arguments stored in checkpoints (so a checkpoint rebuilds its own model).
    """

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in REGISTRY:
            raise ValueError(f"model arch {name!r} registered twice")
        REGISTRY[name] = Arch(name, cls, config)
        return cls

    return deco
