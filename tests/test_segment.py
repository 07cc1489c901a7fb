"""Segmentation: nuclei/cell instances on synthetic cells, ridge masks, the step script."""

from __future__ import annotations

import runpy
import types

import numpy as np
import pytest
from scipy import ndimage as ndi

from vsbench import segment as seg

SPACING = (1.0, 0.5, 0.5)
# nucleus centres (z, y, x) in pixels; the last two nuclei touch; the lower right is empty
NUCLEI = [(6, 22, 22), (6, 22, 64), (6, 66, 22), (6, 64, 60), (6, 64, 77)]
CELL_Z = (2, 10)  # cells are flat cylinders (a monolayer) over these slices
CHANNELS = ["BF", "Nucleus", "Membrane", "ER"]


def ellipsoids(shape, centres, radii_um, spacing):
    grids = np.meshgrid(
        *[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij", sparse=True
    )
    labels = np.zeros(shape, np.int32)
    for i, c in enumerate(centres, 1):
        d = sum(
            ((g - ci * s) / r) ** 2 for g, ci, s, r in zip(grids, c, spacing, radii_um, strict=True)
        )
        labels[(d <= 1) & (labels == 0)] = i
    return labels


def scene(shape=(12, 128, 128), seed=0, timepoints=2):
    """Five cells (nucleus, membrane outline with apical/basal caps, ER lines), TCZYX float32."""
    from skimage.segmentation import expand_labels, find_boundaries

    rng = np.random.default_rng(seed)
    nuclei = ellipsoids(shape, NUCLEI, (3.0, 4.5, 4.5), SPACING)
    footprint = expand_labels(nuclei.max(axis=0), 6.0, spacing=SPACING[1:])
    cells = np.zeros(shape, np.int32)
    cells[CELL_Z[0] : CELL_Z[1] + 1] = footprint
    membrane = np.zeros(shape, np.float32)
    membrane[CELL_Z[0] : CELL_Z[1] + 1] = find_boundaries(footprint, mode="inner")
    membrane[[CELL_Z[0], CELL_Z[1]]] += 0.5 * (footprint > 0)  # flat sheets, dimmer
    er = np.zeros(shape, bool)
    for z in range(shape[0]):
        for _ in range(16):
            y0, x0 = rng.integers(0, shape[1], 2)
            angle = rng.uniform(0, np.pi)
            s = np.linspace(-12, 12, 60)
            y = np.round(y0 + s * np.sin(angle)).astype(int)
            x = np.round(x0 + s * np.cos(angle)).astype(int)
            ok = (y >= 0) & (y < shape[1]) & (x >= 0) & (x < shape[2])
            er[z, y[ok], x[ok]] = True
    er &= (cells > 0) & (nuclei == 0)
    frames = []
    for _ in range(timepoints):
        nuc = ndi.gaussian_filter((nuclei > 0).astype(np.float32), (0.7, 1.5, 1.5)) * 100 + 10
        mem = ndi.gaussian_filter(membrane, (0.5, 0.8, 0.8)) * 120 + 10
        erc = ndi.gaussian_filter(er.astype(np.float32), (0.3, 0.7, 0.7)) * 150 + 10
        noise = [rng.normal(0, 2.0, shape) for _ in range(3)]
        frames.append(
            np.stack([rng.normal(0, 1, shape), nuc + noise[0], mem + noise[1], erc + noise[2]])
        )
    return np.stack(frames).astype(np.float32), nuclei, cells, er


@pytest.fixture(scope="module")
def synthetic():
    return scene()


def match(truth, labels):
    """For each true object: (best label, IoU with it)."""
    out = []
    for i in range(1, truth.max() + 1):
        t = truth == i
        ids, counts = np.unique(labels[t], return_counts=True)
        counts[ids == 0] = 0
        best = ids[np.argmax(counts)]
        p = labels == best
        out.append((int(best), np.count_nonzero(t & p) / np.count_nonzero(t | p)))
    return out


# --------------------------------------------------------------------------- library


def test_scale_unit_clips_to_p1_p99_and_is_affine_invariant():
    x = np.random.default_rng(0).normal(size=(4, 20, 20)).astype(np.float32)
    u = seg.scale_unit(x)
    lo, hi = np.percentile(x, [1, 99])
    assert u.dtype == np.float32 and u.min() == 0.0 and u.max() == 1.0
    np.testing.assert_allclose(u, np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-6)
    np.testing.assert_allclose(seg.scale_unit(3.0 * x + 7.0), u, atol=1e-5)
    assert not seg.scale_unit(np.full((2, 3, 3), 5.0)).any()
    np.testing.assert_allclose(seg.scale_unit(x, limits=(0.0, 1.0)), np.clip(x, 0, 1))


def test_nuclei_recovered_and_touching_pair_split(synthetic):
    data, nuclei, _, _ = synthetic
    labels = seg.segment_nuclei(data[0, 1], SPACING)
    assert labels.dtype == np.int32
    assert labels.max() == len(NUCLEI)
    assert sorted(np.unique(labels[labels > 0]).tolist()) == list(range(1, len(NUCLEI) + 1))
    matches = match(nuclei, labels)
    assert len({b for b, _ in matches}) == len(NUCLEI), matches  # the touching pair is split
    assert min(iou for _, iou in matches) > 0.8, matches


def test_cells_from_membrane_keep_nucleus_ids(synthetic):
    data, nuclei, cells, _ = synthetic
    nuc = seg.segment_nuclei(data[0, 1], SPACING)
    labels = seg.segment_cells(nuc, data[0, 2], SPACING)
    assert len(np.unique(labels[labels > 0])) == len(NUCLEI)
    # in-plane: boundaries on the membrane outline (the caps do not fool it), background kept
    matches = match(cells.max(axis=0), labels.max(axis=0))
    assert len({b for b, _ in matches}) == len(NUCLEI), matches
    assert min(iou for _, iou in matches) > 0.8, matches
    assert not labels[:, 100:, 100:].any()
    # axially: a cell spans its nucleus's slices; nucleus voxels keep their id
    for i in range(1, nuc.max() + 1):
        zs = np.flatnonzero((labels == i).any(axis=(1, 2)))
        assert zs.tolist() == np.flatnonzero((nuc == i).any(axis=(1, 2))).tolist()
    assert np.array_equal(labels[nuc > 0], nuc[nuc > 0])


def test_nuclei_3d_split(synthetic):
    data, nuclei, _, _ = synthetic
    labels = seg.segment_nuclei(data[0, 1], SPACING, split="3d")
    matches = match(nuclei, labels)
    assert labels.max() == len(NUCLEI) and len({b for b, _ in matches}) == len(NUCLEI)


def test_cells_without_membrane_expand_nuclei():
    nuc = np.zeros((5, 40, 40), np.int32)
    nuc[1:4, 10, 10] = 1
    nuc[2, 10, 30] = 2
    cells = seg.segment_cells(nuc, None, spacing=(1.0, 0.5, 0.5), expand_um=3.0)
    assert set(np.unique(cells)) == {0, 1, 2}
    zz, yy, xx = np.nonzero(cells == 1)
    assert sorted(set(zz.tolist())) == [1, 2, 3]  # the nucleus's slices
    assert np.sqrt(((yy - 10) * 0.5) ** 2 + ((xx - 10) * 0.5) ** 2).max() <= 3.0 + 1e-9
    assert np.count_nonzero(cells == 1) == 3 * np.count_nonzero(cells == 2)


def tube_image(seed=1):
    rng = np.random.default_rng(seed)
    tubes = np.zeros((4, 64, 64), bool)
    tubes[:, 10, 4:60] = True
    tubes[:, 4:60, 12] = True
    tubes[:, 50, 20:60] = True
    for i in range(40):
        tubes[:, 20 + i // 2, 20 + i] = True
    img = ndi.gaussian_filter(tubes.astype(float), (0, 0.8, 0.8))
    img /= img[tubes].mean()
    yy, xx = np.mgrid[:64, :64]
    blob = np.exp(-((yy - 40) ** 2 + (xx - 44) ** 2) / (2 * 6**2))  # a broad bright blob
    img += blob[None] + rng.normal(0, 0.05, img.shape)
    near = ndi.binary_dilation(tubes, structure=ndi.generate_binary_structure(2, 1)[None])
    core = np.broadcast_to(blob[None] > 0.5, img.shape) & ~near
    return img.astype(np.float32), tubes, near, core


def test_ridge_finds_thin_tubes_and_ignores_broad_blobs():
    img, tubes, near, core = tube_image()
    mask = seg.segment_target(img, "ridge", sigma=1.0, threshold="otsu", min_size=10)
    assert set(np.unique(mask)) <= {0, 1} and mask.dtype == np.int32
    m = mask.astype(bool)
    assert (m & tubes).sum() / tubes.sum() > 0.95  # recall on the tube centre lines
    assert (m & near).sum() / m.sum() > 0.95  # detections lie on a tube (±1 px)
    assert m[core].mean() < 0.01  # the blob is not a ridge ...
    plain = seg.segment_target(img, "threshold", sigma=1.0, threshold="otsu", min_size=10)
    assert plain[core].mean() > 0.9  # ... while a plain threshold takes it


def test_fixed_threshold_and_small_object_removal():
    img, tubes, _, _ = tube_image()
    strict = seg.segment_target(img, "ridge", sigma=1.0, threshold=0.1, min_size=10)
    assert (strict.astype(bool) & tubes).sum() / tubes.sum() > 0.9
    dots = np.zeros((3, 30, 30), np.float32)
    dots[1, 5, 5] = 1.0  # 1 voxel
    dots[:, 10:14, 10:14] = 1.0  # 48 voxels
    mask = seg.segment_target(dots, "threshold", sigma=0.0, threshold=0.5, min_size=10)
    assert mask.sum() == 48 and mask[1, 5, 5] == 0


@pytest.mark.parametrize("method", seg.METHODS)
def test_same_masks_for_rescaled_prediction(synthetic, method):
    """GT and prediction go through the same p1-p99 scaling: an affine copy gives the same mask."""
    data, _, _, _ = synthetic
    channel = 1 if method == "instance" else 3
    img = data[0, channel]
    a = seg.segment_target(img, method, 1.0, "otsu", 10, SPACING)
    b = seg.segment_target(0.01 * img - 4.0, method, 1.0, "otsu", 10, SPACING)
    assert a.any()
    assert np.mean(a != b) < 1e-4


@pytest.mark.parametrize("method", seg.METHODS)
def test_constant_and_empty_images_give_empty_masks(method):
    for img in (np.zeros((4, 16, 16)), np.full((4, 16, 16), 3.0)):
        mask = seg.segment_target(img, method, 1.0, "otsu", 5)
        assert mask.shape == img.shape and not mask.any()
    nuc = seg.segment_nuclei(np.zeros((4, 16, 16)))
    assert not seg.segment_cells(nuc, np.ones((4, 16, 16))).any()


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="method"):
        seg.segment_target(np.zeros((2, 4, 4)), "frangi")
    with pytest.raises(ValueError, match="threshold"):
        seg.segment_target(np.ones((2, 4, 4)), "threshold", threshold=1.5)
    with pytest.raises(ValueError, match="threshold"):
        seg.segment_target(np.ones((2, 4, 4)), "threshold", threshold="li")


# --------------------------------------------------------------------------- step script


def run_step(repo_root, rule, image, masks, **params):
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(image=str(image)),
        output=types.SimpleNamespace(masks=str(masks)),
        params=types.SimpleNamespace(**params),
        log=[],
        threads=1,
        rule=rule,
    )
    runpy.run_path(str(repo_root / "src/vsbench/steps/segment.py"), init_globals={"snakemake": ns})


