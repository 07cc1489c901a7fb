"""Workflow tests: the real Snakefile on a tiny campaign in a temporary directory.

A copy of the session's small campaign run (conftest.small_campaign_run, also the
reference of the SLURM and fault tests) feeds the checks that need outputs (report,
rerun plans); plan-only checks dry-run the two-plate, two-target tiny campaign,
asserted from Snakemake's own job table.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from campaign import planned_jobs, small_config, snakemake, tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def campaign(small_campaign_run, tmp_path_factory):
    """A copy (mtimes kept: nothing is stale) of the session's small campaign run, so these
    tests may change it without touching the reference other modules compare with."""
    workdir = tmp_path_factory.mktemp("campaign") / "run"
    shutil.copytree(small_campaign_run[0], workdir, symlinks=True)
    return workdir


def test_dry_run_plans_the_whole_campaign_without_importing_torch(tmp_path):
    write_config(tmp_path, tiny_config())
    proc = snakemake(tmp_path, "-n", python_flags=("-X", "importtime"))
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "snakemake" in imported
    for heavy in ("torch", "lightning", "waveorder", "iohub"):
        assert heavy not in imported, f"a dry run imported {heavy}"
    jobs = planned_jobs(tmp_path)
    cells = 2 * 2 * 1 * 2  # targets x models x train sets x predict sets
    assert jobs == {
        "simulate": 2,
        "preprocess": 2,
        "reconstruct_shard": 3,  # ipsc: 4 FOVs in shards of 2; a549: 2 FOVs
        "reconstruct": 2,
        "segment_cells": 2,
        "segment_gt": 4,
        "segment_qc": 4,  # both predict sets are simulated
        "features_gt": 4,
        "train_encoder": 2,
        "train": 4,
        "predict": cells,
        "segment": cells,
        "features": cells,
        "metrics": cells,
        "aggregate": 2,
        "report": 1,
        "all": 1,
    }


def test_one_target_builds_only_what_it_needs(tmp_path):
    write_config(tmp_path, tiny_config())
    jobs = planned_jobs(tmp_path, "target/er/metrics.csv")
    assert jobs["aggregate"] == 1 and jobs["train"] == 2 and jobs["predict"] == 4
    assert "report" not in jobs and "all" not in jobs
    assert jobs["segment_gt"] == 2  # er only, one per predict set


def test_rulegraph_and_dag_render(tmp_path):
    write_config(tmp_path, tiny_config())
    for flag in ("--rulegraph", "--dag"):
        out = snakemake(tmp_path, flag).stdout
        assert out.lstrip().startswith("digraph") and "reconstruct" in out


def test_config_key_typo_fails_before_any_job_naming_the_key(tmp_path):
    cfg = tiny_config()
    cfg["models"]["unet"]["epochz"] = 3
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "epochz" in proc.stdout + proc.stderr
    cfg = tiny_config()
    cfg["campaign"]["models"].append("transformer")
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "campaign.models: unknown name 'transformer'" in proc.stdout + proc.stderr
    assert not (tmp_path / "datasets").exists()


def test_lint_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr or "lints" not in proc.stdout


def test_snakefmt_is_clean():
    snakefmt = Path(sys.executable).parent / "snakefmt"
    proc = subprocess.run(
        [str(snakefmt), "--check", "Snakefile", "workflow/rules"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_campaign_outputs(campaign):
    table = pd.read_csv(campaign / "target/nucleus/metrics.csv")
    assert len(table) == 2
    assert set(table["model"]) == {"identity", "unet"}
    assert set(table["predict_set"]) == {"ipsc_test"}
    for col in ("PCC_mean", "SSIM_mean", "NRMSE_mean", "PSNR_mean", "Dice_mean", "IoU_mean"):
        assert col in table.columns
        assert table[col].notna().all(), col
    assert table["PCC_mean"].between(-1, 1).all()
    assert (campaign / "report/index.html").stat().st_size > 0
    assert (campaign / "target/nucleus/ipsc/unet/model.ckpt").exists()
    assert (campaign / "target/nucleus/ipsc/unet/last.ckpt").exists()
    assert planned_jobs(campaign) == {}


def test_param_change_reruns_only_that_model(campaign):
    cfg = small_config()
    changed = copy.deepcopy(cfg)
    changed["models"]["unet"]["lr"] = 0.005
    write_config(campaign, changed)
    try:
        jobs = planned_jobs(campaign)
        cells = 1  # targets x (the changed model) x train sets x predict sets
        assert jobs == {
            "train": 1,
            "predict": cells,
            "segment": cells,
            "features": cells,
            "metrics": cells,
            "aggregate": 1,
            "report": 1,
            "all": 1,
        }
        snakemake(campaign, "--cores", "2")
        assert planned_jobs(campaign) == {}
    finally:
        write_config(campaign, cfg)


def test_snakemake_report(campaign):
    snakemake(campaign, "--report", "report.html")
    html = (campaign / "report.html").read_text(errors="ignore")
    assert "metrics" in html.lower()


def planned_resources(dry_run: str) -> dict[str, list[str]]:
    """rule -> the `resources:` lines of its planned jobs (grouped jobs are indented)."""
    out: dict[str, list[str]] = {}
    for rule, block in re.findall(r"\n\s*rule (\w+):\n(.*?)(?=\n\S|\n\s*rule |$)", dry_run, re.S):
        line = next(x.strip() for x in block.splitlines() if x.strip().startswith("resources:"))
        out.setdefault(rule, []).append(line)
    return out


def test_slurm_profile_dry_run_without_slurm(tmp_path):
    """The cluster profile plans on a machine without SLURM; GPU rules ask for a GPU."""
    write_config(tmp_path, tiny_config())
    out = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm")).stdout
    assert "Job stats:" in out
    resources = {rule: " ".join(lines) for rule, lines in planned_resources(out).items()}
    # small CPU jobs share an sbatch: each dataset's chain, GT masks + QC, the summaries
    assert {"Group job dataset", "Group job gt", "Group job summary"} <= set(
        re.findall(r"Group job \w+", out)
    )
    for rule in ("reconstruct_shard", "train", "predict", "features", "features_gt"):
        assert "gpu=1" in resources[rule] and "slurm_partition=gpu" in resources[rule], rule
    for rule in (
        "simulate",
        "preprocess",
        "reconstruct",
        "segment",
        "metrics",
        "aggregate",
        "report",
    ):
        assert "gpu=" not in resources[rule] and "slurm_partition=cpu" in resources[rule], rule


def test_four_gpu_profile_is_the_slurm_profile_with_a_ddp_train(tmp_path):
    """profiles/slurm-4gpu differs from profiles/slurm only in `train`, and plans it as one
    4-GPU job with one task per GPU (ntasks-per-node == devices) on the gpu partition."""
    base, four = (
        yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
        for name in ("slurm", "slurm-4gpu")
    )
    assert four["set-resources"].pop("train") == {
        **base["set-resources"].pop("train"),
        "gpu": 4,
        "tasks_per_gpu": 1,
        "nodes": 1,
        "mem_mb": "128000 * attempt",
    }
    assert (four["set-threads"].pop("train"), base["set-threads"].pop("train")) == (32, 8)
    assert four == base

    write_config(tmp_path, tiny_config())
    out = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm-4gpu")).stdout
    resources = planned_resources(out)
    assert resources["train"] and all(
        "slurm_partition=gpu" in x and "gpu=4, tasks_per_gpu=1, nodes=1" in x
        for x in resources["train"]
    ), resources["train"]
    assert all("gpu=1" in x for x in resources["predict"]), resources["predict"]


def test_duplicate_config_key_fails_instead_of_silently_merging(tmp_path):
    write_config(tmp_path, tiny_config())
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text + "seed: 7\n")
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "duplicate key 'seed'" in proc.stdout + proc.stderr


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
]
HARNESS = """<html><body><pre id="result">pending</pre>
<iframe id="f" src="index.html" width="1280" height="900"></iframe>
<script>
document.getElementById("f").onload = function () {
  var d = this.contentDocument;
  var imgs = Array.from(d.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.getAttribute("src"); });
  document.getElementById("result").textContent = JSON.stringify(
    {images: imgs.length, broken: bad, tables: d.querySelectorAll("table").length});
};
</script></body></html>"""


def test_report_renders_in_headless_chromium(campaign, tmp_path):
    """Every image of report/index.html loads in a real browser; every link exists."""
    import json
    import shutil
    from html.parser import HTMLParser

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium as root)")
    report = campaign / "report"

    class Links(HTMLParser):
        refs: list = []

        def handle_starttag(self, tag, attrs):
            self.refs += [v for k, v in attrs if k in ("href", "src") and v]

    parser = Links()
    parser.feed((report / "index.html").read_text())
    files = [r for r in parser.refs if not r.startswith(("#", "http:", "https:"))]
    assert files and all((report / r).is_file() for r in files), files

    harness = report / "_harness.html"
    harness.write_text(HARNESS)
    try:
        flags = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run(
            [*flags, "--virtual-time-budget=15000", "--dump-dom", harness.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    finally:
        harness.unlink()
    found = re.search(r'<pre id="result">(.*?)</pre>', dom, flags=re.S)
    assert found, dom[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["broken"] == [] and result["images"] >= 4 and result["tables"] >= 2, result
    shot = campaign / "report_screenshot.png"
    subprocess.run(
        [
            *flags,
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            (report / "index.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
