"""aggregate: the target's metrics table, one row per (train_set, model, predict_set)."""

import os

from vsbench import io
from vsbench.aggregate import aggregate_cell, aggregate_table
from vsbench.steps import setup

log = setup(snakemake, "aggregate")  # noqa: F821


def as_list(value) -> list[str]:
    """Snakemake gives lists; a hand run with one file gives a plain path."""
    if isinstance(value, str | os.PathLike):
        return [str(value)]
    return [str(v) for v in value]


cells = list(snakemake.params.cells)  # noqa: F821
inputs = {
    kind: as_list(getattr(snakemake.input, kind))  # noqa: F821
    for kind in ("pixel", "mask", "feature")
}
out_path = str(snakemake.output.table)  # noqa: F821

for kind, paths in inputs.items():
    if len(paths) != len(cells):
        raise io.InputError(
            f"aggregate: {len(paths)} {kind} tables for {len(cells)} benchmark cells "
            "(input lists must align with params.cells)"
        )

rows = []
for i, cell in enumerate(cells):
    tables = {kind: io.read_table(paths[i]) for kind, paths in inputs.items()}
    try:
        row = aggregate_cell(tables["pixel"], tables["mask"], tables["feature"])
    except io.InputError as exc:
        where = ", ".join(inputs[k][i] for k in inputs)
        raise io.InputError(f"{where}: {exc}") from exc
    log.info(
        "%s/%s/%s/%s: %d FOVs, %d timepoints",
        cell["target"],
        cell["train_set"],
        cell["model"],
        cell["predict_set"],
        row["n_fov"],
        row["n_timepoints"],
    )
    rows.append(row)

table = aggregate_table(cells, rows)
io.write_table(table, out_path)
log.info("wrote %s (%d rows, %d columns)", out_path, len(table), table.shape[1])
