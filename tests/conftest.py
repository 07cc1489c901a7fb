"""Shared fixtures: the repository root and tiny HCS plates written with vsbench.io."""

from __future__ import annotations

import os
import time
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


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread: tiny models are op-overhead bound, and two OpenMP threads on a
    2-core machine shared with other work stall at every barrier."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_threads(monkeypatch):
    """Step scripts set OMP env vars and torch threads: undo that for the rest of the session."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_campaign_run(tmp_path_factory):
    """An uninterrupted local run of campaign.small_config(): the reference the SLURM and
    fault tests compare their outputs with. Returns (workdir, wall seconds)."""
    from campaign import small_config, snakemake, write_config

    workdir = tmp_path_factory.mktemp("small_campaign")
    write_config(workdir, small_config())
    start = time.monotonic()
    snakemake(workdir, "--cores", "2")
    return workdir, time.monotonic() - start
