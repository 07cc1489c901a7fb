# features: per-cell features on GT (once per target and predict set) and on each
# prediction, over the same cell labels so that rows pair up.


rule features_gt:
    input:
        image=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/preprocessed.zarr",
        cells=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/cells.zarr",
    output:
        table="target/{target}/gt/{predict_set}/features.parquet",
    log:
        "logs/features_gt/{target}/{predict_set}.log",
    benchmark:
        "benchmarks/features_gt/{target}/{predict_set}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        channel=lambda wc: target_channel(predict_dataset(wc.predict_set), wc.target),
        fovs=lambda wc: predict_fovs(wc.predict_set),
        conditions=lambda wc: {
            f: vconfig.fov_condition(MANIFESTS[predict_dataset(wc.predict_set)], f)
            for f in predict_fovs(wc.predict_set)
        },
    script:
        f"{STEPS}/features.py"


rule features:
    input:
        image="target/{target}/{train_set}/{model}/{predict_set}/prediction.zarr",
        cells=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/cells.zarr",
    output:
        table="target/{target}/{train_set}/{model}/{predict_set}/features.parquet",
    log:
        "logs/features/{target}/{train_set}/{model}/{predict_set}.log",
    benchmark:
        "benchmarks/features/{target}/{train_set}/{model}/{predict_set}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        channel="{target}_prediction",
        fovs=lambda wc: predict_fovs(wc.predict_set),
        conditions=lambda wc: {
            f: vconfig.fov_condition(MANIFESTS[predict_dataset(wc.predict_set)], f)
            for f in predict_fovs(wc.predict_set)
        },
    script:
        f"{STEPS}/features.py"