def test_step_segment_cells_gt_and_prediction(tmp_path, make_plate, repo_root, synthetic):
    from vsbench import io

    data, nuclei, _, _ = synthetic
    fovs = {"A/1/0": data, "A/1/1": data[:, :, :, ::-1].copy()}
    pre = make_plate(tmp_path / "preprocessed.zarr", fovs, CHANNELS, scale=SPACING)
    pred = make_plate(
        tmp_path / "prediction.zarr",
        {f: 5.0 * d[:, 3:4] + 100.0 for f, d in fovs.items()},
        ["er_prediction"],
        scale=SPACING,
    )
    names = sorted(fovs)

    cells_path = tmp_path / "cells.zarr"
    channels = {"nucleus": "Nucleus", "membrane": "Membrane"}
    run_step(repo_root, "segment_cells", pre, cells_path, channels=channels, fovs=names)
    settings = {"method": "ridge", "sigma": 1.0, "threshold": "otsu", "min_size": 10}
    gt_path, pred_path = tmp_path / "gt_masks.zarr", tmp_path / "masks.zarr"
    run_step(repo_root, "segment_gt", pre, gt_path, channel="ER", fovs=names, settings=settings)
    run_step(
        repo_root,
        "segment",
        pred,
        pred_path,
        channel="er_prediction",
        fovs=names,
        settings=settings,
    )

    with io.open_plate(cells_path) as plate:
        assert io.fov_names(plate) == names
        assert list(plate.channel_names) == ["cells"]
        pos = plate["A/1/0"]
        assert io.scale_zyx(pos) == SPACING
        labels = pos["0"][:]
        assert labels.dtype == np.int32 and labels.shape == (2, 1, *nuclei.shape)
        for t in range(2):
            assert len(np.unique(labels[t, 0])) - 1 == len(NUCLEI)
        flipped = plate["A/1/1"]["0"][:]
        assert len(np.unique(flipped[0, 0])) - 1 == len(NUCLEI)
    with io.open_plate(gt_path) as g, io.open_plate(pred_path) as p:
        assert list(g.channel_names) == ["mask"] == list(p.channel_names)
        for fov in names:
            gm, pm = g[fov]["0"][:], p[fov]["0"][:]
            assert gm.shape == (2, 1, *nuclei.shape) and gm.any()
            assert np.mean(gm != pm) < 1e-4  # same function, scale-invariant


