# segment: cell instance labels per dataset (the rows features pair up on), GT target
# masks once per (target, predict_set), and prediction masks with the same function.


rule segment_cells:
    input:
        image="datasets/{dataset}/preprocessed.zarr",
    output:
        masks=directory("datasets/{dataset}/cells.zarr"),
    log:
        "logs/segment_cells/{dataset}.log",
    benchmark:
        "benchmarks/segment_cells/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        channels=lambda wc: cell_channels(wc.dataset),
        fovs=lambda wc: dataset_fovs(wc.dataset),
    script:
        f"{STEPS}/segment.py"


rule segment_gt:
    input:
        image=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/preprocessed.zarr",
    output:
        masks=directory("target/{target}/gt/{predict_set}/masks.zarr"),
    log:
        "logs/segment_gt/{target}/{predict_set}.log",
    benchmark:
        "benchmarks/segment_gt/{target}/{predict_set}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        channel=lambda wc: target_channel(predict_dataset(wc.predict_set), wc.target),
        fovs=lambda wc: predict_fovs(wc.predict_set),
        settings=lambda wc: config["targets"][wc.target]["segmentation"],
    script:
        f"{STEPS}/segment.py"


rule segment:
    input:
        image="target/{target}/{train_set}/{model}/{predict_set}/prediction.zarr",
    output:
        masks=directory("target/{target}/{train_set}/{model}/{predict_set}/masks.zarr"),
    log:
        "logs/segment/{target}/{train_set}/{model}/{predict_set}.log",
    benchmark:
        "benchmarks/segment/{target}/{train_set}/{model}/{predict_set}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        channel="{target}_prediction",
        fovs=lambda wc: predict_fovs(wc.predict_set),
        settings=lambda wc: config["targets"][wc.target]["segmentation"],
    script:
        f"{STEPS}/segment.py"


rule segment_qc:
    input:
        masks="target/{target}/gt/{predict_set}/masks.zarr",
        truth=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/truth.zarr",
    output:
        table="target/{target}/gt/{predict_set}/segment_qc.csv",
    log:
        "logs/segment_qc/{target}/{predict_set}.log",
    benchmark:
        "benchmarks/segment_qc/{target}/{predict_set}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        fovs=lambda wc: predict_fovs(wc.predict_set),
        truth_channel=lambda wc: TRUTH_CHANNEL[wc.target],
        instance=lambda wc: config["targets"][wc.target]["segmentation"]["method"]
        == "instance",
    script:
        f"{STEPS}/segment.py"
