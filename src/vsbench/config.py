"""Campaign configuration: manifests, cross-references, splits, benchmark cells.

The JSON schemas (workflow/schemas) check shapes and types; this module checks
what a schema cannot: that every name refers to something that exists, that a
target is available in every dataset it is trained or evaluated on, and that
splits name real FOVs. Errors name the key.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vsbench.io import InputError, check_name, split_fov

SPLITS = ("train", "val", "test")


def load_yaml(path: str | Path) -> Any:
    """YAML with duplicate mapping keys rejected (PyYAML silently keeps the last one)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise InputError(
                    f"{path}: duplicate key {key!r} (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    with open(path) as fh:
        try:
            return yaml.load(fh, Loader=StrictLoader)
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: invalid YAML ({exc})") from exc


def check_schema(data: Any, schema_path: str | Path, what: str) -> None:
    """Raise the schema's best-matching error as one line naming the key path."""
    import jsonschema

    schema = load_yaml(schema_path)
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "top level"
        raise InputError(f"{what}: {where}: {error.message}")


def load_manifest(spec: str | Mapping, base_dir: str | Path = ".") -> dict:
    """A dataset entry is a manifest path (YAML) or the manifest inline."""
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(base_dir) / spec
    if not path.exists():
        raise InputError(f"dataset manifest {spec!r} not found (looked at {path})")
    manifest = load_yaml(path)
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: a dataset manifest must be a mapping")
    return manifest


def simulated_fov_names(simulate: Mapping) -> list[str]:
    """FOV names of a simulated plate, known before it exists (the DAG needs them)."""
    n = int(simulate.get("fovs_per_well", 4))
    return sorted(f"{well}/{k}" for well in simulate["wells"] for k in range(n))


def fov_condition(manifest: Mapping, fov: str) -> str:
    """Condition label of a FOV: explicit FOV entry, else its well, else 'unlabelled'."""
    row, col, _ = split_fov(fov)
    well = f"{row}/{col}"
    conditions = dict(manifest.get("conditions", {}))
    if "simulate" in manifest:
        conditions = {**manifest["simulate"]["wells"], **conditions}
    return conditions.get(fov, conditions.get(well, "unlabelled"))


def target_channel(manifest: Mapping, target: str, dataset: str) -> str:
    """The fluorescence channel that carries `target` in a dataset."""
    for channel, name in manifest["channels"].items():
        if name == target:
            return channel
    raise InputError(
        f"dataset {dataset!r}: no channel maps to target {target!r} "
        f"(channels: {dict(manifest['channels'])})"
    )


def resolve_splits(fovs: Sequence[str], spec: Mapping, dataset: str) -> dict[str, list[str]]:
    """Train/val/test FOV lists from explicit lists or fractions + seed (sorted, permuted)."""
    fovs = sorted(fovs)
    if not fovs:
        raise InputError(f"dataset {dataset!r}: no FOVs to split")
    if all(isinstance(spec[s], list) for s in SPLITS):
        out = {s: list(spec[s]) for s in SPLITS}
        known = set(fovs)
        for s, names in out.items():
            missing = [f for f in names if f not in known]
            if missing:
                raise InputError(f"dataset {dataset!r}: splits.{s} names missing FOVs {missing}")
        return out
    if any(isinstance(spec[s], list) for s in SPLITS):
        raise InputError(f"dataset {dataset!r}: splits must be all fractions or all FOV lists")
    fractions = np.array([float(spec[s]) for s in SPLITS])
    if fractions.sum() <= 0 or fractions.sum() > 1.0 + 1e-6:
        raise InputError(
            f"dataset {dataset!r}: split fractions must sum to (0, 1], got {fractions.sum():.3f}"
        )
    order = np.random.default_rng(int(spec.get("seed", 0))).permutation(len(fovs))
    counts = np.floor(fractions * len(fovs) + 0.5).astype(int)
    # every split asked for gets at least one FOV when there are enough of them
    for i in range(3):
        if fractions[i] > 0 and counts[i] == 0 and len(fovs) >= 3:
            counts[i] = 1
    while counts.sum() > len(fovs):
        counts[int(np.argmax(counts))] -= 1
    out, start = {}, 0
    for s, c in zip(SPLITS, counts, strict=True):
        out[s] = sorted(fovs[i] for i in order[start : start + c])
        start += c
    return out


def split_fovs(fovs: Sequence[str], spec: Mapping, split: str, dataset: str) -> list[str]:
    if split == "all":
        return sorted(fovs)
    return resolve_splits(fovs, spec, dataset)[split]


def check_campaign(config: Mapping, manifests: Mapping[str, Mapping]) -> None:
    """Cross-reference checks that a JSON schema cannot express."""
    for section in ("datasets", "targets", "models", "train_sets", "predict_sets"):
        for name in config[section]:
            check_name(name, f"{section}")
    camp = config["campaign"]
    for key, section in (
        ("targets", "targets"),
        ("models", "models"),
        ("train_sets", "train_sets"),
        ("predict_sets", "predict_sets"),
    ):
        for name in camp[key]:
            if name not in config[section]:
                raise InputError(
                    f"campaign.{key}: unknown name {name!r} (defined: {sorted(config[section])})"
                )
    for ts, spec in config["train_sets"].items():
        for ds in spec["datasets"]:
            if ds not in config["datasets"]:
                raise InputError(f"train_sets.{ts}.datasets: unknown dataset {ds!r}")
    for ps, spec in config["predict_sets"].items():
        if spec["dataset"] not in config["datasets"]:
            raise InputError(f"predict_sets.{ps}.dataset: unknown dataset {spec['dataset']!r}")
    for name, m in manifests.items():
        _check_manifest(name, m)
    used = {ds for ts in camp["train_sets"] for ds in config["train_sets"][ts]["datasets"]}
    used |= {config["predict_sets"][ps]["dataset"] for ps in camp["predict_sets"]}
    for target in camp["targets"]:
        for ds in sorted(used):
            target_channel(manifests[ds], target, ds)


def _check_manifest(name: str, m: Mapping) -> None:
    optics = m["optics"]
    if optics["na_illumination"] >= optics["na_detection"]:
        raise InputError(
            f"datasets.{name}.optics: na_illumination ({optics['na_illumination']}) must be "
            f"< na_detection ({optics['na_detection']})"
        )
    if optics["na_detection"] >= optics["index_media"]:
        raise InputError(f"datasets.{name}.optics: na_detection must be < index_media")
    channels = list(m["channels"])
    if m.get("brightfield", "BF") in channels:
        raise InputError(f"datasets.{name}: brightfield channel also listed in channels")
    targets = list(m["channels"].values())
    if len(set(targets)) != len(targets):
        raise InputError(f"datasets.{name}.channels: two channels map to the same target")
    if "simulate" in m:
        fovs = simulated_fov_names(m["simulate"])
        for well in m["simulate"]["wells"]:
            row, col = well.split("/")
            check_name(row, f"datasets.{name}.simulate.wells row")
            check_name(col, f"datasets.{name}.simulate.wells column")
        resolve_splits(fovs, m["splits"], name)


def benchmark_cells(config: Mapping) -> list[dict[str, Any]]:
    """Every (target, train_set, model, predict_set) the campaign asks for."""
    camp = config["campaign"]
    return [
        dict(target=t, train_set=ts, model=m, predict_set=ps)
        for t, ts, m, ps in itertools.product(
            camp["targets"], camp["train_sets"], camp["models"], camp["predict_sets"]
        )
    ]
