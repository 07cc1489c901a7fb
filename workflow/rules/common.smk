# Configuration: schema validation, manifests, cross-reference checks, and the
# small lookups every rule uses. Nothing here imports torch, iohub or waveorder.

import functools
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from vsbench import config as vconfig
from vsbench.io import list_plate_fovs

# Snakemake's YAML loader keeps the last of two duplicate keys: reject them instead
for _configfile in workflow.configfiles:
    vconfig.load_yaml(_configfile)


def validated(data, schema, what):
    """Snakemake's validate (it fills the defaults); when it fails, say why in one line
    naming the key path instead of its dump of the whole schema."""
    try:
        validate(data, schema)
    except WorkflowError:
        vconfig.check_schema(data, schema, what)
        raise


_files = ", ".join(map(str, workflow.configfiles))
validated(
    config,
    workflow.source_path("../schemas/config.schema.yaml"),
    f"config ({_files})" if _files else "config",
)
# YAML reads an unquoted `off` as false
for _block in (config["reconstruct"]["warm_start"], config["reconstruct"]["t_cache"]):
    if _block["mode"] is False:
        _block["mode"] = "off"

MANIFESTS = {}
for _name, _spec in config["datasets"].items():
    _base = (
        "." if isinstance(_spec, dict) or os.path.exists(_spec) else workflow.basedir
    )
    MANIFESTS[_name] = vconfig.load_manifest(_spec, _base)
    validated(
        MANIFESTS[_name],
        workflow.source_path("../schemas/dataset.schema.yaml"),
        f"datasets.{_name}",
    )
vconfig.check_campaign(config, MANIFESTS)

CAMPAIGN = config["campaign"]
SIMULATED = sorted(d for d, m in MANIFESTS.items() if "simulate" in m)
STEPS = "../../src/vsbench/steps"
# `--sdm conda` builds this environment per rule; without it, the current one is used.
CONDA_ENV = "../../environment.yml"
# Step scripts import the library from this checkout, in any environment (conda, cluster
# job), so the workflow and the library it runs are always the same version.
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        p
        for p in (os.path.join(workflow.basedir, "src"), os.environ.get("PYTHONPATH"))
        if p
    )
)
NAME = "[A-Za-z0-9_-]+"
# the simulator's true masks per target (datasets/{dataset}/truth.zarr), for segment_qc
TRUTH_CHANNEL = {
    "nucleus": "Nucleus_labels",
    "er": "ER_mask",
    "mito": "Mito_mask",
    "membrane": "Membrane_mask",
}
# one benchmark cell's directory
CELL = "target/{target}/{train_set}/{model}/{predict_set}"


wildcard_constraints:
    dataset=NAME,
    shard=r"\d+",
    target=NAME,
    model=NAME,
    train_set=NAME,
    predict_set=NAME,


def dataset_fovs(dataset):
    """FOV names, known at DAG time: from the simulate block, or the plate's metadata."""
    return list(_dataset_fovs(dataset))


def split_of(dataset, split):
    return list(_split_of(dataset, split))


# Every job's params ask for these: read plate metadata and resolve splits once per DAG.
@functools.cache
def _dataset_fovs(dataset):
    m = MANIFESTS[dataset]
    if "simulate" in m:
        return tuple(vconfig.simulated_fov_names(m["simulate"]))
    return tuple(list_plate_fovs(m["path"]))


@functools.cache
def _split_of(dataset, split):
    m = MANIFESTS[dataset]
    return tuple(
        vconfig.split_fovs(_dataset_fovs(dataset), m["splits"], split, dataset)
    )


