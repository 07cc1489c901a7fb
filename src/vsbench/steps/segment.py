"""Rules segment_cells, segment_gt and segment: label stores written with the same FOV names.

segment_cells: per-cell instance labels ("cells") from the nucleus (+ membrane)
channels. segment_gt / segment: the target mask ("mask") of a GT or a
prediction channel, by one function. Labels are stored as int32 (iohub
writes and reads them exactly), TCZYX with one channel, at the input's scale.
Intensity limits (p1–p99) are taken per FOV over all timepoints so a time
series is scaled consistently.
"""

from vsbench.steps import setup

log = setup(snakemake, "segment")

import time  # noqa: E402

import numpy as np  # noqa: E402

from vsbench import io  # noqa: E402
from vsbench import segment as seg  # noqa: E402


def write_label_store(sm, channel: str, label_fov) -> None:
    """Run `label_fov(pos, where, spacing) -> (T, Z, Y, X)` per FOV into a one-channel int32 store."""
    with io.open_plate(sm.input.image) as src, io.create_plate(sm.output.masks, [channel]) as out:
        for fov in sm.params.fovs:
            pos = io.position(src, fov, sm.input.image)
            spacing = io.scale_zyx(pos)
            labels = label_fov(pos, f"{sm.input.image} FOV {fov}", spacing)
            io.write_fov(out, fov, labels[:, None].astype(np.int32), spacing)


def segment_cells(sm) -> None:
    channels = dict(sm.params.channels)
    nucleus_ch, membrane_ch = channels.get("nucleus"), channels.get("membrane")
    if not nucleus_ch:
        raise io.InputError(f"{sm.input.image}: params.channels needs a 'nucleus' channel")

    def label_fov(pos, where, spacing):
        nuc = io.read_channel(pos, nucleus_ch, where)
        mem = io.read_channel(pos, membrane_ch, where) if membrane_ch else None
        nuc_limits = seg.percentile_limits(nuc)
        mem_limits = seg.percentile_limits(mem) if mem is not None else None
        labels = np.zeros(nuc.shape, dtype=np.int32)
        for t in range(nuc.shape[0]):
            start = time.perf_counter()
            nuclei = seg.segment_nuclei(nuc[t], spacing, limits=nuc_limits)
            labels[t] = seg.segment_cells(
                nuclei,
                None if mem is None else mem[t],
                spacing,
                limits=mem_limits,
            )
            log.info(
                "%s t=%d: %d nuclei, %d cells (%.2f s)",
                where,
                t,
                int(nuclei.max()),
                len(np.unique(labels[t])) - 1,
                time.perf_counter() - start,
            )
        return labels

    write_label_store(sm, "cells", label_fov)


def segment_target(sm) -> None:
    settings = dict(sm.params.settings or {})
    method = settings.get("method", "threshold")
    kwargs = {
        "method": method,
        "sigma": float(settings.get("sigma", 1.0)),
        "threshold": settings.get("threshold", "otsu"),
        "min_size": int(settings.get("min_size", 10)),
        "axial_fraction": float(settings.get("axial_fraction", 0.0)),
    }
    if method not in seg.METHODS:
        raise io.InputError(f"segmentation method {method!r} unknown (expected {seg.METHODS})")

    def label_fov(pos, where, spacing):
        image = io.read_channel(pos, sm.params.channel, where)
        limits = seg.percentile_limits(image)
        masks = np.zeros(image.shape, dtype=np.int32)
        for t in range(image.shape[0]):
            start = time.perf_counter()
            masks[t] = seg.segment_target(image[t], spacing=spacing, limits=limits, **kwargs)
            log.info(
                "%s t=%d: %s, %d foreground voxels, %d objects (%.2f s)",
                where,
                t,
                method,
                int(np.count_nonzero(masks[t])),
                int(masks[t].max()) if method == "instance" else -1,
                time.perf_counter() - start,
            )
        return masks

    write_label_store(sm, "mask", label_fov)


def segment_qc(sm) -> None:
    """The GT segmentation against the simulator's true labels: is the segmenter the weak link?"""
    import pandas as pd

    from vsbench.metrics import instance_metrics, mask_metrics

    channel, instance = str(sm.params.truth_channel), bool(sm.params.instance)
    rows = []
    with io.open_plate(sm.input.masks) as masks, io.open_plate(sm.input.truth) as truth:
        for fov in sm.params.fovs:
            where_m, where_t = f"{sm.input.masks} FOV {fov}", f"{sm.input.truth} FOV {fov}"
            seg_ = io.read_channel(io.position(masks, fov, sm.input.masks), "mask", where_m)
            true = io.read_channel(io.position(truth, fov, sm.input.truth), channel, where_t)
            if seg_.shape != true.shape:
                raise io.InputError(
                    f"{where_m}: shape {seg_.shape} != truth {true.shape} in {where_t}"
                )
            for t in range(seg_.shape[0]):
                row = {"FOV": fov, "Timepoint": t, **mask_metrics(true[t], seg_[t])}
                if instance:
                    row.update(instance_metrics(true[t].astype(np.int64), seg_[t]))
                rows.append(row)
    columns = ["FOV", "Timepoint", "Dice", "IoU", "Precision", "Recall"] + (
        ["n_gt", "n_pred", "mAP", "PQ", "SQ", "RQ"] if instance else []
    )
    table = pd.DataFrame(rows)[columns]
    io.write_table(table, sm.output.table)
    log.info("segmentation vs truth (%s): mean Dice %.3f%s", channel, table["Dice"].mean(),
             f", PQ {table['PQ'].mean():.3f}" if instance else "")  # fmt: skip


def main(sm) -> None:
    if not list(sm.params.fovs):
        where = getattr(sm.input, "image", None) or sm.input.masks
        raise io.InputError(f"{where}: no FOVs to segment (params.fovs is empty)")
    if sm.rule == "segment_qc":
        return segment_qc(sm)
    log.info("rule %s: %s -> %s", sm.rule, sm.input.image, sm.output.masks)
    if sm.rule == "segment_cells":
        segment_cells(sm)
    elif sm.rule in ("segment_gt", "segment"):
        segment_target(sm)
    else:
        raise ValueError(
            f"steps/segment.py serves segment_cells, segment_gt, segment, segment_qc; not {sm.rule!r}"
        )


main(snakemake)
