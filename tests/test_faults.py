"""Faults: a campaign killed with SIGKILL mid-write, four times, loses nothing.

The whole Snakemake process group is killed (as a node failure would) while a
preprocess store, a reconstruction shard, a training run (between epochs) and a
prediction store are being written; `--rerun-incomplete` then finishes the campaign,
whose outputs must equal an uninterrupted run's.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from campaign import small_config, snakemake, snakemake_command, write_config

pytestmark = pytest.mark.workflow

UNET = "target/nucleus/ipsc/unet"
STAGES = [  # (rule, output Snakemake must mark incomplete, "the job is mid-write now")
    ("preprocess", "datasets/ipsc/preprocessed.zarr", "datasets/ipsc/preprocessed.zarr/A"),
    ("reconstruct_shard", "datasets/ipsc/reconstruct/shard0/phase.zarr",
     "datasets/ipsc/reconstruct/shard0/phase.zarr/A"),
    ("train", f"{UNET}/model.ckpt", f"{UNET}/last.ckpt"),
    ("predict", f"{UNET}/ipsc_test/prediction.zarr", f"{UNET}/ipsc_test/prediction.zarr/A"),
]  # fmt: skip


def incomplete_outputs(workdir: Path) -> set[str]:
    """Outputs Snakemake has marked incomplete (a job started and did not finish)."""
    root = workdir / ".snakemake/incomplete"
    out = set()
    for path in root.rglob("*") if root.exists() else ():
        if path.is_file() and path.name != "migration_underway":
            b64 = "".join(part.lstrip("@") for part in path.relative_to(root).parts)
            out.add(base64.urlsafe_b64decode(b64).decode())
    return out


def run_until_killed(workdir: Path, mid_write: Path, timeout: float = 300) -> None:
    """Run the campaign and SIGKILL Snakemake and all its jobs once `mid_write` exists."""
    cmd = snakemake_command(workdir, "--cores", "2")
    with open(workdir / "killed_run.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    end = time.monotonic() + timeout
    try:
        while not mid_write.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before {mid_write} appeared")
            if time.monotonic() > end:
                raise AssertionError(f"{mid_write} did not appear within {timeout:.0f} s")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    snakemake(workdir, "--unlock")  # what a user does after a crash: the lock survives it


def read_plate(path: Path) -> dict[str, np.ndarray]:
    from vsbench import io

    with io.open_plate(path) as plate:
        return {fov: np.asarray(plate[fov]["0"][:]) for fov in io.fov_names(plate)}


def test_kill_9_mid_write_then_rerun_incomplete_equals_uninterrupted(small_campaign_run, tmp_path):
    reference, _ = small_campaign_run
    workdir = tmp_path / "killed"
    workdir.mkdir()
    write_config(workdir, small_config())
    for rule, output, mid_write in STAGES:
        run_until_killed(workdir, workdir / mid_write)
        assert output in incomplete_outputs(workdir), (rule, incomplete_outputs(workdir))
    resumed = snakemake(workdir, "--cores", "2", "--rerun-incomplete")
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout
    train_log = (workdir / "logs/train/nucleus/ipsc/unet.log").read_text()
    assert "resuming from" in train_log, resumed.stdout[-2000:]

    for name in ("target/nucleus/metrics.csv", "datasets/ipsc/tilt.csv"):
        got, want = (
            pd.read_csv(d / name).drop(columns="wall_s", errors="ignore")
            for d in (workdir, reference)
        )
        pd.testing.assert_frame_equal(got, want, rtol=1e-6, atol=1e-9)
    for store in ("datasets/ipsc/preprocessed.zarr", "datasets/ipsc/phase.zarr",
                  f"{UNET}/ipsc_test/prediction.zarr"):  # fmt: skip
        got, want = read_plate(workdir / store), read_plate(reference / store)
        assert got.keys() == want.keys(), store
        for fov in want:
            np.testing.assert_allclose(got[fov], want[fov], rtol=1e-5, atol=1e-6, err_msg=fov)
    leftovers = [p for p in workdir.rglob("*.tmp") if ".snakemake" not in p.parts]
    assert not leftovers, leftovers
