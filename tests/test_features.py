"""Per-cell features: known values on hand-built images, and the step script on tiny plates."""

from __future__ import annotations

import runpy
import types

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vsbench.features import FEATURES, ID_COLUMNS, INTENSITY_FEATURES, cell_features


def hand_built():
    image = np.zeros((4, 8, 8))
    labels = np.zeros((4, 8, 8), np.int32)
    labels[1:3, 1:3, 1:3] = 3  # 8 voxels, values 1..8
    image[1:3, 1:3, 1:3] = np.arange(1, 9).reshape(2, 2, 2)
    labels[0, 5:8, 5:8] = 7  # 9 voxels, constant 0.5
    image[0, 5:8, 5:8] = 0.5
    return image, labels


def test_known_values_on_hand_built_cells():
    image, labels = hand_built()
    df = cell_features(image, labels)
    assert list(df.columns) == ["cell_id", *FEATURES]
    assert df["cell_id"].tolist() == [3, 7]
    a, b = df.iloc[0], df.iloc[1]
    values = np.arange(1, 9, dtype=float)
    assert a["volume"] == 8 and b["volume"] == 9
    assert (a["centroid_z"], a["centroid_y"], a["centroid_x"]) == (1.5, 1.5, 1.5)
    assert (b["centroid_z"], b["centroid_y"], b["centroid_x"]) == (0.0, 6.0, 6.0)
    assert a["mean"] == 4.5 and a["min"] == 1 and a["max"] == 8
    assert a["std"] == pytest.approx(np.sqrt(5.25))  # population std of 1..8
    for q in (10, 25, 50, 75, 90):
        assert a[f"p{q}"] == pytest.approx(np.percentile(values, q))
    assert a["iqr"] == pytest.approx(3.5)
    assert a["skewness"] == pytest.approx(stats.skew(values))
    assert a["kurtosis"] == pytest.approx(stats.kurtosis(values))  # excess, biased: -1.238
    assert a["kurtosis"] == pytest.approx(-1.2380952380952381)
    # a constant cell: zero spread, skewness/kurtosis 0 by convention (finite matrix)
    assert b["mean"] == 0.5 and b["std"] == 0 and b["iqr"] == 0
    assert b["skewness"] == 0 and b["kurtosis"] == 0
    assert np.isfinite(df[list(FEATURES)].to_numpy()).all()


def test_random_cells_match_direct_numpy():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, size=(6, 30, 30))
    labels = rng.integers(0, 5, size=image.shape).astype(np.int32)
    df = cell_features(image, labels).set_index("cell_id")
    for cid in range(1, 5):
        v = image[labels == cid]
        row = df.loc[cid]
        np.testing.assert_allclose(
            [row["mean"], row["std"], row["min"], row["max"], row["p90"], row["skewness"]],
            [v.mean(), v.std(), v.min(), v.max(), np.percentile(v, 90), stats.skew(v)],
            rtol=1e-10,
        )
        assert row["kurtosis"] == pytest.approx(stats.kurtosis(v), rel=1e-9)


def test_gradient_and_laplacian_on_a_ramp():
    """x-ramp of slope s: 3D Sobel = (-1, 0, 1) x (1, 2, 1) x (1, 2, 1) gives 32 s; Laplacian 0."""
    slope = 0.01
    image = np.broadcast_to(slope * np.arange(20.0), (6, 20, 20)).copy()
    labels = np.zeros(image.shape, np.int32)
    labels[2:4, 5:15, 5:15] = 1
    row = cell_features(image, labels).iloc[0]
    assert row["gradient_mean"] == pytest.approx(32 * slope)
    assert row["gradient_std"] == pytest.approx(0, abs=1e-12)
    assert row["laplacian_var"] == pytest.approx(0, abs=1e-20)
    flat = cell_features(np.full(image.shape, 0.3), labels).iloc[0]
    assert flat["gradient_mean"] == 0 and flat["laplacian_var"] == 0


