"""report: ranking direction, table rendering, figures, and the step end to end."""

import html.parser
import re
import runpy
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vsbench import io
from vsbench import report as rp

STEP = Path(__file__).resolve().parents[1] / "src/vsbench/steps/report.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics_frame() -> pd.DataFrame:
    """Two models on two predict sets; values chosen so each direction has a known winner."""
    return pd.DataFrame(
        {
            "target": ["er"] * 4,
            "train_set": ["ipsc"] * 4,
            "model": ["identity", "unet_small", "identity", "unet_small"],
            "predict_set": ["ipsc_test", "ipsc_test", "a549_all", "a549_all"],
            "n_fov": [2, 2, 3, 3],
            "n_timepoints": [2, 2, 2, 2],
            "PCC_mean": [0.9, 0.8, 0.1, 0.6],
            "PCC_std": [0.01, 0.02, 0.03, 0.04],
            "SSIM_mean": [0.5, 0.5, np.nan, 0.2],  # tie on ipsc_test; NaN never wins
            "SSIM_std": [0.1, 0.1, np.nan, 0.1],
            "NRMSE_mean": [0.3, 0.1, 0.2, 0.4],
            "NRMSE_std": [0.0, 0.0, 0.0, 0.0],
            "Dice_mean": [0.2, 0.7, 0.3, 0.5],
            "Dice_std": [0.1, 0.1, 0.1, 0.1],
            "TP_mean": [10.0, 99.0, 5.0, 50.0],
            "TP_std": [1.0, 1.0, 1.0, 1.0],
            "n_cells_mean": [4.0, 9.0, 4.0, 9.0],
            "n_cells_std": [0.0, 0.0, 0.0, 0.0],
            "CP_FID_mean": [2.0, 1.0, 0.5, 3.0],
            "CP_FID_std": [0.1, 0.1, 0.1, 0.1],
            "FSC_XY_resolution_mean": [0.9, 0.7, 0.8, 0.6],
            "FSC_XY_resolution_std": [0.0, 0.0, 0.0, 0.0],
        }
    )


@pytest.mark.parametrize(
    "column, direction",
    [
        ("PCC_mean", "higher"),
        ("SSIM_mean", "higher"),
        ("Dice_mean", "higher"),
        ("PSNR_mean", "higher"),
        ("CP_Median_Cosine_Similarity_mean", "higher"),
        ("NRMSE_mean", "lower"),
        ("CP_FID_mean", "lower"),
        ("Dataset_CP_FID_mean", "lower"),
        ("KID_mean", "lower"),
        ("FSC_Z_resolution_mean", "lower"),
        ("MIND", "lower"),
        ("SpectralFID_mean", "lower"),
        ("confidence_mean", "higher"),  # 'fid' inside a word is not FID
        ("TP_mean", None),
        ("FN_mean", None),
        ("n_cells_mean", None),
        ("feature_n_cells_mean", None),
        ("probe_AUROC_mean", None),
    ],
)
def test_metric_direction(column, direction):
    assert rp.metric_direction(column) == direction


def test_best_mask_respects_direction_groups_ties_and_counts():
    df = metrics_frame()
    bold = rp.best_mask(df)
    # within ipsc_test (rows 0, 1) and a549_all (rows 2, 3)
    assert bold["PCC_mean"].tolist() == [True, False, False, True]
    assert bold["SSIM_mean"].tolist() == [True, True, False, True]
    assert bold["NRMSE_mean"].tolist() == [False, True, True, False]
    assert bold["CP_FID_mean"].tolist() == [False, True, True, False]
    assert bold["FSC_XY_resolution_mean"].tolist() == [False, True, False, True]
    assert not bold["TP_mean"].any() and not bold["n_cells_mean"].any()
    # without grouping one winner over the whole table
    overall = rp.best_mask(df, group_by=None)
    assert overall["PCC_mean"].tolist() == [True, False, False, False]
    assert overall["NRMSE_mean"].tolist() == [False, True, False, False]


def _unescaped_count(text: str, char: str) -> int:
    return len(re.findall(r"(?<!\\)" + re.escape(char), text))


def test_markdown_table_is_well_formed_with_bold_best():
    df = metrics_frame()
    table = rp.comparison_table(df)
    md = rp.markdown_table(table)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(df)
    pipes = {_unescaped_count(line, "|") for line in lines}
    assert pipes == {len(table.header) + 1}
    assert re.fullmatch(r"\|( (:---|---:) \|)+", lines[1])
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "NRMSE ↓" in header and "PCC ↑" in header and "TP" in header
    row1 = [c.strip() for c in re.split(r"(?<!\\)\|", lines[3])[1:-1]]
    cell = dict(zip(header, row1, strict=True))
    assert cell["model"] == r"unet\_small"
    assert cell["NRMSE ↓"] == "**0.1 ± 0**"
    assert cell["PCC ↑"] == "0.8 ± 0.02"
    assert cell["TP"] == "99 ± 1"  # count: shown, never bold
    assert md.count("**") == 2 * sum(map(sum, table.bold))


