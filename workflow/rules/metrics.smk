# metrics: pixel, mask and feature metrics per (FOV, t) for one benchmark cell;
# aggregate: the target's table, one row per (train_set, model, predict_set).


rule metrics:
    input:
        **embedding_inputs(),
        gt_image=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/preprocessed.zarr",
        prediction=f"{CELL}/prediction.zarr",
        gt_masks="target/{target}/gt/{predict_set}/masks.zarr",
        masks=f"{CELL}/masks.zarr",
        gt_features="target/{target}/gt/{predict_set}/features.parquet",
        features=f"{CELL}/features.parquet",
        cells=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/cells.zarr",
    output:
        pixel=os.path.join(CELL, "pixel.csv"),
        mask=os.path.join(CELL, "mask.csv"),
        feature=os.path.join(CELL, "feature.csv"),
        timing=os.path.join(CELL, "eval_timing.csv"),
    log:
        "logs/metrics/{target}/{train_set}/{model}/{predict_set}.log",
    benchmark:
        "benchmarks/metrics/{target}/{train_set}/{model}/{predict_set}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        channel=lambda wc: target_channel(predict_dataset(wc.predict_set), wc.target),
        fovs=lambda wc: predict_fovs(wc.predict_set),
        settings=config["metrics"],
        segmentation_method=lambda wc: config["targets"][wc.target]["segmentation"][
            "method"
        ],
        seed=config["seed"],
        device=config["device"],
    script:
        f"{STEPS}/metrics.py"


rule aggregate:
    input:
        pixel=lambda wc: cell_files(wc.target, "pixel.csv"),
        mask=lambda wc: cell_files(wc.target, "mask.csv"),
        feature=lambda wc: cell_files(wc.target, "feature.csv"),
    output:
        table=report(
            "target/{target}/metrics.csv",
            caption="../report/metrics.rst",
            category="Metrics",
            labels={"target": "{target}", "table": "metrics"},
        ),
    log:
        "logs/aggregate/{target}.log",
    benchmark:
        "benchmarks/aggregate/{target}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cells=lambda wc: cells_for(wc.target),
    script:
        f"{STEPS}/aggregate.py"