def n_shards(dataset):
    """Reconstruction jobs of a dataset: ceil(FOVs / positions_per_job)."""
    per_job = config["reconstruct"]["positions_per_job"]
    return -(-len(_dataset_fovs(dataset)) // per_job)


def shard_fovs(dataset, shard):
    per_job = config["reconstruct"]["positions_per_job"]
    return list(_dataset_fovs(dataset)[shard * per_job : (shard + 1) * per_job])


def reconstruct_outputs(prefix, wrap=None):
    """Phase3D store (+ the 2D phase store when reconstruct.phase_2d) under `prefix`."""
    wrap = wrap or (lambda path: path)
    out = {"phase": wrap(directory(f"{prefix}/phase.zarr"))}
    if config["reconstruct"]["phase_2d"]:
        out["phase2d"] = wrap(directory(f"{prefix}/phase2d.zarr"))
    return out


def reconstruct_shard_inputs(wildcards):
    inputs = {"store": f"datasets/{wildcards.dataset}/preprocessed.zarr"}
    if config["reconstruct"]["warm_start"]["mode"] == "fit":
        inputs["warm"] = f"datasets/{wildcards.dataset}/reconstruct/warmstart.json"
    return inputs


def reconstruct_gather_inputs(wildcards):
    d = wildcards.dataset
    shards = [f"datasets/{d}/reconstruct/shard{i}" for i in range(n_shards(d))]
    inputs = {
        "phase": [f"{s}/phase.zarr" for s in shards],
        "tilt": [f"{s}/tilt.csv" for s in shards],
    }
    if config["reconstruct"]["phase_2d"]:
        inputs["phase2d"] = [f"{s}/phase2d.zarr" for s in shards]
    if d in SIMULATED:
        inputs["truth"] = f"datasets/{d}/truth.zarr"
    return inputs


def encoder_kind():
    return config["features"]["encoder"]["kind"]


def extractor_input():
    """The features rules' extractor input: the trained encoder or the user's TorchScript."""
    if encoder_kind() == "trained":
        return {"extractor": "target/{target}/encoder/encoder.pt"}
    if encoder_kind() == "torchscript":
        return {"extractor": config["features"]["encoder"]["path"]}
    return {}


def embeddings_output(prefix):
    return (
        {}
        if encoder_kind() == "none"
        else {"embeddings": f"{prefix}/embeddings.parquet"}
    )


def embedding_inputs():
    if encoder_kind() == "none":
        return {}
    return {
        "gt_embeddings": "target/{target}/gt/{predict_set}/embeddings.parquet",
        "embeddings": f"{CELL}/embeddings.parquet",
    }


def encoder_train_data(target):
    """The GT images the encoder of `target` learns from: every campaign train-set dataset."""
    datasets = sorted(
        {
            d
            for ts in CAMPAIGN["train_sets"]
            for d in config["train_sets"][ts]["datasets"]
        }
    )
    return [
        {
            "dataset": d,
            "channel": target_channel(d, target),
            "fovs": [*split_of(d, "train"), *split_of(d, "val")],
        }
        for d in datasets
    ]


def encoder_train_inputs(wildcards):
    data = encoder_train_data(wildcards.target)
    return {
        "images": [f"datasets/{e['dataset']}/preprocessed.zarr" for e in data],
        "cells": [f"datasets/{e['dataset']}/cells.zarr" for e in data],
    }


def raw_store(wildcards):
    m = MANIFESTS[wildcards.dataset]
    return m["path"] if "path" in m else f"datasets/{wildcards.dataset}/raw.zarr"


def predict_dataset(predict_set):
    return config["predict_sets"][predict_set]["dataset"]


def predict_fovs(predict_set):
    spec = config["predict_sets"][predict_set]
    return split_of(spec["dataset"], spec.get("split", "test"))


def target_channel(dataset, target):
    return vconfig.target_channel(MANIFESTS[dataset], target, dataset)


def train_datasets(train_set):
    return config["train_sets"][train_set]["datasets"]


def cells_for(target):
    return [c for c in vconfig.benchmark_cells(config) if c["target"] == target]


def cell_files(target, name):
    return [os.path.join(CELL.format(**c), name) for c in cells_for(target)]


def train_inputs(wildcards):
    ds = train_datasets(wildcards.train_set)
    return {
        "phase": [f"datasets/{d}/phase.zarr" for d in ds],
        "fluorescence": [f"datasets/{d}/preprocessed.zarr" for d in ds],
    }


def train_data(wildcards):
    """Per dataset: stores, target channel and the train/val FOVs (params trigger on splits)."""
    return [
        {
            "dataset": d,
            "phase": f"datasets/{d}/phase.zarr",
            "fluorescence": f"datasets/{d}/preprocessed.zarr",
            "channel": target_channel(d, wildcards.target),
            "train": split_of(d, "train"),
            "val": split_of(d, "val"),
        }
        for d in train_datasets(wildcards.train_set)
    ]


def cell_channels(dataset):
    """Nucleus channel (required) and membrane channel (optional) of a dataset."""
    targets = {t: c for c, t in MANIFESTS[dataset]["channels"].items()}
    if "nucleus" not in targets:
        raise ValueError(
            f"dataset {dataset!r}: cell labels need a channel mapped to target 'nucleus'"
        )
    return {"nucleus": targets["nucleus"], "membrane": targets.get("membrane")}


def report_inputs(wildcards):
    cells = vconfig.benchmark_cells(config)
    return {
        "metrics": [f"target/{t}/metrics.csv" for t in CAMPAIGN["targets"]],
        "curves": sorted(
            {
                "target/{target}/{train_set}/{model}/train_log.csv".format(**c)
                for c in cells
            }
        ),
        "predictions": [
            os.path.join(CELL.format(**c), "prediction.zarr") for c in cells
        ],
        "pixel": [os.path.join(CELL.format(**c), "pixel.csv") for c in cells],
        "masks": [os.path.join(CELL.format(**c), "masks.zarr") for c in cells],
        "gt_masks": sorted(
            {"target/{target}/gt/{predict_set}/masks.zarr".format(**c) for c in cells}
        ),
        "phase": sorted(
            {
                f"datasets/{predict_dataset(ps)}/phase.zarr"
                for ps in CAMPAIGN["predict_sets"]
            }
        ),
        "fluorescence": sorted(
            {
                f"datasets/{predict_dataset(ps)}/preprocessed.zarr"
                for ps in CAMPAIGN["predict_sets"]
            }
        ),
        "tilt": sorted(
            {
                f"datasets/{predict_dataset(ps)}/tilt.csv"
                for ps in CAMPAIGN["predict_sets"]
            }
        ),
        "qc": sorted(
            {
                f"datasets/{predict_dataset(ps)}/phase_qc.csv"
                for ps in CAMPAIGN["predict_sets"]
            }
        ),
        "segment_qc": [
            f"target/{t}/gt/{ps}/segment_qc.csv"
            for t in CAMPAIGN["targets"]
            for ps in CAMPAIGN["predict_sets"]
            if predict_dataset(ps) in SIMULATED and t in TRUTH_CHANNEL
        ],
    }