def test_step_without_membrane_and_instance_target(tmp_path, make_plate, repo_root, synthetic):
    from vsbench import io

    data, _, _, _ = synthetic
    pre = make_plate(tmp_path / "pre.zarr", {"B/2/0": data[:1]}, CHANNELS, scale=SPACING)
    channels = {"nucleus": "Nucleus", "membrane": None}
    run_step(
        repo_root, "segment_cells", pre, tmp_path / "c.zarr", channels=channels, fovs=["B/2/0"]
    )
    settings = {"method": "instance", "sigma": 1.0, "threshold": "otsu", "min_size": 30}
    run_step(
        repo_root,
        "segment_gt",
        pre,
        tmp_path / "m.zarr",
        channel="Nucleus",
        fovs=["B/2/0"],
        settings=settings,
    )
    with io.open_plate(tmp_path / "c.zarr") as c, io.open_plate(tmp_path / "m.zarr") as m:
        cells, nuclei = c["B/2/0"]["0"][0, 0], m["B/2/0"]["0"][0, 0]
    assert nuclei.max() == len(NUCLEI)
    assert len(np.unique(cells)) - 1 == len(NUCLEI)
    assert np.count_nonzero(cells) > np.count_nonzero(nuclei)


def test_step_errors(tmp_path, make_plate, repo_root):
    from vsbench.io import InputError

    data = np.random.default_rng(0).random((1, 4, 4, 16, 16)).astype(np.float32)
    pre = make_plate(tmp_path / "pre.zarr", {"A/1/0": data}, CHANNELS)
    settings = {"method": "threshold", "sigma": 1.0, "threshold": "otsu", "min_size": 1}
    with pytest.raises(InputError, match="channel 'Mito' not found"):
        run_step(
            repo_root,
            "segment_gt",
            pre,
            tmp_path / "m.zarr",
            channel="Mito",
            fovs=["A/1/0"],
            settings=settings,
        )
    with pytest.raises(InputError, match="FOV 'A/1/9' not found"):
        run_step(
            repo_root,
            "segment_gt",
            pre,
            tmp_path / "m.zarr",
            channel="ER",
            fovs=["A/1/9"],
            settings=settings,
        )
    with pytest.raises(InputError, match="plate not found"):
        run_step(
            repo_root,
            "segment",
            tmp_path / "nope.zarr",
            tmp_path / "m.zarr",
            channel="ER",
            fovs=["A/1/0"],
            settings=settings,
        )


