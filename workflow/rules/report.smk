# report: report/index.html with tables, bar plots, example panels, training curves
# and per-rule timings; figures and tables are flagged for `snakemake --report`.


rule report:
    input:
        unpack(report_inputs),
    output:
        html="report/index.html",
        tables=report(
            directory("report/tables"),
            patterns=["{name}.csv"],
            caption="../report/tables.rst",
            category="Tables",
        ),
        figures=report(
            directory("report/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        cells=lambda wc: vconfig.benchmark_cells(config),
        channels=lambda wc: {
            ps: {
                "dataset": predict_dataset(ps),
                "fovs": predict_fovs(ps),
                "targets": {
                    t: target_channel(predict_dataset(ps), t)
                    for t in CAMPAIGN["targets"]
                },
            }
            for ps in CAMPAIGN["predict_sets"]
        },
        models=lambda wc: {m: config["models"][m]["arch"] for m in CAMPAIGN["models"]},
        conditions=lambda wc: {
            ps: {
                f: vconfig.fov_condition(MANIFESTS[predict_dataset(ps)], f)
                for f in predict_fovs(ps)
            }
            for ps in CAMPAIGN["predict_sets"]
        },
        benchmarks_dir="benchmarks",
    script:
        f"{STEPS}/report.py"
