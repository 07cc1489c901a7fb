"""Campaign report: comparison tables, figures and the HTML page, as pure functions.

Tables come from DataFrames, figures from arrays/DataFrames (returned as
matplotlib Figures built without pyplot, so no global state leaks between
figures), the page from strings. The step script does all file I/O.

Which way is better is decided from the metric's name: tokens or substrings
naming NRMSE, FID, KID, FSC resolution, MIND (and errors/losses) are
lower-is-better; counts (TP/FP/FN/TN, n_*) and the GT-vs-prediction probe's
AUROC (best at 0.5, neither direction) are shown but never ranked; every other
metric is higher-is-better. Best values are marked within each predict set,
because only models evaluated on the same data are comparable.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

ID_COLUMNS = ("train_set", "model", "predict_set")
COUNT_COLUMNS = ("n_fov", "n_timepoints")
# case-insensitive prefixes of a name token (tokens split on non-alphanumerics)
LOWER_TOKENS = ("nrmse", "rmse", "mse", "mae", "fid", "kid", "fsc", "mind", "resolution")
LOWER_WORDS = ("error", "loss", "distance")
# case-sensitive substrings, for names that glue words together (e.g. "SpectralFID")
LOWER_SUBSTRINGS = ("NRMSE", "FID", "KID", "FSC", "MIND")
COUNT_TOKENS = ("tp", "fp", "fn", "tn", "count", "counts")
NEUTRAL_TOKENS = ("auroc",)
BAR_METRICS = ("PCC", "SSIM", "Dice")


# --------------------------------------------------------------------------- metric direction


def metric_base(column: str) -> str:
    """Metric name without the aggregate's _mean/_std suffix."""
    return re.sub(r"_(mean|std)$", "", column)


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^0-9a-z]+", name.lower()) if t]


def metric_direction(column: str) -> str | None:
    """'lower', 'higher', or None for columns that are not ranked (counts, AUROC)."""
    base = metric_base(column)
    tokens = _tokens(base)
    if not tokens:
        return None
    if (
        "n" in tokens
        or any(t in COUNT_TOKENS for t in tokens)
        or any(t in NEUTRAL_TOKENS for t in tokens)
    ):
        return None
    if (
        any(t.startswith(p) for t in tokens for p in LOWER_TOKENS)
        or any(t in LOWER_WORDS for t in tokens)
        or any(s in base for s in LOWER_SUBSTRINGS)
    ):
        return "lower"
    return "higher"


def mean_columns(df: pd.DataFrame) -> list[str]:
    """The aggregate's metric means, in table order."""
    return [c for c in df.columns if c.endswith("_mean")]


def best_mask(
    df: pd.DataFrame,
    columns: Sequence[str] | None = None,
    group_by: str | None = "predict_set",
) -> pd.DataFrame:
    """True where a row holds the best value of a ranked column within its group.

    Ties are all marked; NaN never wins; unranked columns are all False.
    """
    columns = list(mean_columns(df) if columns is None else columns)
    mask = pd.DataFrame(False, index=df.index, columns=columns)
    if group_by is not None and group_by in df.columns:
        groups = [idx for _, idx in df.groupby(group_by, sort=False).groups.items()]
    else:
        groups = [df.index]
    for col in columns:
        direction = metric_direction(col)
        if direction is None:
            continue
        values = pd.to_numeric(df[col], errors="coerce").astype(float)
        for idx in groups:
            v = values.loc[idx].to_numpy()
            finite = np.isfinite(v)
            if not finite.any():
                continue
            best = np.min(v[finite]) if direction == "lower" else np.max(v[finite])
            hit = finite & np.isclose(v, best, rtol=1e-9, atol=0.0)
            mask.loc[np.asarray(idx)[hit], col] = True
    return mask


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A rendered-ready table: header, text cells and which cells are bold."""

    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]] = field(default_factory=list)
    align: list[str] = field(default_factory=list)  # "l" or "r" per column

    def __post_init__(self):
        n = len(self.header)
        if not self.bold:
            self.bold = [[False] * n for _ in self.rows]
        if not self.align:
            self.align = ["l"] * n
        for i, row in enumerate(self.rows):
            if len(row) != n or len(self.bold[i]) != n:
                raise ValueError(f"table row {i} has {len(row)} cells, header has {n}")


def format_number(value) -> str:
    """Four significant digits; large values as integers; NaN as an en dash."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "–" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if abs(v) >= 1e4 or (v == int(v) and abs(v) >= 1):
        return f"{v:.0f}"
    return f"{v:.4g}"


