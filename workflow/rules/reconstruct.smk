# reconstruct: tilt estimate per FOV, then 3D phase (Phase3D) with waveorder.


rule reconstruct:
    input:
        store="datasets/{dataset}/preprocessed.zarr",
    output:
        phase=directory("datasets/{dataset}/phase.zarr"),
        tilt=report(
            "datasets/{dataset}/tilt.csv",
            caption="../report/tilt.rst",
            category="Reconstruction",
            labels={"dataset": "{dataset}", "table": "tilt"},
        ),
    log:
        "logs/reconstruct/{dataset}.log",
    benchmark:
        "benchmarks/reconstruct/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        dataset="{dataset}",
        manifest=lambda wc: MANIFESTS[wc.dataset],
        settings={
            **config["reconstruct"],
            "sample_stride": config["preprocess"]["sample_stride"],
        },
        device=config["device"],
    script:
        f"{STEPS}/reconstruct.py"
