"""report: report/index.html with comparison tables, figures and per-rule timings."""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vsbench import io  # noqa: E402
from vsbench import report as rp  # noqa: E402
from vsbench.steps import setup  # noqa: E402

log = setup(snakemake, "report")  # noqa: F821


def as_list(value) -> list[str]:
    """Snakemake gives lists; a hand run with one file gives a plain path."""
    if value is None:
        return []
    if isinstance(value, str | os.PathLike):
        return [str(value)]
    return [str(v) for v in value]


inp = snakemake.input  # noqa: F821
params = snakemake.params  # noqa: F821
metrics_paths = as_list(getattr(inp, "metrics", []))
curve_paths = as_list(getattr(inp, "curves", []))
prediction_paths = as_list(getattr(inp, "predictions", []))
phase_paths = as_list(getattr(inp, "phase", []))
fluorescence_paths = as_list(getattr(inp, "fluorescence", []))
tilt_paths = as_list(getattr(inp, "tilt", []))
qc_paths = as_list(getattr(inp, "qc", []))
pixel_paths = as_list(getattr(inp, "pixel", []))
mask_paths = as_list(getattr(inp, "masks", []))
gt_mask_paths = as_list(getattr(inp, "gt_masks", []))
segment_qc_paths = as_list(getattr(inp, "segment_qc", []))
conditions = dict(getattr(params, "conditions", None) or {})
cells = list(params.cells)
channels = dict(params.channels)
benchmarks_dir = Path(str(getattr(params, "benchmarks_dir", "benchmarks")))
html_path = Path(str(snakemake.output.html))  # noqa: F821
tables_dir = Path(str(snakemake.output.tables))  # noqa: F821
figures_dir = Path(str(snakemake.output.figures))  # noqa: F821
html_dir = html_path.parent

# models whose arch is "identity" are baselines; params.models (name -> arch or
# model config) is optional, the model name "identity" is the fallback
models_param = getattr(params, "models", None) or {}
baselines = {
    name
    for name, spec in dict(models_param).items()
    if (spec.get("arch") if isinstance(spec, dict) else spec) == "identity"
} or {"identity"}

if len(prediction_paths) != len(cells):
    raise io.InputError(
        f"report: {len(prediction_paths)} prediction stores for {len(cells)} benchmark cells "
        "(input.predictions must align with params.cells)"
    )
