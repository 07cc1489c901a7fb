# predict: sliding-window inference of one model on one predict set.


rule predict:
    input:
        ckpt="target/{target}/{train_set}/{model}/model.ckpt",
        phase=lambda wc: f"datasets/{predict_dataset(wc.predict_set)}/phase.zarr",
    output:
        store=directory(
            "target/{target}/{train_set}/{model}/{predict_set}/prediction.zarr"
        ),
    log:
        "logs/predict/{target}/{train_set}/{model}/{predict_set}.log",
    benchmark:
        "benchmarks/predict/{target}/{train_set}/{model}/{predict_set}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        target="{target}",
        fovs=lambda wc: predict_fovs(wc.predict_set),
        settings=config["predict"],
        device=config["device"],
    script:
        f"{STEPS}/predict.py"
