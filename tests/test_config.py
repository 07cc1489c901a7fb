import copy

import pytest
import yaml

from vsbench import config as vc
from vsbench.io import InputError

FOVS = [f"A/1/{i}" for i in range(6)]


def test_fraction_splits_are_deterministic_disjoint_and_complete():
    spec = {"train": 0.5, "val": 0.17, "test": 0.33, "seed": 3}
    a = vc.resolve_splits(FOVS, spec, "d")
    assert a == vc.resolve_splits(list(reversed(FOVS)), spec, "d")
    assert [len(a[s]) for s in vc.SPLITS] == [3, 1, 2]
    assert sorted(a["train"] + a["val"] + a["test"]) == FOVS
    b = vc.resolve_splits(FOVS, {**spec, "seed": 4}, "d")
    assert a != b


def test_explicit_splits_must_name_existing_fovs():
    spec = {"train": ["A/1/0"], "val": ["A/1/1"], "test": ["A/1/9"]}
    with pytest.raises(InputError, match=r"splits.test names missing FOVs \['A/1/9'\]"):
        vc.resolve_splits(FOVS, spec, "d")
    ok = {"train": ["A/1/0"], "val": ["A/1/1"], "test": ["A/1/2"]}
    assert vc.split_fovs(FOVS, ok, "test", "d") == ["A/1/2"]
    assert vc.split_fovs(FOVS, ok, "all", "d") == FOVS


def test_simulated_fov_names_and_conditions(repo_root):
    m = vc.load_manifest("resources/datasets/a549_demo.yaml", repo_root)
    names = vc.simulated_fov_names(m["simulate"])
    assert names[:2] == ["A/1/0", "A/1/1"] and len(names) == 6
    assert vc.fov_condition(m, "A/2/0") == "denv"
    assert vc.fov_condition(m, "A/3/1") == "zikv"


def _demo(repo_root):
    cfg = yaml.safe_load((repo_root / "config/config.yaml").read_text())
    manifests = {n: vc.load_manifest(p, repo_root) for n, p in cfg["datasets"].items()}
    return cfg, manifests


def test_demo_campaign_is_consistent(repo_root):
    cfg, manifests = _demo(repo_root)
    vc.check_campaign(cfg, manifests)
    cells = vc.benchmark_cells(cfg)
    assert len(cells) == 3 * 4 * 1 * 2
    assert {c["model"] for c in cells} == {"identity", "unet", "unext2", "pix2pix"}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c, m: c["campaign"]["models"].append("nope"),
            "campaign.models: unknown name 'nope'",
        ),
        (lambda c, m: c["train_sets"]["ipsc"]["datasets"].append("zz"), "unknown dataset 'zz'"),
        (lambda c, m: c["predict_sets"]["a549_all"].update(dataset="zz"), "unknown dataset 'zz'"),
        (lambda c, m: m["a549"]["optics"].update(na_illumination=0.6), "na_illumination"),
        (lambda c, m: m["ipsc"]["channels"].pop("ER"), "no channel maps to target 'er'"),
        (lambda c, m: c["models"].update({"a b": {"arch": "unet3d"}}), "invalid"),
        (lambda c, m: m["ipsc"]["simulate"]["wells"].update({"A/..": "mock"}), "invalid"),
    ],
)
def test_bad_campaigns_fail_naming_the_key(repo_root, mutate, message):
    cfg, manifests = _demo(repo_root)
    cfg, manifests = copy.deepcopy(cfg), copy.deepcopy(manifests)
    mutate(cfg, manifests)
    with pytest.raises(InputError, match=message):
        vc.check_campaign(cfg, manifests)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(InputError, match="nope.yaml"):
        vc.load_manifest("nope.yaml", tmp_path)


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("optics:\n  na_detection: 0.55\n  na_detection: 0.9\nchannels: {}\n")
    with pytest.raises(InputError, match=r"m.yaml: duplicate key 'na_detection' \(line 3\)"):
        vc.load_manifest("m.yaml", tmp_path)
    path.write_text("a: [1, 2\n")
    with pytest.raises(InputError, match="invalid YAML"):
        vc.load_yaml(path)
