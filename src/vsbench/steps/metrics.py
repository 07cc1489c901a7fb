"""Rule metrics: pixel.csv, mask.csv and feature.csv, one row per (FOV, Timepoint), and
eval_timing.csv (seconds per (FOV, t) and region: read, pixel, fsc, mask, instance, features).

The pixel bundle runs on params.device (torch; FSC through cubic on the CPU); spacing comes
from the GT store's scale and the per-cell PCC from input.cells (the shared cell labels).

The prediction plate holds one channel, "{target}_prediction"; the GT is the
target's channel of the preprocessed plate. Definitions of every metric and
of the NaN rules (constant volume, empty masks, fewer than two cells) are in
vsbench.metrics. Feature metrics use the image-derived columns
(vsbench.features.IMAGE_FEATURES, intensity and GLCM texture): shape comes from the
shared cell labels and is identical for GT and prediction by construction.
Loading torch-fidelity (torch + torchvision) costs a few seconds per job.

mask.csv gains the instance columns (n_gt, n_pred, AP_0.50 ... AP_0.95, mAP,
PQ, SQ, RQ) only for instance targets: params.segmentation_method ==
"instance" when the rule passes it, otherwise when any GT mask of the job has
a label > 1 (binary 0/1 masks carry no objects to match).
feature.csv: per (FOV, t) CP_FID, CP_KID(_std), CP_Median_Cosine_Similarity and
the dataset-level FID, KID, precision/recall/F1, MIND and the GT-vs-prediction
probe (repeated on every row); KID subsets = settings["kid_subsets"], and KID
and MIND draw from params.seed. None of these imports sklearn or scipy.stats
(~1 s per job).
"""

from vsbench.steps import setup

log = setup(snakemake, "metrics")

import functools  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from vsbench import io  # noqa: E402
from vsbench.features import IMAGE_FEATURES  # noqa: E402
from vsbench.metrics import (  # noqa: E402
    INSTANCE_COLUMNS,
    MASK_COLUMNS,
    PIXEL_COLUMNS,
    feature_metrics,
    fsc_resolution,
    instance_metrics,
    mask_metrics,
    pixel_metrics,
)
from vsbench.steps import resolve_device, torch_threads  # noqa: E402

TIMING_COLUMNS = ["FOV", "Timepoint", "region", "seconds"]


def prediction_channel(plate, path) -> str:
    """The single prediction channel (or the one named *_prediction)."""
    names = list(plate.channel_names)
    if len(names) == 1:
        return names[0]
    pred = [n for n in names if n.endswith("_prediction")]
    if len(pred) != 1:
        raise io.InputError(f"{path}: expected one '*_prediction' channel, found {names}")
    return pred[0]


def read_pair(plate_a, path_a, ch_a, plate_b, path_b, ch_b, fov):
    a = io.read_channel(io.position(plate_a, fov, path_a), ch_a, f"{path_a} FOV {fov}")
    b = io.read_channel(io.position(plate_b, fov, path_b), ch_b, f"{path_b} FOV {fov}")
    if a.shape != b.shape:
        raise io.InputError(
            f"{path_b} FOV {fov}: shape (T, Z, Y, X) {b.shape} does not match {a.shape} in {path_a}"
        )
    return a, b


