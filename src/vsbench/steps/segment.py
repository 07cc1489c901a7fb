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


def read_fovs(plate, fovs, path):
    for fov in fovs:
        yield fov, io.position(plate, fov, path)


def write_labels(plate, fov, labels_tzyx, scale):
    io.write_fov(plate, fov, labels_tzyx[:, None].astype(np.int32), scale)


def segment_cells(sm) -> None:
    channels = dict(sm.params.channels)
    nucleus_ch, membrane_ch = channels.get("nucleus"), channels.get("membrane")
    if not nucleus_ch:
        raise io.InputError(f"{sm.input.image}: params.channels needs a 'nucleus' channel")
    src = io.open_plate(sm.input.image)
    out = io.create_plate(sm.output.masks, ["cells"])
    try:
        for fov, pos in read_fovs(src, sm.params.fovs, sm.input.image):
            where = f"{sm.input.image} FOV {fov}"
            nuc = io.read_channel(pos, nucleus_ch, where)
            mem = io.read_channel(pos, membrane_ch, where) if membrane_ch else None
            spacing = io.scale_zyx(pos)
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
                    fov,
                    t,
                    int(nuclei.max()),
                    len(np.unique(labels[t])) - 1,
                    time.perf_counter() - start,
                )
            write_labels(out, fov, labels, spacing)
    finally:
        out.close()
        src.close()


def segment_target(sm) -> None:
    settings = dict(sm.params.settings or {})
    method = settings.get("method", "threshold")
    kwargs = {
        "method": method,
        "sigma": float(settings.get("sigma", 1.0)),
        "threshold": settings.get("threshold", "otsu"),
        "min_size": int(settings.get("min_size", 10)),
    }
    if method not in seg.METHODS:
        raise io.InputError(f"segmentation method {method!r} unknown (expected {seg.METHODS})")
    src = io.open_plate(sm.input.image)
    out = io.create_plate(sm.output.masks, ["mask"])
    try:
        for fov, pos in read_fovs(src, sm.params.fovs, sm.input.image):
            where = f"{sm.input.image} FOV {fov}"
            image = io.read_channel(pos, sm.params.channel, where)
            spacing = io.scale_zyx(pos)
            limits = seg.percentile_limits(image)
            masks = np.zeros(image.shape, dtype=np.int32)
            for t in range(image.shape[0]):
                start = time.perf_counter()
                masks[t] = seg.segment_target(image[t], spacing=spacing, limits=limits, **kwargs)
                log.info(
                    "%s t=%d: %s, %d foreground voxels, %d objects (%.2f s)",
                    fov,
                    t,
                    method,
                    int(np.count_nonzero(masks[t])),
                    int(masks[t].max()) if method == "instance" else -1,
                    time.perf_counter() - start,
                )
            write_labels(out, fov, masks, spacing)
    finally:
        out.close()
        src.close()


def main(sm) -> None:
    if not list(sm.params.fovs):
        raise io.InputError(f"{sm.input.image}: no FOVs to segment (params.fovs is empty)")
    log.info("rule %s: %s -> %s", sm.rule, sm.input.image, sm.output.masks)
    if sm.rule == "segment_cells":
        segment_cells(sm)
    elif sm.rule in ("segment_gt", "segment"):
        segment_target(sm)
    else:
        raise ValueError(
            f"steps/segment.py serves segment_cells, segment_gt, segment; not {sm.rule!r}"
        )


main(snakemake)
