"""Dry-run cost and job count of a large campaign as the plate grows (not a test).

    python tests/benchmarks/bench_dryrun.py [--fovs 50 200 800]

Campaign: 4 targets x 4 models x 3 train sets x 4 predict sets over four
simulated datasets. Prints wall time of `snakemake -n` and the job count per
FOV count: jobs depend on the campaign's cells, not on the number of FOVs.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from campaign import CHANNELS, OPTICS, snakemake, write_config  # noqa: E402


def campaign(n_fovs: int) -> dict:
    wells = {f"{r}/{c}": "mock" for r in "ABCD" for c in range(1, 6)}  # 20 wells
    per_well = max(1, n_fovs // len(wells))

    def dataset(cell_type, seed):
        return {
            "simulate": {
                "cell_type": cell_type,
                "seed": seed,
                "wells": wells,
                "fovs_per_well": per_well,
            },
            "optics": OPTICS,
            "channels": CHANNELS,
            "splits": {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 0},
        }

    datasets = {f"d{i}": dataset("ipsc" if i % 2 else "a549", i) for i in range(4)}
    unet = {"arch": "unet3d"}
    return {
        "datasets": datasets,
        "targets": {t: {} for t in ("nucleus", "er", "mito", "membrane")},
        "models": {"identity": {"arch": "identity"}, "u1": unet, "u2": unet, "u3": unet},
        "train_sets": {
            "t0": {"datasets": ["d0"]},
            "t1": {"datasets": ["d1"]},
            "joint": {"datasets": ["d0", "d1"]},
        },
        "predict_sets": {f"p{i}": {"dataset": f"d{i}", "split": "test"} for i in range(4)},
        "campaign": {
            "targets": ["nucleus", "er", "mito", "membrane"],
            "models": ["identity", "u1", "u2", "u3"],
            "train_sets": ["t0", "t1", "joint"],
            "predict_sets": ["p0", "p1", "p2", "p3"],
        },
    }


def dry_run(n_fovs: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        write_config(Path(tmp), campaign(n_fovs))
        start = time.perf_counter()
        proc = snakemake(Path(tmp), "-n", "--quiet", "rules")
        wall = time.perf_counter() - start
    total = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, flags=re.M)
    return wall, int(total.group(1)) if total else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fovs", type=int, nargs="+", default=[20, 200, 800])
    args = parser.parse_args()
    print(f"{'FOVs/dataset':>12} {'jobs':>6} {'dry run (s)':>12}")
    for n in args.fovs:
        wall, jobs = dry_run(n)
        print(f"{n:>12} {jobs:>6} {wall:>12.2f}")


if __name__ == "__main__":
    main()
