# reconstruct: per-subtile tilt + focus fit and tilt-corrected Phase3D, scattered over
# position shards (reconstruct.positions_per_job) and gathered into one store per dataset.
# With warm_start.mode "fit", a first pass fits the plate's meniscus map.


rule reconstruct_warmstart:
    input:
        store="datasets/{dataset}/preprocessed.zarr",
    output:
        warm="datasets/{dataset}/reconstruct/warmstart.json",
    log:
        "logs/reconstruct_warmstart/{dataset}.log",
    benchmark:
        "benchmarks/reconstruct_warmstart/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        dataset="{dataset}",
        manifest=lambda wc: MANIFESTS[wc.dataset],
        settings=config["reconstruct"],
        device=config["device"],
    script:
        f"{STEPS}/reconstruct.py"


rule reconstruct_shard:
    input:
        unpack(reconstruct_shard_inputs),
    output:
        **reconstruct_outputs("datasets/{dataset}/reconstruct/shard{shard}", temp),
        tilt=temp("datasets/{dataset}/reconstruct/shard{shard}/tilt.csv"),
    log:
        "logs/reconstruct_shard/{dataset}/{shard}.log",
    benchmark:
        "benchmarks/reconstruct_shard/{dataset}/{shard}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        dataset="{dataset}",
        fovs=lambda wc: shard_fovs(wc.dataset, int(wc.shard)),
        manifest=lambda wc: MANIFESTS[wc.dataset],
        settings=config["reconstruct"],
        sample_stride=config["preprocess"]["sample_stride"],
        device=config["device"],
    script:
        f"{STEPS}/reconstruct.py"


rule reconstruct:
    input:
        unpack(reconstruct_gather_inputs),
    output:
        **reconstruct_outputs("datasets/{dataset}"),
        tilt=report(
            "datasets/{dataset}/tilt.csv",
            caption="../report/tilt.rst",
            category="Reconstruction",
            labels={"dataset": "{dataset}", "table": "tilt"},
        ),
        qc="datasets/{dataset}/phase_qc.csv",
    log:
        "logs/reconstruct/{dataset}.log",
    benchmark:
        "benchmarks/reconstruct/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        sample_stride=config["preprocess"]["sample_stride"],
    script:
        f"{STEPS}/reconstruct.py"