def test_latex_table_is_well_formed_and_escaped():
    df = metrics_frame()
    table = rp.comparison_table(df)
    tex = rp.latex_table(table, caption="er: metrics_table", label="tab:metrics_er")
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
    body = tex[tex.index(r"\midrule") + len(r"\midrule") : tex.index(r"\bottomrule")]
    rows = [r for r in body.strip().splitlines()]
    assert len(rows) == len(df)
    for row in rows + [tex.splitlines()[5]]:
        assert row.endswith(r" \\")
        assert _unescaped_count(row, "&") == len(table.header) - 1
    # every underscore outside \label is escaped, braces balance
    text = re.sub(r"\\label\{[^}]*\}", "", tex)
    assert "_" not in text.replace(r"\_", "")
    assert r"unet\_small" in tex and r"metrics\_table" in tex
    assert text.count("{") == text.count("}")
    assert r"\textbf{0.1 $\pm$ 0}" in tex
    assert tex.count(r"\textbf{") == sum(map(sum, table.bold))
    assert r"NRMSE $\downarrow$" in tex


def test_html_table_escapes_text():
    table = rp.Table(["a<b"], [["x & y"]], [[True]])
    out = rp.html_table(table)
    assert "a&lt;b" in out and "<strong>x &amp; y</strong>" in out


def test_benchmark_summary_totals_and_max():
    records = pd.DataFrame(
        {
            "rule": ["train", "train", "predict"],
            "s": [10.0, 30.0, 5.0],
            "max_rss": [100.0, "-", 50.0],
        }
    )
    out = rp.benchmark_summary(records)
    assert out["rule"].tolist() == ["train", "predict"]
    assert out["jobs"].tolist() == [2, 1]
    assert out["total_s"].tolist() == [40.0, 5.0]
    assert out["max_s"].tolist() == [30.0, 5.0]
    assert out["max_rss_mb"].tolist() == [100.0, 50.0]
    assert rp.benchmark_summary(pd.DataFrame(columns=["rule", "s"])).empty


def test_tilt_per_fov_circular_mean_and_wrapped_error():
    tilt = pd.DataFrame(
        {
            "fov": ["A/1/0"] * 2 + ["A/1/1"] * 2,
            "t": [0, 0, 0, 0],
            "subtile": [0, 1, 0, 1],
            "zenith": [0.10, 0.20, 0.30, 0.30],
            "azimuth": [np.pi - 0.1, -np.pi + 0.1, 0.5, 0.7],
            "true_zenith": [0.15, 0.15, 0.3, 0.3],
            "true_azimuth": [-np.pi + 0.05, -np.pi + 0.05, 0.6, 0.6],
        }
    )
    out = rp.tilt_per_fov(tilt)
    assert out["fov"].tolist() == ["A/1/0", "A/1/1"]
    assert out["zenith"].tolist() == pytest.approx([0.15, 0.30])
    assert abs(abs(out.loc[0, "azimuth"]) - np.pi) < 1e-9  # not 0: the circular mean
    assert out.loc[0, "azimuth_error"] == pytest.approx(-0.05, abs=1e-9)
    assert out.loc[1, "azimuth_error"] == pytest.approx(0.0, abs=1e-9)


def test_per_condition_and_segment_qc_summaries():
    pixel = pd.DataFrame({"FOV": ["A/1/0", "A/1/0", "A/2/0", "A/2/0"], "Timepoint": [0, 1, 0, 1],
                          "PCC": [0.8, 0.6, 0.2, 0.4], "SSIM": [0.5, 0.5, 0.1, 0.3]})  # fmt: skip
    out = rp.per_condition({("s", "unet", "ps"): pixel}, {"ps": {"A/1/0": "mock", "A/2/0": "denv"}})
    assert out["condition"].tolist() == ["denv", "mock"]
    assert out["PCC_mean"].tolist() == pytest.approx([0.3, 0.7])
    assert out["PCC_std"].tolist() == pytest.approx([0.1, 0.1]) and out["n"].tolist() == [2, 2]
    assert "Spectral_PCC_mean" not in out  # only the columns the table has
    unknown = rp.per_condition({("s", "m", "other"): pixel}, {})
    assert unknown["condition"].tolist() == ["unknown"]
    qc = rp.segment_qc_summary({"ps": pd.DataFrame({"Dice": [0.8, 0.6], "PQ": [0.5, 0.7]})})
    assert qc.to_dict("records") == [{"predict_set": "ps", "n": 2, "Dice": 0.7, "PQ": 0.6}]