def main(sm) -> None:
    inp, out = sm.input, sm.output
    settings = dict(sm.params.settings or {})
    seed = int(sm.params.seed)
    kid_subsets = int(settings.get("kid_subsets", 50))
    fsc = bool(settings.get("fsc", True))
    method = getattr(sm.params, "segmentation_method", None)
    device = resolve_device(str(getattr(sm.params, "device", "cpu")))
    threads = torch_threads(sm)
    log.info(
        "settings %s, seed %s, segmentation method %s, device %s", settings, seed, method, device
    )
    plates = {
        k: io.open_plate(getattr(inp, k)) for k in ("gt_image", "prediction", "gt_masks", "masks")
    }
    cells_path = getattr(inp, "cells", None)
    if cells_path:
        plates["cells"] = io.open_plate(cells_path)
    timing: list[dict] = []  # list.append is atomic: shared by the worker threads
    read_lock = threading.Lock()  # one reader at a time; the computing runs in parallel

    def timed(fov, t, region, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timing.append({"FOV": fov, "Timepoint": t, "region": region,
                       "seconds": time.perf_counter() - start})  # fmt: skip
        return result

    def read_fov(fov):
        gt, pred = timed(fov, -1, "read", read_pair, plates["gt_image"], inp.gt_image,
                         sm.params.channel, plates["prediction"], inp.prediction, pred_ch, fov)  # fmt: skip
        gtm, pm = timed(fov, -1, "read", read_pair, plates["gt_masks"], inp.gt_masks, "mask",
                        plates["masks"], inp.masks, "mask", fov)  # fmt: skip
        if gtm.shape != gt.shape:
            raise io.InputError(
                f"{inp.gt_masks} FOV {fov}: mask shape {gtm.shape} does not match image {gt.shape}"
            )
        cells = None
        if "cells" in plates:
            where = f"{cells_path} FOV {fov}"
            cells = io.read_channel(io.position(plates["cells"], fov, cells_path), "cells", where)
            if cells.shape != gt.shape:
                raise io.InputError(f"{where}: shape {cells.shape} != image {gt.shape}")
        spacing = io.scale_zyx(io.position(plates["gt_image"], fov, inp.gt_image))
        return gt, pred, gtm, pm, cells, spacing

    def evaluate_fov(fov):
        """Every (FOV, t) row of one FOV: only `workers` FOVs are in memory at any time."""
        start = time.perf_counter()
        with read_lock:
            gt, pred, gtm, pm, cells, spacing = read_fov(fov)
        pixel, mask = [], []
        for t in range(gt.shape[0]):
            c_t = cells[t] if cells is not None else None
            row = timed(fov, t, "pixel", pixel_metrics, gt[t], pred[t], spacing, c_t, device)
            if fsc:
                row["XY_FSC_Resolution"], row["Z_FSC_Resolution"] = timed(
                    fov, t, "fsc", fsc_resolution, pred[t], spacing
                )
            pixel.append({"FOV": fov, "Timepoint": t, **row})
            mrow = {
                "FOV": fov,
                "Timepoint": t,
                **timed(fov, t, "mask", mask_metrics, gtm[t], pm[t]),
            }
            if method in (None, "instance"):
                mrow.update(timed(fov, t, "instance", instance_metrics, gtm[t], pm[t]))
            mask.append(mrow)
        log.info("%s: pixel + mask metrics (%.2f s)", fov, time.perf_counter() - start)
        return pixel, mask, bool(gtm.max(initial=0) > 1)

    fov_list = list(sm.params.fovs)
    # the thread budget: `workers` FOVs at a time, the job's threads shared among them
    workers = max(1, min(len(fov_list), threads, int(settings.get("workers", threads))))
    torch.set_num_threads(max(1, threads // workers))
    try:
        pred_ch = prediction_channel(plates["prediction"], inp.prediction)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(evaluate_fov, fov_list))  # in FOV order
    finally:
        for plate in plates.values():
            plate.close()
    pixel_rows = [r for p, _, _ in results for r in p]
    mask_rows = [r for _, m, _ in results for r in m]
    groups = [(r["FOV"], r["Timepoint"]) for r in pixel_rows]
    labelled = any(lab for _, _, lab in results)  # any GT label > 1 in this job
    log.info("%d FOVs on %d worker thread(s), %d torch thread(s) each", len(fov_list), workers,
             torch.get_num_threads())  # fmt: skip

    fovs = set(sm.params.fovs)

    def load(path, columns, what):
        table = io.read_table(path)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise io.InputError(f"{path}: {what} columns {missing[:5]} missing")
        return table[table["fov"].isin(fovs)]

    feature_fn = functools.partial(feature_metrics, kid_subsets=kid_subsets, seed=seed)
    gt_feats = load(inp.gt_features, IMAGE_FEATURES, "feature")
    pred_feats = load(inp.features, IMAGE_FEATURES, "feature")
    feats = timed("all", -1, "features", feature_fn, gt_feats, pred_feats, IMAGE_FEATURES, groups)
    if hasattr(inp, "gt_embeddings"):  # deep features: the same metrics, Encoder_* columns
        gt_emb = io.read_table(inp.gt_embeddings)
        dims = [c for c in gt_emb.columns if c.startswith("e") and c[1:].isdigit()]
        gt_emb = load(inp.gt_embeddings, dims, "embedding")
        pred_emb = load(inp.embeddings, dims, "embedding")
        enc = timed("all", -1, "encoder_features", functools.partial(feature_fn, prefix="Encoder"),
                    gt_emb, pred_emb, dims, groups)  # fmt: skip
        feats = feats.merge(enc.drop(columns=["n_cells"]), on=["fov", "t"], how="left")
    feats = feats.rename(columns={"fov": "FOV", "t": "Timepoint"})
    first = feats.iloc[0] if len(feats) else {}
    log.info(
        "feature metrics over %d paired cells: dataset FID %.4g, KID %.4g, MIND %.4g, "
        "probe AUROC %.3g, encoder FID %.4g",
        int(feats["n_cells"].sum()),
        *(first.get(f"Dataset_CP_{m}", float("nan")) for m in ("FID", "KID", "MIND")),
        first.get("Dataset_CP_RealVsPred_AUROC", float("nan")),
        first.get("Dataset_Encoder_FID", float("nan")),
    )

    io.write_table(pd.DataFrame(pixel_rows, columns=PIXEL_COLUMNS), out.pixel)
    instance = method == "instance" or (method is None and labelled)
    mask_columns = MASK_COLUMNS + (INSTANCE_COLUMNS if instance else [])
    io.write_table(pd.DataFrame(mask_rows, columns=mask_columns), out.mask)
    io.write_table(feats, out.feature)
    if hasattr(out, "timing"):
        io.write_table(pd.DataFrame(timing, columns=TIMING_COLUMNS), out.timing)
    log.info("wrote %s, %s, %s", out.pixel, out.mask, out.feature)


main(snakemake)
