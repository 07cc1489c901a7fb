"""Bad input: every case fails fast with one InputError line naming the file, key or FOV.

Each case builds its bad input and calls what the pipeline calls (config checks run
at DAG-building time, data checks at the start of the step that reads the data).
Module tests cover each check in depth; this table holds the contract for all of them.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_config import _demo

from vsbench import config as vc
from vsbench import io
from vsbench import preprocess as pp

WHERE = "raw.zarr FOV A/1/0"
SCALE = (2.0, 0.325, 0.325)


def campaign_case(mutate):
    def case(tmp_path, repo_root, make_plate):
        cfg, manifests = _demo(repo_root)  # fresh objects per call
        mutate(cfg, manifests)
        vc.check_schema(cfg, repo_root / "workflow/schemas/config.schema.yaml", "config.yaml")
        vc.check_campaign(cfg, manifests)

    return case


def fov_case(shape, channels, scale=(1, 1, 1)):
    return lambda tmp_path, repo_root, make_plate: pp.validate_fov(
        np.zeros(shape), channels, ["BF"], scale, WHERE
    )


def values_case(volume):
    return lambda tmp_path, repo_root, make_plate: pp.check_values(volume, WHERE)


def nan_volume():
    x = np.ones((2, 4, 4))
    x[1, 2, 3] = np.nan
    return x


def empty_plate(tmp_path, repo_root, make_plate):
    import json

    path = make_plate(tmp_path / "empty.zarr", {"A/1/0": np.ones((1, 1, 4, 8, 8))}, ["BF"])
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["ome"]["plate"]["wells"] = []  # a plate whose wells list is empty
    (path / "zarr.json").write_text(json.dumps(meta))
    io.list_plate_fovs(path)


def corrupt_chunk(tmp_path, repo_root, make_plate):
    path = make_plate(tmp_path / "raw.zarr", {"A/1/0": np.ones((1, 1, 4, 8, 8))}, ["BF"])
    chunk = next(p for p in (path / "A/1/0/0").rglob("0") if p.is_file())
    chunk.write_bytes(b"not a chunk")
    with io.open_plate(path) as plate:
        io.read_channel(plate["A/1/0"], "BF", f"{path} FOV A/1/0")


def fov_names_differ(tmp_path, repo_root, make_plate):
    gt = {"A/1/0": np.ones((1, 1, 4, 8, 8)), "A/1/1": np.ones((1, 1, 4, 8, 8))}
    make_plate(tmp_path / "gt.zarr", gt, ["ER"])
    pred = make_plate(tmp_path / "prediction.zarr", {"A/1/0": gt["A/1/0"]}, ["er_prediction"])
    with io.open_plate(pred) as plate:
        for fov in gt:
            io.position(plate, fov, pred)


def shape_mismatch(tmp_path, repo_root, make_plate):
    from test_features import run_step, write_labels

    image = make_plate(
        tmp_path / "prediction.zarr", {"A/1/0": np.ones((1, 1, 6, 16, 16))}, ["er_prediction"]
    )
    cells = write_labels(tmp_path / "cells.zarr", {"A/1/0": np.ones((1, 6, 16, 20))}, SCALE)
    run_step(repo_root, "features", image, cells, tmp_path / "f.parquet", "er_prediction",
             ["A/1/0"], {})  # fmt: skip


def duplicate_key(tmp_path, repo_root, make_plate):
    text = (repo_root / "config/config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text + "\nseed: 7\n")
    vc.load_yaml(tmp_path / "config.yaml")


def missing_checkpoint(tmp_path, repo_root, make_plate):
    from vsbench.predict import load_model

    load_model(tmp_path / "model.ckpt")


def corrupt_checkpoint(tmp_path, repo_root, make_plate):
    from vsbench.predict import load_model

    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04 truncated")
    load_model(tmp_path / "model.ckpt")


def other_architecture(tmp_path, repo_root, make_plate):
    import torch
    from test_predict import random_unet_checkpoint

    from vsbench.predict import load_model

    random_unet_checkpoint(tmp_path / "unet.ckpt")
    ckpt = torch.load(tmp_path / "unet.ckpt", weights_only=True)
    ckpt["model_config"] = {**ckpt["model_config"], "base_channels": 6}
    torch.save(ckpt, tmp_path / "model.ckpt")
    load_model(tmp_path / "model.ckpt")


def overwrite_prediction(tmp_path, repo_root, make_plate):
    from test_predict import random_unet_checkpoint, run_predict_step, write_phase_plate

    write_phase_plate(tmp_path / "phase.zarr")
    random_unet_checkpoint(tmp_path / "model.ckpt", target="nucleus")
    out = run_predict_step(tmp_path, tmp_path / "model.ckpt", tmp_path / "phase.zarr", ["A/1/0"])
    shutil.copytree(out, tmp_path / "before.zarr")
    try:
        run_predict_step(tmp_path, tmp_path / "model.ckpt", tmp_path / "phase.zarr", ["A/1/0"],
                         overwrite=False)  # fmt: skip
    finally:  # the existing store is untouched
        assert sorted(p.name for p in out.rglob("*")) == sorted(
            p.name for p in (tmp_path / "before.zarr").rglob("*")
        )


def name_case(name):
    return lambda tmp_path, repo_root, make_plate: io.check_name(name, "models")


def add_model(name):
    return lambda c, m: c["models"].update({name: {"arch": "unet3d"}})


CASES = {  # id -> (case, substrings the one-line message must contain)
    "missing channel": (fov_case((1, 1, 4, 8, 8), ["GFP"]), [WHERE, "['BF']"]),
    "wrong axes": (fov_case((3, 8, 8), ["BF"]), [WHERE, "TCZYX"]),
    "2D data": (fov_case((1, 1, 1, 8, 8), ["BF"]), [WHERE, "z-stack"]),
    "channel count": (fov_case((1, 2, 4, 8, 8), ["BF"]), [WHERE, "2 channels"]),
    "negative pixel size": (fov_case((1, 1, 4, 8, 8), ["BF"], (1, -0.3, 1)), [WHERE, "pixel"]),
    "NaN voxels": (values_case(nan_volume()), [WHERE, "non-finite"]),
    "all-zero FOV": (values_case(np.zeros((2, 4, 4))), [WHERE, "zero"]),
    "empty plate": (empty_plate, ["empty.zarr", "no FOVs"]),
    "corrupt zarr chunk": (corrupt_chunk, ["raw.zarr FOV A/1/0", "cannot read"]),
    "GT/prediction FOV names differ": (fov_names_differ, ["prediction.zarr", "'A/1/1'"]),
    "shape mismatch": (shape_mismatch, ["A/1/0", "does not match"]),
    "unknown target": (
        campaign_case(lambda c, m: c["campaign"]["targets"].append("golgi")),
        ["campaign.targets", "'golgi'"],
    ),
    "unknown model": (
        campaign_case(lambda c, m: c["campaign"]["models"].append("nope")),
        ["campaign.models", "'nope'"],
    ),
    "unknown dataset": (
        campaign_case(lambda c, m: c["predict_sets"]["a549_all"].update(dataset="zz")),
        ["predict_sets.a549_all.dataset", "'zz'"],
    ),
    "duplicate key": (duplicate_key, ["config.yaml", "duplicate key 'seed'"]),
    "duplicate target channel": (
        campaign_case(lambda c, m: m["ipsc"]["channels"].update(Extra="nucleus")),
        ["datasets.ipsc.channels", "same target"],
    ),
    "NA_ill >= NA_det": (
        campaign_case(lambda c, m: m["a549"]["optics"].update(na_illumination=0.6)),
        ["datasets.a549.optics", "na_illumination"],
    ),
    "path traversal in a name": (campaign_case(add_model("..")), ["models", "'..'"]),
    "shell metacharacters in a name": (name_case("x;rm -rf ~"), ["models", "'x;rm -rf ~'"]),
    "path traversal in a well": (
        campaign_case(lambda c, m: m["ipsc"]["simulate"]["wells"].update({"A/..": "mock"})),
        ["datasets.ipsc.simulate.wells", "'..'"],
    ),
    "splits name missing FOVs": (
        lambda tmp_path, repo_root, make_plate: vc.resolve_splits(
            ["A/1/0", "A/1/1"], {"train": ["A/1/0"], "val": ["A/1/1"], "test": ["B/9/9"]}, "ipsc"
        ),
        ["ipsc", "splits.test", "B/9/9"],
    ),
    "missing checkpoint": (missing_checkpoint, ["model.ckpt", "not found"]),
    "corrupt checkpoint": (corrupt_checkpoint, ["model.ckpt", "not a readable"]),
    "checkpoint of another architecture": (other_architecture, ["model.ckpt", "do not fit"]),
    "refuse to overwrite predictions": (overwrite_prediction, ["prediction.zarr", "overwrite"]),
    "config key typo": (
        campaign_case(lambda c, m: c["models"]["unet"].update(epochz=3)),
        ["config.yaml", "models.unet", "'epochz'"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_line_naming_it(name, tmp_path, repo_root, make_plate):
    case, expected = CASES[name]
    with pytest.raises(io.InputError) as err:
        case(tmp_path, repo_root, make_plate)
    message = str(err.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, (part, message)


def test_the_suite_has_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_no_shell_no_eval_and_weights_only_checkpoint_loads(repo_root):
    """Security: config strings never reach a shell, nothing is eval'd, and torch never
    unpickles arbitrary objects."""
    import re

    rules = [repo_root / "Snakefile", *sorted((repo_root / "workflow/rules").glob("*.smk"))]
    for path in rules:
        text = path.read_text()
        assert not re.search(r"^\s*(shell|run):", text, re.M), f"{path}: shell:/run: rule"
        blocks = re.split(r"^(?:local)?rule (\w+):", text, flags=re.M)[1:]
        for rule, body in zip(blocks[::2], blocks[1::2], strict=True):
            assert rule == "all" or re.search(r"^\s+script:", body, re.M), (path, rule)
    for path in sorted((repo_root / "src/vsbench").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"(?<![.\w])(eval|exec)\(", text), f"{path}: eval/exec"
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
