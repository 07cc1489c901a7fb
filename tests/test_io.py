import numpy as np
import pandas as pd
import pytest

from vsbench import io


def test_check_name_rejects_path_and_shell_characters():
    assert io.check_name("unet_small-2", "model") == "unet_small-2"
    for bad in ["../x", "a b", "a;rm", "x/y", "", "$(id)"]:
        with pytest.raises(io.InputError, match="model name"):
            io.check_name(bad, "model")


def test_plate_round_trip_and_metadata_listing(tmp_path, make_plate):
    data = np.arange(2 * 2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 2, 3, 4, 5)
    path = make_plate(tmp_path / "p.zarr", {"A/1/0": data, "B/2/1": data + 1}, ["BF", "Nuc"])
    assert io.list_plate_fovs(path) == ["A/1/0", "B/2/1"]
    with io.open_plate(path) as plate:
        assert io.fov_names(plate) == ["A/1/0", "B/2/1"]
        pos = plate["B/2/1"]
        assert io.scale_zyx(pos) == (2.0, 0.325, 0.325)
        np.testing.assert_array_equal(io.read_channel(pos, "Nuc", "p"), data[:, 1] + 1)
        np.testing.assert_array_equal(io.read_channel(pos, "BF", "p", t=1), data[1, 0] + 1)
        with pytest.raises(io.InputError, match="channel 'GFP' not found"):
            io.read_channel(pos, "GFP", "p")
        with pytest.raises(io.InputError, match="FOV 'C/1/0' not found"):
            io.position(plate, "C/1/0", path)


def test_open_plate_errors_name_the_path(tmp_path):
    with pytest.raises(io.InputError, match="plate not found"):
        io.open_plate(tmp_path / "missing.zarr")
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(io.InputError, match="junk.zarr"):
        io.open_plate(tmp_path / "junk.zarr")
    with pytest.raises(io.InputError, match="no zarr metadata"):
        io.list_plate_fovs(tmp_path / "junk.zarr")


def test_fov_names_must_be_row_col_fov():
    assert io.split_fov("A/1/0") == ("A", "1", "0")
    for bad in ["A/1", "A/1/0/2", "A/../0"]:
        with pytest.raises(io.InputError):
            io.split_fov(bad)


def test_atomic_table_write_leaves_nothing_on_failure(tmp_path):
    df = pd.DataFrame({"a": [1, 2], "b": [0.5, np.nan]})
    io.write_table(df, tmp_path / "t.csv")
    io.write_table(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(io.read_table(tmp_path / "t.csv"), df)
    pd.testing.assert_frame_equal(io.read_table(tmp_path / "t.parquet"), df)
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "x.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.parquet"]
    # a writer killed with SIGKILL leaves its temporary behind; the next write removes it
    (tmp_path / ".t.csv.abcd1234.tmp").write_text("half")
    (tmp_path / ".t.csv.x.abcd1234.tmp").write_text("another output's")
    io.write_table(df, tmp_path / "t.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".t.csv.x.abcd1234.tmp",
        "t.csv",
        "t.parquet",
    ]


def test_corrupt_chunk_fails_naming_the_fov(tmp_path, make_plate):
    path = make_plate(tmp_path / "p.zarr", {"A/1/0": np.ones((1, 1, 4, 8, 8))}, ["BF"])
    chunk = next(p for p in (path / "A/1/0/0").rglob("*") if p.is_file() and p.name == "0")
    chunk.write_bytes(b"garbage")
    with io.open_plate(path) as plate:
        with pytest.raises(io.InputError, match=r"p.zarr FOV A/1/0: cannot read array data"):
            io.read_channel(plate["A/1/0"], "BF", f"{path} FOV A/1/0")
