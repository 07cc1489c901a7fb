"""aggregate: NaN-aware mean/std per benchmark cell, one row per cell, stable columns."""

import runpy
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vsbench.aggregate import CELL_KEYS, aggregate_cell, aggregate_table
from vsbench.io import InputError

STEP = Path(__file__).resolve().parents[1] / "src/vsbench/steps/aggregate.py"
FOVS = ["A/1/0", "A/1/0", "A/1/1", "A/1/1"]
TPS = [0, 1, 0, 1]


def frames(offset: float = 0.0):
    pixel = pd.DataFrame(
        {
            "FOV": FOVS,
            "Timepoint": TPS,
            "PCC": [0.5 + offset, np.nan, 0.7 + offset, 0.9 + offset],
            "SSIM": [0.1, 0.2, 0.3, 0.4],
            "NRMSE": [0.2, 0.2, 0.2, 0.2],
            "PSNR": [np.inf, 20.0, 22.0, 24.0],  # inf (identical pair) must not poison the mean
        }
    )
    mask = pd.DataFrame(
        {
            "FOV": FOVS,
            "Timepoint": TPS,
            "Dice": [0.8, 0.6, 0.4, 0.2],
            "TP": [10, 20, 30, 40],
            "note": ["a", "b", "c", "d"],  # text: not a metric
        }
    )
    feature = pd.DataFrame(
        {
            "FOV": FOVS,
            "Timepoint": TPS,
            "n_cells": [1, 3, 2, 2],
            "CP_FID": [np.nan] * 4,  # fewer than two cells everywhere -> NaN, not a crash
            "Dataset_CP_FID": [5.0] * 4,
            "new_metric": [True, False, True, True],  # later versions: any numeric column
        }
    )
    return pixel, mask, feature


def test_aggregate_cell_nan_aware_mean_and_population_std():
    pixel, mask, feature = frames()
    row = aggregate_cell(pixel, mask, feature)
    assert row["n_fov"] == 2 and row["n_timepoints"] == 2
    pcc = np.array([0.5, 0.7, 0.9])
    assert row["PCC_mean"] == pytest.approx(pcc.mean())
    assert row["PCC_std"] == pytest.approx(np.std(pcc, ddof=0))
    assert row["SSIM_mean"] == pytest.approx(0.25)
    assert row["SSIM_std"] == pytest.approx(np.std([0.1, 0.2, 0.3, 0.4]))
    assert row["NRMSE_std"] == pytest.approx(0.0)
    assert row["PSNR_mean"] == pytest.approx(22.0)
    assert row["Dice_mean"] == pytest.approx(0.5)
    assert row["TP_mean"] == pytest.approx(25.0)
    assert row["n_cells_mean"] == pytest.approx(2.0)
    assert np.isnan(row["CP_FID_mean"]) and np.isnan(row["CP_FID_std"])
    assert row["Dataset_CP_FID_mean"] == pytest.approx(5.0)
    assert row["new_metric_mean"] == pytest.approx(0.75)
    assert "note_mean" not in row and "FOV_mean" not in row and "Timepoint_mean" not in row
    # every metric has both statistics, in file order
    metrics = [k[: -len("_mean")] for k in row if k.endswith("_mean")]
    assert metrics[:4] == ["PCC", "SSIM", "NRMSE", "PSNR"]
    assert all(f"{m}_std" in row for m in metrics)


def test_aggregate_cell_duplicate_column_is_prefixed_not_overwritten():
    pixel, mask, feature = frames()
    mask["n_cells"] = [7, 7, 7, 7]
    row = aggregate_cell(pixel, mask, feature)
    assert row["n_cells_mean"] == pytest.approx(7.0)
    assert row["feature_n_cells_mean"] == pytest.approx(2.0)


def test_aggregate_cell_missing_key_column_names_table():
    pixel, mask, feature = frames()
    with pytest.raises(InputError, match="mask metrics table.*Timepoint"):
        aggregate_cell(pixel, mask.drop(columns="Timepoint"), feature)


def test_aggregate_table_one_row_per_cell_union_of_columns():
    cells = [
        dict(target="er", train_set="ipsc", model="identity", predict_set="ipsc_test"),
        dict(target="er", train_set="ipsc", model="unet", predict_set="ipsc_test"),
    ]
    pixel, mask, feature = frames()
    rows = [aggregate_cell(pixel, mask, feature), {"n_fov": 1, "n_timepoints": 1, "X_mean": 1.0}]
    table = aggregate_table(cells, rows)
    assert len(table) == 2
    assert list(table.columns[:6]) == [*CELL_KEYS, "n_fov", "n_timepoints"]
    assert table.loc[1, "X_mean"] == 1.0 and np.isnan(table.loc[0, "X_mean"])
    assert np.isnan(table.loc[1, "PCC_mean"])
    with pytest.raises(InputError):
        aggregate_table(cells, rows[:1])


def _run_step(tmp_path, cells, n_files=None):
    paths = {k: [] for k in ("pixel", "mask", "feature")}
    for i, cell in enumerate(cells):
        d = tmp_path / "target" / cell["target"] / cell["train_set"] / cell["model"]
        d = d / cell["predict_set"]
        d.mkdir(parents=True)
        for kind, df in zip(paths, frames(offset=0.01 * i), strict=True):
            df.to_csv(d / f"{kind}.csv", index=False)
            paths[kind].append(str(d / f"{kind}.csv"))
    if n_files is not None:
        paths = {k: v[:n_files] for k, v in paths.items()}
    out = tmp_path / "target" / "er" / "metrics.csv"
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(**paths),
        output=types.SimpleNamespace(table=str(out)),
        params=types.SimpleNamespace(cells=cells),
        log=[],
        threads=1,
        rule="aggregate",
    )
    runpy.run_path(str(STEP), init_globals={"snakemake": ns})
    return out


def test_step_writes_one_row_per_cell(tmp_path):
    cells = [
        dict(target="er", train_set="ipsc", model=m, predict_set=ps)
        for m in ("identity", "unet_small")
        for ps in ("ipsc_test", "a549_all")
    ]
    out = _run_step(tmp_path, cells)
    table = pd.read_csv(out)
    assert len(table) == 4
    assert table[list(CELL_KEYS)].to_dict("records") == cells
    assert (table["n_fov"] == 2).all() and (table["n_timepoints"] == 2).all()
    expected = [np.mean([0.5, 0.7, 0.9]) + 0.01 * i for i in range(4)]
    np.testing.assert_allclose(table["PCC_mean"], expected)
    assert table["CP_FID_mean"].isna().all()
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_step_rejects_misaligned_inputs(tmp_path):
    cells = [
        dict(target="er", train_set="ipsc", model=m, predict_set="ipsc_test")
        for m in ("identity", "unet_small")
    ]
    with pytest.raises(InputError, match="2 benchmark cells"):
        _run_step(tmp_path, cells, n_files=1)
