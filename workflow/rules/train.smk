# train: one model per (target, train_set, model). last.ckpt (resume) is written
# beside model.ckpt but is not an output, so Snakemake never deletes it.


rule train:
    input:
        unpack(train_inputs),
    output:
        ckpt="target/{target}/{train_set}/{model}/model.ckpt",
        curve="target/{target}/{train_set}/{model}/train_log.csv",
    log:
        "logs/train/{target}/{train_set}/{model}.log",
    benchmark:
        "benchmarks/train/{target}/{train_set}/{model}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        model=lambda wc: config["models"][wc.model],
        data=train_data,
        seed=config["seed"],
        device=config["device"],
    script:
        f"{STEPS}/train.py"