def test_step_segment_qc_against_truth(tmp_path, make_plate, repo_root):
    """GT masks vs the simulator's true labels: Dice per (FOV, t), PQ for instance targets."""
    import pandas as pd

    from vsbench import io

    truth = np.zeros((2, 1, 4, 16, 16), np.float32)
    truth[:, 0, 1:3, 2:6, 2:6], truth[:, 0, 1:3, 9:13, 9:13] = 1, 2  # two nuclei
    seg_ = truth.copy()
    seg_[1, 0, 1:3, 9:13, 9:13] = 0  # t=1 misses the second nucleus
    with io.create_plate(tmp_path / "masks.zarr", ["mask"]) as plate:
        io.write_fov(plate, "A/1/0", seg_.astype(np.int32), (2.0, 0.325, 0.325))
    make_plate(tmp_path / "truth.zarr", {"A/1/0": np.concatenate([truth * 0, truth], axis=1)},
               ["Phase_true", "Nucleus_labels"])  # fmt: skip
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(
            masks=str(tmp_path / "masks.zarr"), truth=str(tmp_path / "truth.zarr")
        ),
        output=types.SimpleNamespace(table=str(tmp_path / "qc.csv")),
        params=types.SimpleNamespace(fovs=["A/1/0"], truth_channel="Nucleus_labels", instance=True),
        log=[],
        threads=1,
        rule="segment_qc",
    )
    runpy.run_path(str(repo_root / "src/vsbench/steps/segment.py"), init_globals={"snakemake": ns})
    qc = pd.read_csv(tmp_path / "qc.csv")
    assert list(qc.columns) == ["FOV", "Timepoint", "Dice", "IoU", "Precision", "Recall",
                                "n_gt", "n_pred", "mAP", "PQ", "SQ", "RQ"]  # fmt: skip
    assert qc.Dice.tolist() == pytest.approx([1.0, 2 * 32 / (64 + 32)])
    assert qc.PQ.tolist() == pytest.approx([1.0, 2 / 3])  # RQ = 1 / (1 + 0.5), SQ = 1


def test_axial_gate_restores_the_in_focus_extent():
    from vsbench.segment import axial_gate

    column = np.array([0.1, 0.5, 0.95, 1.0, 0.92, 0.4])[:, None, None] * np.ones((1, 3, 3))
    assert axial_gate(column, 0.9)[:, 0, 0].tolist() == [False, False, True, True, True, False]
    assert axial_gate(column, 0.0).all()
