"""Shared fixtures: the repository root and tiny HCS plates written with vsbench.io."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def make_plate():
    """Write a small TCZYX float32 plate: make_plate(path, {fov: array}, channels, scale)."""
    from vsbench import io

    def _make(path, fovs: dict, channels, scale=(2.0, 0.325, 0.325), attrs=None):
        with io.create_plate(path, channels) as plate:
            for fov, data in fovs.items():
                pos = io.write_fov(plate, fov, np.asarray(data, dtype=np.float32), scale)
                if attrs and fov in attrs:
                    pos.zattrs.update(attrs[fov])
        return Path(path)

    return _make
