"""File I/O at the edges: HCS OME-Zarr plates (iohub), tables, atomic writes.

Every error names the file, FOV or key and what was expected, in one line, so
a failing Snakemake job says what is wrong without a traceback hunt.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
AXES = ("T", "C", "Z", "Y", "X")


class InputError(ValueError):
    """Bad input data or configuration; the message is meant for the user."""


def check_name(name: str, what: str) -> str:
    """Names become path components: refuse anything but [A-Za-z0-9_-]."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InputError(f"{what} name {name!r} is invalid: expected ^[A-Za-z0-9_-]+$")
    return name


# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success.

    A writer killed with SIGKILL leaves its temporary file behind; the next writer of the
    same path (one job owns each output) removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.????????.tmp"):  # mkstemp: 8
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; final artefacts are shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_table(df, path: str | os.PathLike) -> None:
    """Write a DataFrame as CSV or Parquet (by suffix), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise ValueError(f"{path}: unknown table format (expected .csv or .parquet)")


def read_table(path: str | os.PathLike):
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: table not found")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path)


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays → plain Python, so zarr attributes accept them."""
    return json.loads(json.dumps(obj, default=_json_default))


def reset_dir(path: str | os.PathLike) -> Path:
    """Remove a stale store left by a killed run (Snakemake also does this)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- HCS plates


def split_fov(name: str) -> tuple[str, str, str]:
    parts = name.split("/")
    if len(parts) != 3 or not all(NAME_PATTERN.match(p) for p in parts):
        raise InputError(f"FOV name {name!r} is invalid: expected 'row/col/fov' of [A-Za-z0-9_-]")
    return parts[0], parts[1], parts[2]


def open_plate(path: str | os.PathLike, mode: str = "r"):
    """Open an HCS OME-Zarr plate with iohub, with a clear error when it is not one."""
    from iohub.ngff import open_ome_zarr

    path = Path(path)
    if mode == "r" and not path.exists():
        raise InputError(f"{path}: plate not found")
    try:
        return open_ome_zarr(path, layout="hcs", mode=mode)
    except Exception as exc:  # iohub raises several types for a non-plate store
        if mode == "r":
            list_plate_fovs(path)  # names the precise problem: no metadata, no plate, no FOVs
        raise InputError(f"{path}: not a readable HCS OME-Zarr plate ({exc})") from exc


def create_plate(path: str | os.PathLike, channel_names: Sequence[str]):
    """Create a new plate, replacing any stale store at `path`."""
    from iohub.ngff import open_ome_zarr

    reset_dir(path)
    return open_ome_zarr(Path(path), layout="hcs", mode="w-", channel_names=list(channel_names))


def fov_names(plate) -> list[str]:
    return sorted(name for name, _ in plate.positions())


def position(plate, fov: str, path: str | os.PathLike | None = None):
    try:
        return plate[fov]
    except KeyError as exc:
        where = path if path is not None else "plate"
        raise InputError(f"{where}: FOV {fov!r} not found") from exc


def channel_index(channel_names: Sequence[str], name: str, where: str) -> int:
    if name not in channel_names:
        raise InputError(f"{where}: channel {name!r} not found (channels: {list(channel_names)})")
    return list(channel_names).index(name)


def scale_zyx(pos) -> tuple[float, float, float]:
    """Physical (z, y, x) pixel size of the full-resolution array."""
    scale = pos.scale
    return float(scale[-3]), float(scale[-2]), float(scale[-1])


def create_fov(
    plate,
    fov: str,
    shape: Sequence[int],
    scale_um: Sequence[float],
    chunks: Sequence[int] | None = None,
    dtype: str = "float32",
):
    """Create FOV `fov` with a zero TCZYX array "0" carrying the (z, y, x) physical scale."""
    from iohub.ngff.models import TransformationMeta

    if len(shape) != 5:
        raise InputError(f"FOV {fov}: expected a TCZYX shape, got {tuple(shape)}")
    row, col, name = split_fov(fov)
    pos = plate.create_position(row, col, name)
    if chunks is None:
        chunks = (1, 1, *shape[2:])
    transform = [TransformationMeta(type="scale", scale=[1.0, 1.0, *map(float, scale_um)])]
    pos.create_zeros(
        "0", shape=tuple(shape), dtype=dtype, chunks=tuple(chunks), transform=transform
    )
    return pos


def write_fov(plate, fov: str, data: np.ndarray, scale_um: Sequence[float], chunks=None):
    """Create FOV `fov` and write the whole TCZYX array."""
    pos = create_fov(plate, fov, data.shape, scale_um, chunks=chunks, dtype=str(data.dtype))
    pos["0"][:] = data
    return pos


def read_array(arr, index, where: str) -> np.ndarray:
    """Read `arr[index]`; a corrupt or missing chunk becomes an InputError naming `where`."""
    try:
        return np.asarray(arr[index])
    except Exception as exc:  # zarr/numcodecs raise RuntimeError, ValueError, OSError...
        raise InputError(f"{where}: cannot read array data ({type(exc).__name__}: {exc})") from exc


def read_channel(pos, channel: str, where: str, t: int | None = None) -> np.ndarray:
    """Read one channel of a position as (T, Z, Y, X), or (Z, Y, X) for one timepoint."""
    c = channel_index(pos.channel_names, channel, where)
    if t is None:
        return read_array(pos["0"], np.s_[:, c], where)
    return read_array(pos["0"], np.s_[t, c], where)


def channel_statistics(plate_or_pos, channel: str) -> dict:
    """Normalization statistics written by preprocess, read back from .zattrs."""
    norm = dict(plate_or_pos.zattrs).get("normalization", {})
    if channel not in norm:
        raise InputError(
            f"no normalization statistics for channel {channel!r}; run preprocess first"
        )
    return norm[channel]


def list_plate_fovs(path: str | os.PathLike) -> list[str]:
    """FOV names of an HCS plate from its JSON metadata alone (cheap: for DAG building).

    Reads zarr v3 (`zarr.json` attributes) or v2 (`.zattrs`) plate and well metadata.
    """
    path = Path(path)

    def attrs(p: Path) -> dict:
        if (p / "zarr.json").exists():
            return json.loads((p / "zarr.json").read_text()).get("attributes", {})
        if (p / ".zattrs").exists():
            return json.loads((p / ".zattrs").read_text())
        raise InputError(f"{p}: no zarr metadata (zarr.json or .zattrs) found")

    meta = attrs(path)
    plate = meta.get("ome", meta).get("plate")
    if plate is None:
        raise InputError(f"{path}: not an HCS plate (no 'plate' metadata)")
    fovs = []
    for well in plate.get("wells", []):
        wmeta = attrs(path / well["path"])
        for image in wmeta.get("ome", wmeta).get("well", {}).get("images", []):
            fovs.append(f"{well['path']}/{image['path']}")
    if not fovs:
        raise InputError(f"{path}: plate has no FOVs")
    return sorted(fovs)