def format_mean_std(mean, std) -> str:
    text = format_number(mean)
    try:
        s = float(std)
    except (TypeError, ValueError):
        return text
    if math.isfinite(s) and math.isfinite(float(mean)):
        return f"{text} ± {format_number(s)}"
    return text


def direction_label(column: str) -> str:
    arrow = {"lower": " ↓", "higher": " ↑"}.get(metric_direction(column) or "", "")
    return f"{metric_base(column)}{arrow}"


def comparison_table(df: pd.DataFrame, group_by: str | None = "predict_set") -> Table:
    """Rows = benchmark cells, columns = metrics as 'mean ± std', best per group bold."""
    ids = [c for c in ID_COLUMNS if c in df.columns]
    counts = [c for c in COUNT_COLUMNS if c in df.columns]
    means = mean_columns(df)
    bold = best_mask(df, means, group_by)
    names = {"n_fov": "FOVs", "n_timepoints": "timepoints"}
    header = [names.get(c, c.replace("_", " ")) for c in ids + counts]
    header += [direction_label(c) for c in means]
    rows, flags = [], []
    for i in df.index:
        row = [str(df.at[i, c]) for c in ids] + [format_number(df.at[i, c]) for c in counts]
        flag = [False] * (len(ids) + len(counts))
        for col in means:
            std_col = f"{metric_base(col)}_std"
            std = df.at[i, std_col] if std_col in df.columns else np.nan
            row.append(format_mean_std(df.at[i, col], std))
            flag.append(bool(bold.at[i, col]))
        rows.append(row)
        flags.append(flag)
    align = ["l"] * len(ids) + ["r"] * (len(counts) + len(means))
    return Table(header, rows, flags, align)


