"""Aggregate per-(FOV, t) metric tables into one row per benchmark cell.

Every numeric column is summarised generically, so new metrics added by the
metrics stage flow into the target's table without touching this module.

Spread convention: ``{metric}_std`` is the population standard deviation
(ddof=0) over the (FOV, t) rows that have a value. The table describes the
evaluated set itself (it is defined for a single FOV, where a sample std is
not); ``n_fov`` and ``n_timepoints`` are reported so a reader can convert.
Means and stds skip NaN (a metric undefined on some FOVs, e.g. fewer than two
cells) and are NaN only when no row has a value. ±inf (e.g. the PSNR of two
identical volumes) counts as undefined too, so one FOV cannot make a mean infinite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from vsbench.io import InputError

KEYS = ("FOV", "Timepoint")
CELL_KEYS = ("target", "train_set", "model", "predict_set")
DDOF = 0


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric (or boolean) columns other than the (FOV, Timepoint) keys, in file order."""
    out = []
    for col in df.columns:
        if col in KEYS:
            continue
        dtype = df[col].dtype
        if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
            out.append(col)
    return out


def aggregate_cell(
    pixel: pd.DataFrame,
    mask: pd.DataFrame,
    feature: pd.DataFrame,
    ddof: int = DDOF,
) -> dict:
    """n_fov, n_timepoints and NaN-aware mean/std of every metric of one cell.

    A column name that occurs in more than one table keeps its first
    occurrence as is and is prefixed by the table's kind in the later ones
    (e.g. ``feature_n_cells``), so no value silently overwrites another.
    """
    frames = {"pixel": pixel, "mask": mask, "feature": feature}
    fovs: set = set()
    timepoints: set = set()
    out: dict = {}
    seen: set = set()
    for kind, df in frames.items():
        missing = [k for k in KEYS if k not in df.columns]
        if missing:
            raise InputError(f"{kind} metrics table: missing column(s) {missing} (expected {KEYS})")
        fovs.update(df["FOV"].dropna().astype(str))
        timepoints.update(df["Timepoint"].dropna().tolist())
        for col in metric_columns(df):
            name = col if col not in seen else f"{kind}_{col}"
            seen.add(name)
            values = pd.to_numeric(df[col], errors="coerce").astype(float)
            values = values.replace([np.inf, -np.inf], np.nan)
            out[f"{name}_mean"] = (
                float(values.mean(skipna=True)) if values.notna().any() else np.nan
            )
            out[f"{name}_std"] = (
                float(values.std(skipna=True, ddof=ddof)) if values.notna().sum() > ddof else np.nan
            )
    return {"n_fov": len(fovs), "n_timepoints": len(timepoints), **out}


def aggregate_table(cells: Sequence[Mapping], rows: Sequence[Mapping]) -> pd.DataFrame:
    """One row per cell: cell keys, counts, then metric columns in order of first appearance."""
    if len(cells) != len(rows):
        raise InputError(f"{len(cells)} benchmark cells but {len(rows)} aggregated rows")
    records = []
    for cell, row in zip(cells, rows, strict=True):
        missing = [k for k in CELL_KEYS if k not in cell]
        if missing:
            raise InputError(f"benchmark cell {dict(cell)}: missing key(s) {missing}")
        records.append({**{k: cell[k] for k in CELL_KEYS}, **row})
    columns: list[str] = [*CELL_KEYS, "n_fov", "n_timepoints"]
    for rec in records:
        columns.extend(c for c in rec if c not in columns)
    return pd.DataFrame.from_records(records, columns=columns)