def test_pick_example_prefers_trained_model():
    df = metrics_frame()
    choice = rp.pick_example(df, "ipsc_test")
    assert choice["model"] == "unet_small"  # identity has the higher PCC but is a baseline
    only = df[df["model"] == "identity"]
    assert rp.pick_example(only, "ipsc_test")["model"] == "identity"
    assert rp.pick_example(df, "nope") is None


def _check_png(path: Path):
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_figures_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.random((24, 32))
    figs = {
        "bars": rp.bar_figure(metrics_frame(), title="er"),
        "bars_empty": rp.bar_figure(metrics_frame()[["train_set", "model", "predict_set"]]),
        "panel": rp.panel_figure(rng.random((24, 32)), gt, gt + 0.1 * rng.random((24, 32))),
        "panel_masks": rp.panel_figure(
            rng.random((24, 32)), gt, gt, gt_mask=gt > 0.5, pred_mask=gt > 0.6
        ),
        "curves": rp.curves_figure(
            {
                "unet": pd.DataFrame(
                    {"epoch": [0, 1, 2], "train_loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.6, 0.4]}
                ),
                "identity": pd.DataFrame(columns=["epoch", "train_loss", "val_loss"]),
            }
        ),
        "curves_gan": rp.curves_figure(
            {
                "gan": pd.DataFrame(
                    {
                        "epoch": [0, 1],
                        "train_loss": [0.8, 0.6],
                        "val_loss": [0.7, 0.5],
                        "d_loss": [0.3, 0.26],
                        "g_loss": [80.0, 60.0],
                    }
                )
            }
        ),
        "tilt_map": rp.tilt_map_figure(
            pd.DataFrame(
                {
                    "position_y_um": [10.0, -50.0],
                    "position_x_um": [60.0, 5.0],
                    "zenith": [0.1, 0.2],
                    "azimuth": [0.2, 4.6],
                    "true_zenith": [0.12, 0.18],
                    "true_azimuth": [0.1, 4.7],
                }
            )
        ),
        "tilt": rp.tilt_figure(
            pd.DataFrame(
                {
                    "fov": ["a", "b"],
                    "zenith": [0.1, 0.2],
                    "azimuth": [3.1, -1.0],
                    "true_zenith": [0.12, 0.18],
                    "true_azimuth": [-3.1, -1.1],
                }
            )
        ),
        "tilt_no_truth": rp.tilt_figure(
            pd.DataFrame({"fov": ["a", "b"], "zenith": [0.1, 0.2], "azimuth": [3.1, -1.0]})
        ),
        "timings": rp.timings_figure(
            rp.benchmark_summary(pd.DataFrame({"rule": ["a", "b"], "s": [1.0, 2.0]}))
        ),
    }
    assert len(figs["curves_gan"].axes) == 3 and len(figs["curves"].axes) == 1  # + D/G panel
    assert len(figs["panel_masks"].axes[1].collections) == 1  # the GT outline
    assert not figs["panel"].axes[1].collections
    assert len(figs["tilt_map"].axes[0].collections) >= 3  # estimated + true arrows, FOVs
    for name, fig in figs.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path, dpi=60)
        _check_png(path)


def test_percentile_scale_range_and_constant():
    img = np.arange(100.0).reshape(10, 10)
    out = rp.percentile_scale(img)
    assert out.min() == 0.0 and out.max() == 1.0
    assert not rp.percentile_scale(np.ones((4, 4))).any()


# --------------------------------------------------------------------------- step end to end

TARGETS = {"nucleus": "Nucleus", "er": "ER"}
MODELS = ["identity", "unet_small"]
PREDICT = {"ipsc_test": ("ipsc", ["A/1/0"]), "a549_all": ("a549", ["B/2/0", "B/2/1"])}
SHAPE = (1, 1, 4, 16, 16)
SCALE = (2.0, 0.325, 0.325)


def _plate(path: Path, channels: list[str], fovs: list[str], rng, dims=SHAPE):
    with io.create_plate(path, channels) as plate:
        for fov in fovs:
            data = rng.random((dims[0], len(channels), *dims[2:])).astype(np.float32)
            io.write_fov(plate, fov, data, SCALE)


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src"):
                self.refs.append(value)
            if key == "id":
                self.ids.add(value)


