# simulate: the demo's synthetic plates (raw.zarr) and their ground truth (truth.zarr).


rule simulate:
    output:
        raw=directory("datasets/{dataset}/raw.zarr"),
        truth=directory("datasets/{dataset}/truth.zarr"),
    log:
        "logs/simulate/{dataset}.log",
    benchmark:
        "benchmarks/simulate/{dataset}.tsv"
    wildcard_constraints:
        dataset="|".join(SIMULATED) or "^$",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        dataset="{dataset}",
        manifest=lambda wc: MANIFESTS[wc.dataset],
    script:
        f"{STEPS}/simulate.py"
