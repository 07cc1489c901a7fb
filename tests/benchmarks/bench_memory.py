"""Peak memory of prediction and evaluation as the predict set grows (not a test).

    python tests/benchmarks/bench_memory.py [--fovs 4 16] [--shape 16 192 192]

Runs the real pipeline (one plate, nucleus, a small UNet) on predict sets of N FOVs
and reads each job's peak RSS from Snakemake's own benchmark files (`max_rss`, MB).
Streaming steps hold one FOV (prediction: one tile batch) at a time, so the peak
should not grow with N; the last column is the peak at the largest N over the first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from campaign import small_config, snakemake, write_config  # noqa: E402

RULES = ("predict", "segment", "features", "metrics")


def config(n_fovs: int, shape: list[int]) -> dict:
    cfg = small_config()
    sim = cfg["datasets"]["ipsc"]["simulate"]
    sim.update(shape=shape, wells={"A/1": "mock", "A/2": "mock"}, fovs_per_well=n_fovs // 2)
    cfg["predict_sets"]["ipsc_test"]["split"] = "all"  # evaluate every FOV of the plate
    cfg["campaign"]["models"] = ["unet"]
    cfg["models"]["unet"].update(epochs=1, crop=[8, 32, 32])
    cfg["predict"]["tile_yx"] = 64
    cfg["reconstruct"]["subtile"]["size"] = 64
    return cfg


def peak_rss(workdir: Path) -> dict[str, float]:
    out = {}
    for rule in RULES:
        files = sorted((workdir / "benchmarks" / rule).rglob("*.tsv"))
        files = [f for f in files if "/gt/" not in str(f)]
        out[rule] = max(pd.read_csv(f, sep="\t")["max_rss"].max() for f in files)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fovs", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 192, 192])
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.fovs:
            workdir = Path(tmp) / f"fovs{n}"
            workdir.mkdir()
            write_config(workdir, config(n, args.shape))
            snakemake(workdir, "--cores", "2", "target/nucleus/metrics.csv")
            rows[n] = peak_rss(workdir)
    table = pd.DataFrame(rows).T
    table.index.name = "FOVs"
    print(f"peak RSS (MB) per job, FOV shape {args.shape}, from benchmarks/*/max_rss")
    print(table.round(0).to_string())
    first, last = args.fovs[0], args.fovs[-1]
    print(f"ratio {last}/{first} FOVs: " + ", ".join(
        f"{rule} {rows[last][rule] / rows[first][rule]:.2f}" for rule in RULES
    ))  # fmt: skip


if __name__ == "__main__":
    main()