def test_glcm_matches_skimage_and_masks_out_the_background():
    from skimage.feature import graycomatrix, graycoprops

    from vsbench.features import GLCM_PROPS, TEXTURE_FEATURES, glcm_features

    rng = np.random.default_rng(1)
    image = rng.random((24, 30))
    full = glcm_features(image, np.ones(image.shape, bool))
    q = np.clip(np.floor(image * 32), 0, 31).astype(np.uint8)
    ref = graycomatrix(q, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32,
                       symmetric=True, normed=True)  # fmt: skip
    for name, prop in zip(TEXTURE_FEATURES, GLCM_PROPS, strict=True):
        assert full[name] == pytest.approx(float(graycoprops(ref, prop).mean()), rel=1e-12)
    # outside pixels do not count: noise around the cell changes nothing
    mask = np.zeros(image.shape, bool)
    mask[5:15, 8:20] = True
    noisy = np.where(mask, image, rng.random(image.shape))
    assert glcm_features(noisy, mask) == glcm_features(image, mask)
    stripes = np.tile([0.1, 0.9], (10, 5))  # alternating columns: high contrast along x
    smooth = np.full((10, 10), 0.5)
    ones = np.ones((10, 10), bool)
    assert glcm_features(stripes, ones)["glcm_contrast"] > 100
    assert glcm_features(smooth, ones)["glcm_contrast"] == 0.0
    assert glcm_features(smooth, ones)["glcm_asm"] == pytest.approx(1.0)
    lone = np.zeros((5, 5), bool)
    lone[2, 2] = True  # one pixel: no pair inside
    assert set(glcm_features(image[:5, :5], lone).values()) == {0.0}


def test_cell_features_include_the_central_slice_texture():
    image, labels = hand_built()
    row = cell_features(image / 8.0, labels).iloc[0]  # cell 3: slices 1-2, centroid z 1.5
    from vsbench.features import glcm_features

    z = int(np.rint(1.5))
    expected = glcm_features((image / 8.0)[z, 1:3, 1:3], labels[z, 1:3, 1:3] == 3)
    assert row["area"] == 4
    assert row["glcm_contrast"] == pytest.approx(expected["glcm_contrast"])


def test_no_cells_gives_empty_table_with_columns():
    df = cell_features(np.ones((2, 4, 4)), np.zeros((2, 4, 4), np.int32))
    assert len(df) == 0 and list(df.columns) == ["cell_id", *FEATURES]
    with pytest.raises(ValueError, match="equal ZYX shapes"):
        cell_features(np.ones((2, 4, 4)), np.zeros((2, 4, 5), np.int32))


# --------------------------------------------------------------------------- step script


def write_labels(path, fovs, scale):
    from vsbench import io

    with io.create_plate(path, ["cells"]) as plate:
        for fov, labels in fovs.items():
            io.write_fov(plate, fov, labels[:, None].astype(np.int32), scale)
    return path


def run_step(repo_root, rule, image, cells, table, channel, fovs, conditions):
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(image=str(image), cells=str(cells)),
        output=types.SimpleNamespace(table=str(table)),
        params=types.SimpleNamespace(channel=channel, fovs=fovs, conditions=conditions),
        log=[],
        threads=1,
        rule=rule,
    )
    runpy.run_path(str(repo_root / "src/vsbench/steps/features.py"), init_globals={"snakemake": ns})


@pytest.fixture
def plates(tmp_path, make_plate):
    rng = np.random.default_rng(1)
    shape = (2, 6, 32, 32)
    fovs, cells = {}, {}
    for k, fov in enumerate(["A/1/0", "A/2/0"]):
        er = rng.gamma(2.0, size=shape).astype(np.float32) * (k + 1)
        fovs[fov] = np.stack([rng.normal(size=shape), er + 5, er * 0 + 1, er], axis=1)
        lab = np.zeros(shape, np.int32)
        lab[:, 1:4, 2:10, 2:10] = 1
        lab[:, 2:5, 15:25, 12:30] = 2
        lab[1, 0:2, 26:30, 2:8] = 5  # only at t=1
        cells[fov] = lab
    pre = make_plate(tmp_path / "pre.zarr", fovs, ["BF", "Nucleus", "Membrane", "ER"])
    pred = make_plate(
        tmp_path / "pred.zarr",
        {f: 0.2 * d[:, 3:4] - 3.0 for f, d in fovs.items()},  # an affine copy of the GT
        ["er_prediction"],
    )
    cells_path = write_labels(tmp_path / "cells.zarr", cells, (2.0, 0.325, 0.325))
    return pre, pred, cells_path, fovs, cells