for path in (tables_dir, figures_dir, html_dir):
    path.mkdir(parents=True, exist_ok=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def rel(path: Path) -> str:
    return Path(os.path.relpath(path, html_dir)).as_posix()


def save_figure(fig, name: str) -> Path:
    path = figures_dir / f"{name}.png"
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    log.info("wrote %s", path)
    return path


def save_table(table: rp.Table, frame: pd.DataFrame, name: str, caption: str) -> dict[str, Path]:
    out = {
        "CSV": tables_dir / f"{name}.csv",
        "Markdown": tables_dir / f"{name}.md",
        "LaTeX": tables_dir / f"{name}.tex",
    }
    io.write_table(frame, out["CSV"])
    io.write_text(rp.markdown_table(table), out["Markdown"])
    io.write_text(rp.latex_table(table, caption=caption, label=f"tab:{name}"), out["LaTeX"])
    log.info("wrote %s.{csv,md,tex}", tables_dir / name)
    return out


def dataset_store(paths: list[str], dataset: str, what: str) -> str:
    """The store of `dataset` among datasets/{dataset}/<file> paths."""
    for p in paths:
        if Path(p).parent.name == dataset:
            return p
    if len(paths) == 1:
        return paths[0]
    raise io.InputError(f"report: no {what} input for dataset {dataset!r} among {paths}")


def central_slice(path: str, fov: str, channel: str, t: int = 0) -> tuple[np.ndarray, int, int]:
    """Central z slice of one channel at timepoint t, without reading the whole stack."""
    with io.open_plate(path) as plate:
        pos = io.position(plate, fov, path)
        where = f"{path} FOV {fov}"
        c = io.channel_index(pos.channel_names, channel, where)
        arr = pos["0"]
        if arr.ndim != 5:
            raise io.InputError(f"{where}: expected a TCZYX array, got shape {arr.shape}")
        n_t, _, n_z = arr.shape[:3]
        if t >= n_t:
            raise io.InputError(f"{where}: timepoint {t} not present (T = {n_t})")
        return np.asarray(arr[t, c, n_z // 2]), n_z // 2, n_z


# ---------------------------------------------------------------- metrics per target
metrics = {}
for path in metrics_paths:
    df = io.read_table(path)
    missing = [c for c in rp.ID_COLUMNS if c not in df.columns]
    if missing:
        raise io.InputError(f"{path}: missing column(s) {missing} (expected an aggregate table)")
    targets = df["target"].astype(str).unique().tolist() if "target" in df.columns else []
    target = targets[0] if len(targets) == 1 else Path(path).parent.name
    metrics[target] = df.reset_index(drop=True)

predict_sets = list(dict.fromkeys(c["predict_set"] for c in cells)) or list(channels)
several_train_sets = len({c["train_set"] for c in cells}) > 1

curves_by_target: dict[str, dict[str, pd.DataFrame]] = {}
for path in curve_paths:
    parts = Path(path).parts
    if len(parts) < 4:
        raise io.InputError(f"{path}: expected target/<target>/<train_set>/<model>/train_log.csv")
    target, train_set, model = parts[-4], parts[-3], parts[-2]
    try:
        curve = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        curve = pd.DataFrame()
    label = f"{train_set}/{model}" if several_train_sets else model
    curves_by_target.setdefault(target, {})[label] = curve

intro = [
    rp.html_paragraph(
        f"Targets: {', '.join(metrics) or '–'}. "
        f"Models: {', '.join(dict.fromkeys(c['model'] for c in cells)) or '–'}. "
        f"Train sets: {', '.join(dict.fromkeys(c['train_set'] for c in cells)) or '–'}. "
        "Predict sets: "
        + (
            ", ".join(
                f"{ps} ({channels[ps]['dataset']}, {plural(len(channels[ps].get('fovs', [])), 'FOV')})"
                if ps in channels
                else ps
                for ps in predict_sets
            )
            or "–"
        )
        + "."
    ),
    rp.html_paragraph(
        "Values are mean ± std over (FOV, timepoint) (population std, ddof = 0). "
        "↑ higher is better, ↓ lower is better; the best value per metric within each "
        "predict set is bold. Counts and the GT-vs-prediction probe AUROC are not ranked.",
        cls="note",
    ),
]
toc = []
sections = []
for target, df in metrics.items():
    body = []
    table = rp.comparison_table(df, group_by="predict_set")
    files = save_table(table, df, f"metrics_{target}", f"{target}: benchmark metrics")
    body.append(rp.html_table(table))
    body.append(rp.html_links([(rel(p), kind) for kind, p in files.items()]))

    fig = rp.bar_figure(df, title=f"{target}: mean ± std over (FOV, t)")
    body.append(
        rp.html_figure(rel(save_figure(fig, f"bars_{target}")), f"{target}: PCC, SSIM, Dice")
    )

    # example panel: best trained model by PCC on the first predict set
    ps = next((p for p in predict_sets if (df["predict_set"].astype(str) == p).any()), None)
    choice = rp.pick_example(df, ps, baselines=sorted(baselines)) if ps is not None else None
    if choice is not None:
        key = (target, str(choice["train_set"]), str(choice["model"]), ps)
        index = next(
            (
                i
                for i, c in enumerate(cells)
                if (c["target"], c["train_set"], c["model"], c["predict_set"]) == key
            ),
            None,
        )
        if index is None:
            raise io.InputError(
                f"report: metrics row {key} is not a benchmark cell in params.cells"
            )
        spec = channels.get(ps)
        if spec is None:
            raise io.InputError(f"report: params.channels has no predict set {ps!r}")
        dataset = spec["dataset"]
        gt_channel = spec["targets"][target]
        pred_path = prediction_paths[index]
        fovs = list(spec.get("fovs") or [])
        if not fovs:
            with io.open_plate(pred_path) as plate:
                fovs = io.fov_names(plate)
        fov = fovs[0]
        phase_img, z, n_z = central_slice(
            dataset_store(phase_paths, dataset, "phase"), fov, "Phase3D"
        )
        gt_img, _, _ = central_slice(
            dataset_store(fluorescence_paths, dataset, "fluorescence"), fov, gt_channel
        )
        pred_img, _, _ = central_slice(pred_path, fov, f"{target}_prediction")
        outlines = {}
        if mask_paths:  # the example's masks, outlined on the GT and prediction panels
            gt_mask_path = next(
                p for p in gt_mask_paths if Path(p).parts[-4:-1] == (target, "gt", ps)
            )
            outlines = {
                "gt_mask": central_slice(gt_mask_path, fov, "mask")[0],
                "pred_mask": central_slice(mask_paths[index], fov, "mask")[0],
            }
        title = (
            f"{target}: {key[1]}/{key[2]} on {ps}, FOV {fov}, t = 0, z = {z} of {n_z} "
            f"(PCC {rp.format_number(choice.get('PCC_mean', np.nan))})"
        )
        fig = rp.panel_figure(phase_img, gt_img, pred_img, title=title, **outlines)
        body.append(rp.html_figure(rel(save_figure(fig, f"example_{target}")), title))

    # per-condition breakdown (does a model hold up on the infected wells?)
    if pixel_paths and len(pixel_paths) != len(cells):
        raise io.InputError(f"report: {len(pixel_paths)} pixel tables for {len(cells)} cells")
    pixel = {
        (c["train_set"], c["model"], c["predict_set"]): io.read_table(path)
        for c, path in zip(cells, pixel_paths, strict=False)  # none when run without them
        if c["target"] == target
    }
    by_condition = rp.per_condition(pixel, conditions)
    if len(by_condition) and by_condition["condition"].nunique() > 1:
        cond_table = rp.frame_table(by_condition)
        files = save_table(
            cond_table, by_condition, f"conditions_{target}", f"{target}: per condition"
        )
        body += [
            rp.html_paragraph(f"{target}: pixel metrics per condition (mean / std over FOV, t)."),
            rp.html_table(cond_table),
            rp.html_links([(rel(p), kind) for kind, p in files.items()]),
        ]

    # is the segmenter the weak link? GT fluorescence masks vs the simulator's truth
    qc_tables = {
        Path(p).parent.name: io.read_table(p)
        for p in segment_qc_paths
        if Path(p).parts[-4] == target
    }
    if qc_tables:
        summary = rp.segment_qc_summary(qc_tables)
        qc_table = rp.frame_table(summary)
        files = save_table(
            qc_table, summary, f"segment_qc_{target}", f"{target}: GT segmentation vs truth"
        )
        body += [
            rp.html_paragraph(
                f"{target}: the segmentation of the GT fluorescence against the simulator's true "
                "labels (mean over FOV, t): the ceiling of every mask metric above."
            ),
            rp.html_table(qc_table),
            rp.html_links([(rel(p), kind) for kind, p in files.items()]),
        ]

    curves = curves_by_target.get(target, {})
    if curves:
        fig = rp.curves_figure(curves, title=f"{target}: training curves")
        caption = f"{target}: train (solid) and validation (dashed) loss per epoch"
        body.append(rp.html_figure(rel(save_figure(fig, f"curves_{target}")), caption))

    anchor = f"target-{target}"
    toc.append((f"#{anchor}", f"target {target}"))
    sections.append(rp.html_section(f"Target: {target}", body, anchor=anchor))

# ---------------------------------------------------------------- tilt per dataset
tilt_body = []
for path in tilt_paths:
    dataset = Path(path).parent.name
    tilt = io.read_table(path)
    try:
        per_fov = rp.tilt_per_fov(tilt)
    except ValueError as exc:
        raise io.InputError(f"{path}: {exc}") from exc
    table = rp.frame_table(per_fov)
    files = save_table(table, per_fov, f"tilt_{dataset}", f"{dataset}: tilt per FOV")
    fig = rp.tilt_figure(per_fov, title=f"{dataset}: illumination tilt per FOV")
    caption = (
        f"{dataset}: estimated vs true zenith/azimuth per FOV (mean over t and subtiles)"
        if "true_zenith" in per_fov.columns and per_fov["true_zenith"].notna().any()
        else f"{dataset}: estimated zenith/azimuth per FOV"
    )
    figures = [rp.html_figure(rel(save_figure(fig, f"tilt_{dataset}")), caption)]
    if {"position_y_um", "position_x_um"} <= set(per_fov.columns) and per_fov[
        "position_x_um"
    ].notna().all():
        fig = rp.tilt_map_figure(per_fov, title=f"{dataset}: tilt over the well")
        figures.append(
            rp.html_figure(
                rel(save_figure(fig, f"tilt_map_{dataset}")),
                f"{dataset}: tilt vector zenith·(cos, sin)(azimuth) at each FOV (estimated"
                " and, for simulated plates, true)",
            )
        )
    links = rp.html_links([(rel(p), kind) for kind, p in files.items()])
    body = [*figures, rp.html_table(table), links]
    qc_path = next((q for q in qc_paths if Path(q).parent.name == dataset), None)
    qc = io.read_table(qc_path) if qc_path else None
    if qc is not None and len(qc):
        per_fov_qc = qc.groupby("fov", sort=True, as_index=False)["phase_pcc"].mean()
        qc_table = rp.frame_table(per_fov_qc)
        save_table(qc_table, per_fov_qc, f"phase_qc_{dataset}", f"{dataset}: Phase3D vs truth")
        body += [
            rp.html_paragraph(
                f"Phase3D vs the simulated true phase: Pearson {qc['phase_pcc'].mean():.3f}"
                f" ± {qc['phase_pcc'].std(ddof=0):.3f} over {len(qc)} (FOV, t)."
            ),
            rp.html_table(qc_table),
        ]
    tilt_body.append(rp.html_section(dataset, body, level=3))
if tilt_body:
    toc.append(("#tilt", "reconstruction tilt"))
    sections.append(rp.html_section("Reconstruction: illumination tilt", tilt_body, anchor="tilt"))

# ---------------------------------------------------------------- timings
records = []
if benchmarks_dir.is_dir():
    for tsv in sorted(benchmarks_dir.rglob("*.tsv")):
        rule = tsv.relative_to(benchmarks_dir).parts[0]
        if rule == tsv.name:  # a TSV directly under benchmarks/: name it by its stem
            rule = tsv.stem
        try:
            bench = pd.read_csv(tsv, sep="\t")
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            log.warning("skipping unreadable benchmark %s (%s)", tsv, exc)
            continue
        if "s" not in bench.columns:
            log.warning("skipping %s: no 's' column", tsv)
            continue
        cols = [c for c in ("s", "max_rss") if c in bench.columns]
        records.append(bench[cols].assign(rule=rule))
else:
    log.warning("no benchmarks directory %s: timing table is empty", benchmarks_dir)
summary = rp.benchmark_summary(
    pd.concat(records, ignore_index=True) if records else pd.DataFrame(columns=["rule", "s"])
)
table = rp.frame_table(summary)
files = save_table(table, summary, "timings", "wall time per rule")
timing_body = [
    rp.html_paragraph(
        f"From {sum(len(r) for r in records)} Snakemake benchmark records under "
        f"{benchmarks_dir}/ (this report's own job is not yet included).",
        cls="note",
    ),
    rp.html_table(table),
    rp.html_links([(rel(p), kind) for kind, p in files.items()]),
    rp.html_figure(rel(save_figure(rp.timings_figure(summary), "timings")), "wall time per rule"),
]
toc.append(("#timings", "timings"))
sections.append(rp.html_section("Per-rule timings", timing_body, anchor="timings"))

intro.append(rp.html_links(toc))
io.write_text(rp.html_page("vsbench benchmark report", sections, intro=intro), html_path)
log.info("wrote %s", html_path)