def test_step_report_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    cells = [
        dict(target=t, train_set="ipsc", model=m, predict_set=ps)
        for t in TARGETS
        for m in MODELS
        for ps in PREDICT
    ]
    channels = {
        ps: {"dataset": ds, "fovs": fovs, "targets": dict(TARGETS)}
        for ps, (ds, fovs) in PREDICT.items()
    }
    phase, fluor, tilt = [], [], []
    for ds, fovs in PREDICT.values():
        d = tmp_path / "datasets" / ds
        _plate(d / "phase.zarr", ["Phase3D"], fovs, rng)
        _plate(d / "preprocessed.zarr", ["BF", *TARGETS.values()], fovs, rng, (2, 0, 4, 16, 16))
        rows = [
            dict(fov=f, t=0, subtile=s, zenith=0.1 * (i + 1), azimuth=0.5 * i, z_offset=0.0,
                 loss=-1.0, iterations=10, skipped=False, method="nadam", wall_s=0.1,
                 true_zenith=0.1 * (i + 1) + 0.01, true_azimuth=0.5 * i - 0.02)
            for i, f in enumerate(fovs)
            for s in range(2)
        ]  # fmt: skip
        pd.DataFrame(rows).to_csv(d / "tilt.csv", index=False)
        phase.append(str(d / "phase.zarr"))
        fluor.append(str(d / "preprocessed.zarr"))
        tilt.append(str(d / "tilt.csv"))
    predictions, curves, metrics = [], [], []
    for c in cells:
        d = tmp_path / "target" / c["target"] / c["train_set"] / c["model"] / c["predict_set"]
        _plate(
            d / "prediction.zarr", [f"{c['target']}_prediction"], PREDICT[c["predict_set"]][1], rng
        )
        predictions.append(str(d / "prediction.zarr"))
    for t in TARGETS:
        for m in MODELS:
            path = tmp_path / "target" / t / "ipsc" / m / "train_log.csv"
            n = 0 if m == "identity" else 3
            pd.DataFrame(
                {
                    "epoch": range(n),
                    "train_loss": np.linspace(1, 0.2, n),
                    "val_loss": np.linspace(1.1, 0.3, n),
                    "lr": [1e-3] * n,
                    "wall_s": [1.0] * n,
                }
            ).to_csv(path, index=False)
            curves.append(str(path))
        df = metrics_frame().assign(target=t)
        path = tmp_path / "target" / t / "metrics.csv"
        df.to_csv(path, index=False)
        metrics.append(str(path))
    bench = tmp_path / "benchmarks"
    for rule, names in {
        "train": ["er/ipsc/unet_small", "nucleus/ipsc/unet_small"],
        "reconstruct": ["ipsc"],
    }.items():
        for i, name in enumerate(names):
            p = bench / rule / f"{name}.tsv"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(
                "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                f"{10.0 + i}\t0:00:10\t120.5\t300.1\t100.0\t110.0\t1.0\t2.0\t50.0\t9.0\n"
            )
    out = tmp_path / "report"
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(
            metrics=metrics, curves=sorted(curves), predictions=predictions, phase=phase,
            fluorescence=fluor, tilt=tilt,
        ),
        output=types.SimpleNamespace(
            html=str(out / "index.html"), tables=str(out / "tables"), figures=str(out / "figures")
        ),
        params=types.SimpleNamespace(cells=cells, channels=channels, benchmarks_dir=str(bench)),
        log=[],
        threads=1,
        rule="report",
    )  # fmt: skip
    runpy.run_path(str(STEP), init_globals={"snakemake": ns})

    page = (out / "index.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert parser.refs
    for ref in parser.refs:
        if ref.startswith("#"):
            assert ref[1:] in parser.ids, ref
            continue
        assert "://" not in ref and not ref.startswith("/"), ref
        assert (out / ref).is_file(), ref
    for t in TARGETS:
        for ext in ("csv", "md", "tex"):
            assert (out / "tables" / f"metrics_{t}.{ext}").is_file()
        for kind in ("bars", "example", "curves"):
            _check_png(out / "figures" / f"{kind}_{t}.png")
        assert f"figures/example_{t}.png" in parser.refs
        assert f"tables/metrics_{t}.tex" in parser.refs
    for ds in ("ipsc", "a549"):
        _check_png(out / "figures" / f"tilt_{ds}.png")
        assert (out / "tables" / f"tilt_{ds}.csv").is_file()
    _check_png(out / "figures" / "timings.png")
    timings = pd.read_csv(out / "tables" / "timings.csv")
    assert dict(zip(timings["rule"], timings["total_s"], strict=True)) == {
        "train": 21.0,
        "reconstruct": 10.0,
    }
    # the example is the best trained model on the first predict set, not the identity baseline
    assert "ipsc/unet_small on ipsc_test, FOV A/1/0" in page
    assert "<strong>" in page and "unet_small" in page
    assert not list(out.rglob(".*.tmp"))