def test_step_tables_pair_up_and_are_scale_invariant(tmp_path, repo_root, plates):
    from vsbench import io
    from vsbench.segment import percentile_limits, scale_unit

    pre, pred, cells_path, fovs, cells = plates
    names = ["A/1/0", "A/2/0"]
    conditions = {"A/1/0": "mock", "A/2/0": "denv"}
    gt_table, pred_table = tmp_path / "gt.parquet", tmp_path / "pred.parquet"
    run_step(repo_root, "features_gt", pre, cells_path, gt_table, "ER", names, conditions)
    run_step(
        repo_root, "features", pred, cells_path, pred_table, "er_prediction", names, conditions
    )
    gt, pr = io.read_table(gt_table), io.read_table(pred_table)
    assert list(gt.columns) == [*ID_COLUMNS, *FEATURES] == list(pr.columns)
    assert len(gt) == 2 * (2 + 3)  # 2 FOVs: 2 cells at t=0, 3 at t=1
    assert gt.groupby(["fov", "t"]).size().tolist() == [2, 3, 2, 3]
    assert dict(zip(gt["fov"], gt["condition"], strict=True)) == conditions
    pd.testing.assert_frame_equal(gt[list(ID_COLUMNS)], pr[list(ID_COLUMNS)])
    # p1-p99 scaling per FOV makes an affine copy of the GT give the same features
    np.testing.assert_allclose(
        gt[list(INTENSITY_FEATURES)].to_numpy(), pr[list(INTENSITY_FEATURES)].to_numpy(), atol=1e-5
    )
    # values are taken on the FOV's [0, 1] scale
    er = fovs["A/2/0"][:, 3]
    unit = scale_unit(er, percentile_limits(er))
    row = gt[(gt.fov == "A/2/0") & (gt.t == 1) & (gt.cell_id == 2)].iloc[0]
    assert row["mean"] == pytest.approx(unit[1][cells["A/2/0"][1] == 2].mean(), rel=1e-6)
    assert 0 <= gt["min"].min() and gt["max"].max() <= 1


def test_step_shape_mismatch_is_input_error(tmp_path, repo_root, make_plate, plates):
    from vsbench.io import InputError

    _, _, cells_path, _, _ = plates
    small = make_plate(
        tmp_path / "small.zarr", {"A/1/0": np.ones((2, 1, 6, 16, 16))}, ["er_prediction"]
    )
    with pytest.raises(InputError, match="does not match"):
        run_step(
            repo_root,
            "features",
            small,
            cells_path,
            tmp_path / "x.parquet",
            "er_prediction",
            ["A/1/0"],
            {},
        )


# --------------------------------------------------------------------------- deep features


def test_cell_crops_are_centred_masked_scaled_and_padded():
    from vsbench.encoder import cell_crops

    image = np.zeros((3, 20, 20), np.float32)
    labels = np.zeros(image.shape, np.int32)
    labels[1, 8:12, 8:12] = 4  # a 4×4 cell in the middle, values 10..25
    image[1, 8:12, 8:12] = np.arange(10, 26).reshape(4, 4)
    labels[0, 0:2, 18:20] = 9  # a corner cell: its window runs off the FOV
    image[0, 0:2, 18:20] = 3.0
    image[2] = 100.0  # a bright plane outside every cell: masked out
    ids, crops = cell_crops(image, labels, size=8)
    assert ids.tolist() == [4, 9] and crops.shape == (2, 8, 8)
    mid = crops[0]
    assert mid[2:6, 2:6].min() == 0.0 and mid[2:6, 2:6].max() == 1.0  # scaled in the footprint
    assert (mid[:2] == 0).all() and (mid[6:] == 0).all()  # zero outside it
    corner = crops[1]
    assert corner.max() == 0.0  # a constant cell scales to 0
    assert cell_crops(image, np.zeros_like(labels), 8)[1].shape == (0, 8, 8)