def frame_table(df: pd.DataFrame) -> Table:
    """Plain table (no ranking) from a DataFrame, numbers formatted."""
    header = [str(c) for c in df.columns]
    rows = []
    for i in df.index:
        rows.append(
            [
                format_number(v) if isinstance(v, int | float | np.number) else str(v)
                for v in df.loc[i].tolist()
            ]
        )
    align = ["r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in df.columns]
    return Table(header, rows, align=align)


_MD_SPECIAL = re.compile(r"([\\`*_|\[\]<>#])")


def markdown_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def markdown_table(table: Table) -> str:
    """GitHub-flavoured Markdown; bold as **x**."""

    def cell(text, bold):
        text = markdown_escape(text)
        return f"**{text}**" if bold else text

    lines = ["| " + " | ".join(markdown_escape(h) for h in table.header) + " |"]
    lines.append("| " + " | ".join("---:" if a == "r" else ":---" for a in table.align) + " |")
    for row, bold in zip(table.rows, table.bold, strict=True):
        lines.append("| " + " | ".join(cell(t, b) for t, b in zip(row, bold, strict=True)) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "↓": r"$\downarrow$",
    "↑": r"$\uparrow$",
    "–": r"--",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_table(table: Table, caption: str = "", label: str = "") -> str:
    """A booktabs table environment (needs \\usepackage{booktabs}); bold as \\textbf."""

    def cell(text, bold):
        text = latex_escape(text)
        return rf"\textbf{{{text}}}" if bold else text

    lines = [
        "% requires \\usepackage{booktabs}",
        r"\begin{table}[ht]",
        r"\centering",
        r"\begin{tabular}{" + "".join(table.align) + "}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in table.header) + r" \\",
        r"\midrule",
    ]
    for row, bold in zip(table.rows, table.bold, strict=True):
        lines.append(" & ".join(cell(t, b) for t, b in zip(row, bold, strict=True)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + latex_escape(caption) + "}")
    if label:
        lines.append(r"\label{" + re.sub(r"[^A-Za-z0-9:_-]", "-", label) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def html_table(table: Table) -> str:
    e = html.escape
    out = ["<table>", "<thead><tr>"]
    out += [f'<th class="{a}">{e(h)}</th>' for h, a in zip(table.header, table.align, strict=True)]
    out.append("</tr></thead>")
    out.append("<tbody>")
    for row, bold in zip(table.rows, table.bold, strict=True):
        cells = []
        for text, b, a in zip(row, bold, table.align, strict=True):
            body = f"<strong>{e(text)}</strong>" if b else e(text)
            cells.append(f'<td class="{a}">{body}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# --------------------------------------------------------------------------- summaries


def benchmark_summary(records: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, total and max wall seconds, peak RSS (MB) from Snakemake benchmarks.

    `records` has one row per benchmark TSV row with columns rule, s and
    optionally max_rss (MB, as Snakemake writes it; "-" when not measured).
    """
    cols = ["rule", "jobs", "total_s", "max_s", "max_rss_mb"]
    if records.empty:
        return pd.DataFrame(columns=cols)
    rec = records.copy()
    rec["s"] = pd.to_numeric(rec["s"], errors="coerce")
    rss = rec["max_rss"] if "max_rss" in rec.columns else pd.Series(np.nan, index=rec.index)
    rec["max_rss"] = pd.to_numeric(rss, errors="coerce")
    out = (
        rec.groupby("rule", sort=True)
        .agg(
            jobs=("s", "size"),
            total_s=("s", "sum"),
            max_s=("s", "max"),
            max_rss_mb=("max_rss", "max"),
        )
        .reset_index()
    )
    return out.sort_values("total_s", ascending=False, kind="stable").reset_index(drop=True)[cols]


def _circular_mean(angles: pd.Series) -> float:
    a = pd.to_numeric(angles, errors="coerce").dropna().to_numpy(float)
    if a.size == 0:
        return np.nan
    return float(np.arctan2(np.sin(a).mean(), np.cos(a).mean()))


def wrap_to(angle: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`angle` shifted by multiples of 2π to lie within π of `reference`."""
    angle = np.asarray(angle, float)
    reference = np.asarray(reference, float)
    return reference + (angle - reference + np.pi) % (2 * np.pi) - np.pi


def tilt_per_fov(tilt: pd.DataFrame) -> pd.DataFrame:
    """Per FOV over (t, subtile): mean zenith and z_offset, circular-mean azimuth (and truth).

    Azimuth errors are wrapped to (−π, π]; zenith/azimuth are in the tilt table's units
    (radians), z_offset in z slices; the FOV's position in its well is kept when known.
    """
    for col in ("fov", "zenith", "azimuth"):
        if col not in tilt.columns:
            raise ValueError(f"tilt table: missing column {col!r}")
    has_true = {"true_zenith", "true_azimuth"} <= set(tilt.columns)
    mean = lambda g, c: float(pd.to_numeric(g[c], errors="coerce").mean())  # noqa: E731
    rows = []
    for fov, g in tilt.groupby("fov", sort=True):
        row = {
            "fov": str(fov),
            "zenith": mean(g, "zenith"),
            "azimuth": _circular_mean(g["azimuth"]),
        }
        if "z_offset" in g:
            row["z_offset"] = mean(g, "z_offset")
        for col in ("position_y_um", "position_x_um"):
            if col in g:
                row[col] = mean(g, col)
        if has_true:
            row["true_zenith"] = mean(g, "true_zenith")
            row["true_azimuth"] = _circular_mean(g["true_azimuth"])
            row["zenith_error"] = row["zenith"] - row["true_zenith"]
            row["azimuth_error"] = float(
                wrap_to(row["azimuth"], row["true_azimuth"]) - row["true_azimuth"]
            )
            if "true_z_offset" in g and "z_offset" in row:
                row["true_z_offset"] = mean(g, "true_z_offset")
                row["z_offset_error"] = row["z_offset"] - row["true_z_offset"]
        rows.append(row)
    columns = [c for c in TILT_COLUMNS if any(c in r for r in rows)] or ["fov", "zenith", "azimuth"]
    return pd.DataFrame(rows).reindex(columns=columns)


TILT_COLUMNS = [
    "fov",
    "position_y_um",
    "position_x_um",
    "zenith",
    "azimuth",
    "z_offset",
    "true_zenith",
    "true_azimuth",
    "true_z_offset",
    "zenith_error",
    "azimuth_error",
    "z_offset_error",
]


def per_condition(pixel: Mapping[tuple, pd.DataFrame], conditions: Mapping[str, Mapping[str, str]],
                  metrics: Sequence[str] = ("PCC", "SSIM", "Spectral_PCC")) -> pd.DataFrame:  # fmt: skip
    """Mean ± std over (FOV, t) per condition of each benchmark cell's pixel table.

    `pixel`: (train_set, model, predict_set) → pixel.csv frame; `conditions`:
    predict_set → {fov: condition}. One row per (train_set, model, predict_set, condition).
    """
    rows = []
    for (train_set, model, predict_set), df in pixel.items():
        cond = df["FOV"].map(dict(conditions.get(predict_set, {}))).fillna("unknown")
        for name, g in df.groupby(cond, sort=True):
            row = {"train_set": train_set, "model": model, "predict_set": predict_set,
                   "condition": name, "n": len(g)}  # fmt: skip
            for m in metrics:
                if m in g:
                    v = pd.to_numeric(g[m], errors="coerce")
                    row[f"{m}_mean"], row[f"{m}_std"] = float(v.mean()), float(v.std(ddof=0))
            rows.append(row)
    return pd.DataFrame(rows)


def segment_qc_summary(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean over (FOV, t) of each predict set's GT-segmentation-vs-truth table."""
    rows = []
    for predict_set, df in tables.items():
        keep = [
            c for c in ("Dice", "IoU", "Precision", "Recall", "mAP", "PQ", "SQ", "RQ") if c in df
        ]
        rows.append({"predict_set": predict_set, "n": len(df),
                     **{c: float(pd.to_numeric(df[c], errors="coerce").mean()) for c in keep}})  # fmt: skip
    return pd.DataFrame(rows)


def pick_example(
    metrics: pd.DataFrame,
    predict_set: str,
    baselines: Sequence[str] = ("identity",),
    by: str = "PCC_mean",
) -> dict | None:
    """The best non-baseline row on `predict_set` by `by` (a baseline only if nothing else)."""
    rows = metrics[metrics["predict_set"].astype(str) == str(predict_set)]
    if rows.empty:
        return None
    trained = rows[~rows["model"].astype(str).isin([str(b) for b in baselines])]
    pool = trained if not trained.empty else rows
    if by in pool.columns:
        score = pd.to_numeric(pool[by], errors="coerce")
        if score.notna().any():
            return pool.loc[score.idxmax()].to_dict()
    return pool.iloc[0].to_dict()


# --------------------------------------------------------------------------- figures


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(nrows, ncols)
    return fig, axes


def _cell_label(row: Mapping, several_train_sets: bool) -> str:
    return f"{row['train_set']}/{row['model']}" if several_train_sets else str(row["model"])


def bar_figure(df: pd.DataFrame, metrics: Sequence[str] = BAR_METRICS, title: str = ""):
    """Grouped bars (mean ± std): one panel per metric, groups = predict sets, bars = models."""
    present = [m for m in metrics if f"{m}_mean" in df.columns]
    fig, axes = _figure(1, max(1, len(present)), (4.2 * max(1, len(present)), 3.6))
    if not present:
        axes[0, 0].text(0.5, 0.5, "no PCC/SSIM/Dice in table", ha="center", va="center")
        axes[0, 0].set_axis_off()
        fig.suptitle(title)
        return fig
    several = df["train_set"].nunique() > 1 if "train_set" in df.columns else False
    cell_labels = pd.Series([_cell_label(r, several) for _, r in df.iterrows()], index=df.index)
    labels = list(dict.fromkeys(cell_labels))
    groups = list(dict.fromkeys(df["predict_set"].astype(str)))
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(groups))
    for ax, metric in zip(axes[0], present, strict=False):
        mean = pd.to_numeric(df[f"{metric}_mean"], errors="coerce")
        std_col = f"{metric}_std"
        std = (
            pd.to_numeric(df[std_col], errors="coerce") if std_col in df.columns else mean * np.nan
        )
        for k, label in enumerate(labels):
            means, stds = [], []
            for g in groups:
                sel = (df["predict_set"].astype(str) == g) & (cell_labels == label)
                m = mean[sel].dropna()
                s = std[sel].dropna()
                means.append(float(m.iloc[0]) if len(m) else np.nan)  # NaN: no bar
                stds.append(float(s.iloc[0]) if len(s) else 0.0)
            offset = (k - (len(labels) - 1) / 2) * width
            ax.bar(x + offset, means, width, yerr=stds, capsize=3, label=label, color=f"C{k % 10}")
        ax.set_xticks(x, groups)
        ax.set_title(f"{metric}{' ↓' if metric_direction(metric) == 'lower' else ''}")
        ax.set_xlabel("predict set")
        ax.axhline(0, color="0.3", lw=0.6)
    axes[0, 0].set_ylabel("mean ± std over (FOV, t)")
    fig.legend(
        *axes[0, 0].get_legend_handles_labels(),
        loc="outside lower center",
        ncols=min(len(labels), 6),
        fontsize="small",
    )
    fig.suptitle(title)
    return fig


def percentile_scale(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the [p_low, p_high] range to [0, 1] (clipped); constant images map to 0."""
    img = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros(img.shape)
    lo, hi = np.percentile(img[finite], [low, high])
    if hi <= lo:
        return np.zeros(img.shape)
    return np.clip((np.where(finite, img, lo) - lo) / (hi - lo), 0.0, 1.0)


def panel_figure(
    phase: np.ndarray,
    gt: np.ndarray,
    prediction: np.ndarray,
    title: str = "",
    names: Sequence[str] = ("input phase", "ground truth", "prediction", "|prediction − GT|"),
    gt_mask: np.ndarray | None = None,
    pred_mask: np.ndarray | None = None,
):
    """Input / GT / prediction / |difference| of 2D slices, each percentile-scaled; the GT
    and prediction masks (when given) are outlined on their panels.

    The difference is taken between the percentile-scaled GT and prediction,
    since a prediction lives in the model's normalized units, not the camera's.
    """
    images = [percentile_scale(phase), percentile_scale(gt), percentile_scale(prediction)]
    if images[1].shape == images[2].shape:
        images.append(np.abs(images[2] - images[1]))
    else:
        images.append(np.zeros(images[2].shape))
        names = (*names[:3], "shape mismatch: no difference")
    fig, axes = _figure(1, 4, (13.0, 3.6))
    for ax, img, name in zip(axes[0], images, names, strict=True):
        im = ax.imshow(img, cmap="magma" if ax is axes[0, 3] else "gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.set_axis_off()
    for ax, mask, color in ((axes[0, 1], gt_mask, "cyan"), (axes[0, 2], pred_mask, "yellow")):
        if (
            mask is not None
            and np.asarray(mask).any()
            and np.asarray(mask).shape == images[1].shape
        ):
            ax.contour(np.asarray(mask) > 0, levels=[0.5], colors=color, linewidths=0.6)
    fig.colorbar(im, ax=axes[0, 3], fraction=0.046, pad=0.02)
    fig.suptitle(title)
    return fig


def _has_gan_losses(df) -> bool:
    return (
        df is not None
        and {"d_loss", "g_loss"} <= set(df.columns)
        and pd.to_numeric(df["d_loss"], errors="coerce").notna().any()
    )


def curves_figure(curves: Mapping[str, pd.DataFrame], title: str = ""):
    """Train (solid) and validation (dashed) loss per epoch, one colour per model; a second
    panel shows the discriminator / generator losses of adversarial models."""
    gan = {k: df for k, df in curves.items() if _has_gan_losses(df)}
    fig, axes = _figure(1, 2 if gan else 1, (11.0 if gan else 6.4, 4.0))
    ax = axes[0, 0]
    from matplotlib.ticker import MaxNLocator

    if gan:
        gax = axes[0, 1]
        g2 = gax.twinx()
        for k, (label, df) in enumerate(gan.items()):
            epoch = pd.to_numeric(df["epoch"], errors="coerce")
            d, g = (pd.to_numeric(df[c], errors="coerce") for c in ("d_loss", "g_loss"))
            gax.plot(epoch, d, "-o", ms=3, color=f"C{k}", label=f"{label}: D (LSGAN)")
            g2.plot(epoch, g, "--s", ms=3, color=f"C{k}", label=f"{label}: G (LSGAN + λ·L1)")
        gax.set_xlabel("epoch")
        gax.set_ylabel("discriminator loss (0.25 = undecided)")
        g2.set_ylabel("generator loss")
        gax.xaxis.set_major_locator(MaxNLocator(integer=True))
        gax.set_title("adversarial losses")
        gax.legend(fontsize="small", loc="upper left")
        g2.legend(fontsize="small", loc="upper right")

    drawn = 0
    positive = True
    for label, df in curves.items():
        if df is None or df.empty or "epoch" not in df.columns:
            continue
        color = f"C{drawn % 10}"
        epoch = pd.to_numeric(df["epoch"], errors="coerce")
        plotted = False
        for col, style in (("train_loss", "-"), ("val_loss", "--")):
            if col not in df.columns:
                continue
            y = pd.to_numeric(df[col], errors="coerce")
            ok = epoch.notna() & y.notna()
            if not ok.any():
                continue
            positive &= bool((y[ok] > 0).all())
            name = f"{label} ({'train' if col == 'train_loss' else 'val'})"
            ax.plot(epoch[ok], y[ok], style, color=color, marker="o", ms=3, label=name)
            plotted = True
        drawn += int(plotted)
    if drawn:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no trained model (nothing to plot)", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(title)
    return fig


def tilt_figure(per_fov: pd.DataFrame, title: str = ""):
    """Estimated vs true zenith and azimuth per FOV (estimates per FOV when no truth)."""
    fig, axes = _figure(1, 2, (9.0, 4.0))
    has_true = {"true_zenith", "true_azimuth"} <= set(per_fov.columns) and bool(
        np.isfinite(pd.to_numeric(per_fov["true_zenith"], errors="coerce")).any()
    )
    for ax, key in zip(axes[0], ("zenith", "azimuth"), strict=True):
        est = pd.to_numeric(per_fov[key], errors="coerce").to_numpy(float)
        if has_true:
            true = pd.to_numeric(per_fov[f"true_{key}"], errors="coerce").to_numpy(float)
            if key == "azimuth":
                est = wrap_to(est, true)
            ax.scatter(true, est, s=24)
            finite = np.isfinite(true) & np.isfinite(est)
            if finite.any():
                lo = float(min(true[finite].min(), est[finite].min()))
                hi = float(max(true[finite].max(), est[finite].max()))
                pad = 0.05 * (hi - lo or 1.0)
                ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="y = x")
                ax.legend(fontsize="small")
            ax.set_xlabel(f"true {key} (rad)")
            ax.set_ylabel(f"estimated {key} (rad)")
        else:
            ax.plot(np.arange(len(est)), est, "o")
            ax.set_xticks(np.arange(len(est)), list(per_fov["fov"].astype(str)), rotation=60)
            ax.set_xlabel("FOV")
            ax.set_ylabel(f"estimated {key} (rad)")
        ax.set_title(key)
    fig.suptitle(title)
    return fig


def tilt_map_figure(per_fov: pd.DataFrame, title: str = ""):
    """The plate's tilt field: an arrow zenith·(cos, sin)(azimuth) at each FOV position.

    Estimated arrows in blue, simulated truth (when known) in orange; the arrow length
    scale is printed in the key. Needs position_y_um / position_x_um.
    """
    fig, axes = _figure(1, 1, (5.5, 5.0))
    ax = axes[0][0]
    y = pd.to_numeric(per_fov["position_y_um"], errors="coerce").to_numpy(float)
    x = pd.to_numeric(per_fov["position_x_um"], errors="coerce").to_numpy(float)
    extent = float(np.nanmax(np.hypot(x, y))) if np.isfinite(x).any() else 1.0
    scale = 0.25 / (0.5 * extent or 1.0)  # 0.25 rad ≈ half the well radius
    sets = [("estimated", "zenith", "azimuth", "tab:blue")]
    if (
        "true_zenith" in per_fov
        and np.isfinite(pd.to_numeric(per_fov["true_zenith"], errors="coerce")).any()
    ):
        sets.append(("true", "true_zenith", "true_azimuth", "tab:orange"))
    for label, zc, ac, color in sets:
        zen = pd.to_numeric(per_fov[zc], errors="coerce").to_numpy(float)
        azi = pd.to_numeric(per_fov[ac], errors="coerce").to_numpy(float)
        ax.quiver(
            x,
            y,
            zen * np.cos(azi),
            zen * np.sin(azi),
            angles="xy",
            scale_units="xy",
            scale=scale,
            color=color,
            width=0.006,
            label=label,
        )
    ax.scatter(x, y, s=10, color="k")
    ax.add_patch(matplotlib_circle(extent * 1.1))
    ax.set_xlim(-1.7 * extent, 1.7 * extent)  # room for the arrows of edge FOVs
    ax.set_ylim(-1.7 * extent, 1.7 * extent)
    ax.set_aspect("equal")
    ax.set_xlabel("x in well (µm)")
    ax.set_ylabel("y in well (µm)")
    ax.legend(fontsize="small", loc="lower right", title=f"0.25 rad = {0.25 / scale:.0f} µm")
    ax.set_title(title)
    return fig


def matplotlib_circle(radius: float):
    from matplotlib.patches import Circle

    return Circle((0.0, 0.0), radius, fill=False, ls=":", color="0.5")


def timings_figure(summary: pd.DataFrame, title: str = "wall time per rule"):
    """Horizontal bars of total seconds per rule (max per job as a marker)."""
    n = max(1, len(summary))
    fig, axes = _figure(1, 1, (6.4, 1.0 + 0.35 * n))
    ax = axes[0, 0]
    if summary.empty:
        ax.text(0.5, 0.5, "no benchmark files", ha="center", va="center")
        ax.set_axis_off()
        return fig
    y = np.arange(len(summary))
    ax.barh(y, summary["total_s"].astype(float), color="C0", label="total")
    ax.plot(summary["max_s"].astype(float), y, "k|", ms=12, label="slowest job")
    ax.set_yticks(y, list(summary["rule"].astype(str)))
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1,h2,h3{line-height:1.2} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .55em;white-space:nowrap}
th{background:#f4f4f4} td.r,th.r{text-align:right} td.l,th.l{text-align:left}
figure{margin:1em 0} img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555} .links a{margin-right:1em} .note{color:#555;font-size:.9em}
""".strip()


def html_figure(src: str, caption: str) -> str:
    e = html.escape
    return (
        f'<figure><a href="{e(src, quote=True)}"><img src="{e(src, quote=True)}" '
        f'alt="{e(caption, quote=True)}"></a><figcaption>{e(caption)}</figcaption></figure>'
    )


def html_links(links: Sequence[tuple[str, str]]) -> str:
    e = html.escape
    items = " ".join(f'<a href="{e(href, quote=True)}">{e(text)}</a>' for href, text in links)
    return f'<p class="links">{items}</p>'


def html_paragraph(text: str, cls: str = "") -> str:
    attr = f' class="{html.escape(cls, quote=True)}"' if cls else ""
    return f"<p{attr}>{html.escape(text)}</p>"


def html_section(title: str, body: Sequence[str], level: int = 2, anchor: str = "") -> str:
    ident = f' id="{html.escape(anchor, quote=True)}"' if anchor else ""
    return (
        f"<section{ident}><h{level}>{html.escape(title)}</h{level}>\n"
        + "\n".join(body)
        + "\n</section>"
    )


def html_page(title: str, sections: Sequence[str], intro: Sequence[str] = ()) -> str:
    """One self-contained page (inline CSS, no scripts, relative links only)."""
    e = html.escape
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(title)}</title>",
            f"<style>\n{CSS}\n</style>",
            "</head>",
            "<body>",
            f"<h1>{e(title)}</h1>",
            *intro,
            *sections,
            "</body>",
            "</html>",
            "",
        ]
    )
