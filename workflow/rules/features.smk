# features: per-cell features on GT (once per target and predict set) and on each
# prediction, over the same cell labels so that rows pair up; with an extractor
# (features.encoder), deep embeddings of the same cells, from the encoder the
# pipeline trains per target (train_encoder) or from a local TorchScript file.


rule train_encoder:
    input:
        unpack(encoder_train_inputs),
    output:
        model="target/{target}/encoder/encoder.pt",
        log_table="target/{target}/encoder/train_log.csv",
    log:
        "logs/train_encoder/{target}.log",
    benchmark:
        "benchmarks/train_encoder/{target}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        data=lambda wc: encoder_train_data(wc.target),
        settings=config["features"]["encoder"],
        seed=config["seed"],
    script:
        f"{STEPS}/features.py"


rule features_gt:
    input:
        **extractor_input(),
        image=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/preprocessed.zarr",
        cells=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/cells.zarr",
    output:
        **embeddings_output("target/{target}/gt/{predict_set}"),
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
        encoder=config["features"]["encoder"],
    script:
        f"{STEPS}/features.py"


rule features:
    input:
        **extractor_input(),
        image="target/{target}/{train_set}/{model}/{predict_set}/prediction.zarr",
        cells=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/cells.zarr",
    output:
        **embeddings_output("target/{target}/{train_set}/{model}/{predict_set}"),
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
        encoder=config["features"]["encoder"],
    script:
        f"{STEPS}/features.py"