def test_encoder_trains_deterministically_and_round_trips(tmp_path):
    import torch

    from vsbench import io
    from vsbench.encoder import embed, encoder_checkpoint, load_extractor, train_encoder

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    blobs = [np.exp(-((yy - 8) ** 2 + (xx - 8) ** 2) / rng.uniform(4, 30)) for _ in range(24)]
    stripes = [
        0.5 + 0.5 * np.sin(xx * rng.uniform(0.5, 1.5) + rng.uniform(0, 6)) for _ in range(24)
    ]
    crops = np.stack(blobs + stripes).astype(np.float32)
    settings = {"crop": 16, "dim": 8, "steps": 30, "batch_size": 16, "lr": 0.005}
    model, losses = train_encoder(crops, settings, seed=3)
    again, losses2 = train_encoder(crops, settings, seed=3)
    assert losses == losses2  # deterministic on the CPU
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # the contrastive loss falls
    path = tmp_path / "enc.pt"
    torch.save(encoder_checkpoint(model), path)
    e = embed(load_extractor(path), crops)
    assert e.shape == (48, 8) and np.isfinite(e).all()
    np.testing.assert_allclose(e, embed(again, crops), rtol=1e-6, atol=1e-7)
    # the two kinds of crop land apart: a linear probe separates them from the embedding
    from vsbench.metrics import auroc, logistic_fit

    y = np.r_[np.zeros(24), np.ones(24)]
    w, b = logistic_fit((e - e.mean(0)) / (e.std(0) + 1e-9), y)
    assert auroc(y, ((e - e.mean(0)) / (e.std(0) + 1e-9)) @ w + b) > 0.9
    with pytest.raises(io.InputError, match="not found"):
        load_extractor(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(io.InputError, match="bad.pt: neither a vsbench encoder nor a TorchScript"):
        load_extractor(tmp_path / "bad.pt")
    scripted = tmp_path / "user.pt"  # a user's TorchScript model is loaded too
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(scripted))
    np.testing.assert_allclose(embed(load_extractor(scripted), crops), e, rtol=1e-6, atol=1e-7)
    with pytest.raises(io.InputError, match="at least 2"):
        train_encoder(crops[:1], settings)
    torch.set_num_threads(1)


def test_steps_train_the_encoder_and_write_paired_embeddings(tmp_path, repo_root, plates):
    from vsbench import io

    pre, pred, cells_path, _, _ = plates
    names = ["A/1/0", "A/2/0"]
    settings = {"crop": 16, "dim": 4, "steps": 5, "batch_size": 8}
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(images=[str(pre)], cells=[str(cells_path)]),
        output=types.SimpleNamespace(model=str(tmp_path / "enc.pt"), log_table=str(tmp_path / "log.csv")),
        params=types.SimpleNamespace(data=[{"channel": "ER", "fovs": names}], settings=settings, seed=0),
        log=[], threads=1, rule="train_encoder",
    )  # fmt: skip
    runpy.run_path(str(repo_root / "src/vsbench/steps/features.py"), init_globals={"snakemake": ns})
    assert len(pd.read_csv(tmp_path / "log.csv")) == 5
    tables = {}
    for rule, image, channel in (("features_gt", pre, "ER"), ("features", pred, "er_prediction")):
        out = types.SimpleNamespace(table=str(tmp_path / f"{rule}.parquet"),
                                    embeddings=str(tmp_path / f"{rule}_emb.parquet"))  # fmt: skip
        ns = types.SimpleNamespace(
            input=types.SimpleNamespace(image=str(image), cells=str(cells_path), extractor=str(tmp_path / "enc.pt")),
            output=out,
            params=types.SimpleNamespace(channel=channel, fovs=names, conditions={}, encoder=settings),
            log=[], threads=1, rule=rule,
        )  # fmt: skip
        runpy.run_path(
            str(repo_root / "src/vsbench/steps/features.py"), init_globals={"snakemake": ns}
        )
        tables[rule] = (io.read_table(out.table), io.read_table(out.embeddings))
    (gt, gt_emb), (_, pr_emb) = tables["features_gt"], tables["features"]
    keys = ["fov", "t", "cell_id"]
    assert list(gt_emb.columns) == [*keys, "condition", "e0", "e1", "e2", "e3"]
    pd.testing.assert_frame_equal(gt_emb[keys], gt[keys])  # one embedding per CP row, paired
    pd.testing.assert_frame_equal(gt_emb[keys], pr_emb[keys])
    # an affine copy of the GT: the crops are min-max scaled, so the embeddings agree
    np.testing.assert_allclose(gt_emb[["e0", "e1"]], pr_emb[["e0", "e1"]], atol=1e-4)
