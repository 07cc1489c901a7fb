"""The tiny campaign and a Snakemake runner shared by the workflow and SLURM tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# the demo's optics and channels: tests and benchmarks use the shipped manifest
DEMO = yaml.safe_load((REPO / "resources/datasets/ipsc_demo.yaml").read_text())
OPTICS, CHANNELS = DEMO["optics"], DEMO["channels"]


def tiny_config() -> dict:
    def dataset(cell_type, seed, wells, n):
        return {
            "simulate": {
                "cell_type": cell_type,
                "seed": seed,
                "shape": [8, 64, 64],
                "timepoints": 1,
                "wells": wells,
                "fovs_per_well": n,
                "well_radius_um": 60.0,
                "max_zenith": 0.25,
            },
            "optics": OPTICS,
            "brightfield": "BF",
            "channels": CHANNELS,
            "splits": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 0},
        }

    return {
        "seed": 0,
        "datasets": {
            "ipsc": dataset("ipsc", 1, {"A/1": "mock"}, 4),
            "a549": dataset("a549", 2, {"A/1": "mock", "A/2": "zikv"}, 1),
        },
        "targets": {
            "nucleus": {"segmentation": {"method": "instance", "min_size": 10}},
            "er": {"segmentation": {"method": "ridge", "min_size": 5}},
        },
        "models": {
            "identity": {"arch": "identity"},
            "unet": {
                "arch": "unet3d",
                "base_channels": 4,
                "depth": 1,
                "epochs": 1,
                "steps_per_epoch": 2,
                "val_steps": 1,
                "batch_size": 2,
                "crop": [8, 32, 32],
            },
        },
        "train_sets": {"ipsc": {"datasets": ["ipsc"]}},
        "predict_sets": {
            "ipsc_test": {"dataset": "ipsc", "split": "test"},
            "a549_all": {"dataset": "a549", "split": "all"},
        },
        "campaign": {
            "targets": ["nucleus", "er"],
            "models": ["identity", "unet"],
            "train_sets": ["ipsc"],
            "predict_sets": ["ipsc_test", "a549_all"],
        },
        "reconstruct": {"positions_per_job": 2, "subtile": {"size": 32}, "phase_2d": True},
        "features": {"encoder": {"steps": 5, "batch_size": 8, "crop": 16}},
        "predict": {"tile_yx": 32},
    }


def small_config() -> dict:
    """One plate, one target, identity + a UNet trained for three epochs: the campaign the
    SLURM and fault tests run end to end (three epochs leave a moment mid-training)."""
    cfg = tiny_config()
    del cfg["datasets"]["a549"], cfg["predict_sets"]["a549_all"], cfg["targets"]["er"]
    cfg["campaign"].update(targets=["nucleus"], predict_sets=["ipsc_test"])
    cfg["models"]["unet"]["epochs"] = 3
    return cfg


def snakemake_command(workdir: Path, *args: str, python_flags: tuple = ()) -> list[str]:
    """The repository's Snakefile on `workdir` and its config.yaml."""
    return [
        sys.executable,
        *python_flags,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]


def snakemake(
    workdir: Path,
    *args: str,
    check: bool = True,
    python_flags: tuple = (),
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    cmd = snakemake_command(workdir, *args, python_flags=python_flags)
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def planned_jobs(workdir: Path, *targets: str) -> dict[str, int]:
    """Job counts per rule from a dry run's 'Job stats' table."""
    out = snakemake(workdir, "-n", *targets).stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        jobs[m.group(1)] = int(m.group(2))
    jobs.pop("total", None)
    return jobs


def write_config(workdir: Path, cfg: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
