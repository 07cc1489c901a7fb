# preprocess: validate the raw plate, rechunk, write normalization statistics.


rule preprocess:
    input:
        raw=raw_store,
    output:
        store=directory("datasets/{dataset}/preprocessed.zarr"),
    log:
        "logs/preprocess/{dataset}.log",
    benchmark:
        "benchmarks/preprocess/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        dataset="{dataset}",
        manifest=lambda wc: MANIFESTS[wc.dataset],
        sample_stride=config["preprocess"]["sample_stride"],
    script:
        f"{STEPS}/preprocess.py"
