"""The SLURM profile on a real one-node SLURM (Debian slurm-wlm, slurmdbd + MariaDB).

The fixture writes a two-partition config with four fake GPUs, starts munged, MariaDB,
slurmdbd, slurmctld and slurmd on free ports under a temporary directory and stops
exactly those processes. The small campaign then runs through `profiles/slurm` (with
test-sized cpus/memory and short status intervals) and is compared with a local run;
`sacct` shows where every job ran and what it was given. Training is then rerun with
`profiles/slurm-4gpu` on four fake GPUs.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from campaign import REPO, planned_jobs, small_config, snakemake, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]

BINARIES = (
    "munged",
    "mariadb-install-db",
    "mariadbd",
    "mariadb",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sbatch",
    "sacct",
    "sacctmgr",
    "sinfo",
    "srun",
    "scontrol",
    "scancel",
)
GPU_RULES = {
    "reconstruct_shard",
    "reconstruct_warmstart",
    "train",
    "predict",
    "features",
    "features_gt",
    "train_encoder",
}
CLUSTER, ACCOUNT, DB_USER, DB_PASS = "vsbench", "vsbench", "slurm", "slurm-test-only"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def ensure_slurm_installed() -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"real-SLURM test needs {', '.join(missing)} (root + apt-get installs them)")
    proc = subprocess.run(
        ["bash", str(REPO / "tests/slurm/install-debian.sh")], capture_output=True, text=True
    )
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if proc.returncode != 0 or missing:
        pytest.skip(f"installing SLURM from Debian failed: {proc.stderr.strip()[-300:]}")


class LocalSlurm:
    """munged, MariaDB, slurmdbd, slurmctld and slurmd under one directory, stopped by PID."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.ports = {k: free_port() for k in ("mysql", "dbd", "ctld", "slurmd")}
        self.conf = root / "slurm.conf"
        # the jobstep plugin drops SLURM_* (SLURM_CONF included) before its srun: a shim
        # on PATH puts this cluster's config back (a cluster with /etc/slurm needs none)
        shim = root / "bin/srun"
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which("srun")} "$@"\n')
        shim.chmod(0o755)
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": f"{shim.parent}:{os.environ['PATH']}",
        }

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        self.procs.append(proc)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {(self.root / f'{name}.out').read_text()[-2000:]}")
        return proc

    def _run(self, *cmd: str) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def write_configs(self) -> None:
        r = self.root
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        munge = f"AuthInfo=socket={r}/munge.sock\n"
        self.conf.write_text(
            f"ClusterName={CLUSTER}\nSlurmctldHost={self.host}\n"
            "SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\n"
            + munge
            + f"StateSaveLocation={r}/state\nSlurmdSpoolDir={r}/spool\n"
            f"SlurmctldPidFile={r}/slurmctld.pid\nSlurmdPidFile={r}/slurmd.pid\n"
            f"SlurmctldLogFile={r}/slurmctld.log\nSlurmdLogFile={r}/slurmd.log\n"
            f"SlurmctldPort={self.ports['ctld']}\nSlurmdPort={self.ports['slurmd']}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nGresTypes=gpu\n"
            "JobAcctGatherType=jobacct_gather/none\nMailProg=/bin/true\n"
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=localhost\nAccountingStoragePort={self.ports['dbd']}\n"
            f"AccountingStoragePass={r}/munge.sock\n"
            "AccountingStorageTRES=gres/gpu\nAccountingStoreFlags=job_comment\n"
            "ReturnToService=2\nMinJobAge=600\n"
            # four fake GPUs and at least four CPUs (config_overrides: declared, not
            # probed) so the 4-GPU training variant's job geometry fits the node
            "SlurmdParameters=config_overrides\n"
            f"NodeName={self.host} CPUs={max(4, os.cpu_count())} RealMemory={mem_mb} "
            "Gres=gpu:4 State=UNKNOWN\n"
            f"PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP\n"
            f"PartitionName=gpu Nodes={self.host} MaxTime=INFINITE State=UP\n"
        )
        # fake GPUs: character devices with /dev/null's numbers (one File=/dev/null line
        # gives one GPU; slurmd counts GPUs by their device files)
        for i in range(4):
            os.mknod(r / f"fakegpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (r / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={r}/fakegpu[0-3]\n")
        (r / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        dbd = r / "slurmdbd.conf"
        dbd.write_text(
            "AuthType=auth/munge\n" + munge + f"DbdHost=localhost\nDbdPort={self.ports['dbd']}\n"
            f"SlurmUser=root\nLogFile={r}/slurmdbd.log\nPidFile={r}/slurmdbd.pid\n"
            "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={self.ports['mysql']}\nStorageUser={DB_USER}\n"
            f"StoragePass={DB_PASS}\nStorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)
        for d in ("state", "spool", "db"):
            (r / d).mkdir()

    def start(self) -> None:
        r = self.root
        self.write_configs()
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._start(
            "munged",
            ["munged", "-F", "--force", f"--key-file={key}", f"--socket={r}/munge.sock",
             f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log",
             f"--seed-file={r}/munged.seed"],
        )  # fmt: skip
        wait_for("munged", (r / "munge.sock").exists)
        self._run(
            "mariadb-install-db", f"--datadir={r}/db", "--user=root", "--skip-test-db",
            "--auth-root-authentication-method=socket",
        )  # fmt: skip
        sock = f"{r}/mysql.sock"
        self._start(
            "mariadbd",
            ["mariadbd", "--no-defaults", "--user=root", f"--datadir={r}/db",
             f"--port={self.ports['mysql']}", "--bind-address=127.0.0.1",
             f"--socket={sock}", f"--pid-file={r}/mysql.pid", "--skip-log-bin"],
        )  # fmt: skip
        wait_for("mariadbd", lambda: port_open(self.ports["mysql"]))
        self._run(
            "mariadb", f"--socket={sock}", "-uroot", "-e",
            f"CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}';"
            f"GRANT ALL ON slurm_acct_db.* TO '{DB_USER}'@'127.0.0.1';",
        )  # fmt: skip
        self._start("slurmdbd", ["slurmdbd", "-D"])
        wait_for("slurmdbd", lambda: port_open(self.ports["dbd"]))
        self._run("sacctmgr", "-i", "add", "cluster", CLUSTER)
        self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        wait_for("slurmctld", lambda: "UP" in self._try("scontrol", "ping"))
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        wait_for("slurmd", lambda: self._try("sinfo", "-h", "-o", "%T").split() == ["idle"])
        self._run("sacctmgr", "-i", "add", "account", ACCOUNT, f"Cluster={CLUSTER}")
        self._run("sacctmgr", "-i", "add", "user", getpass.getuser(), f"Account={ACCOUNT}")

    def _try(self, *cmd: str) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        return proc.stdout if proc.returncode == 0 else ""

    def stop(self) -> None:
        if any(p.poll() is None for p in self.procs if p.args[0] == "slurmctld"):
            self._try("scancel", "--user", getpass.getuser())
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def sacct(self) -> pd.DataFrame:
        fields = ["JobID", "Partition", "AllocTRES", "ReqTRES", "State", "Comment", "Elapsed"]
        out = self._run(
            "sacct", "-X", "-P", "-n", "-a", "-S", "2000-01-01", f"--format={','.join(fields)}"
        )
        rows = [line.split("|") for line in out.strip().splitlines()]
        return pd.DataFrame(rows, columns=fields)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    ensure_slurm_installed()
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM runs its daemons as root")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def profile_overlay(tmp_path: Path, rules, name: str = "slurm") -> Path:
    """profiles/<name> with only test sizes changed: partitions and GPUs stay the profile's.

    One thread per job lets two jobs share the two-core node."""
    profile = yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
    profile["default-resources"].update(slurm_account=ACCOUNT, mem_mb="1000 * attempt")
    for res in profile["set-resources"].values():
        res.update(cpus_per_gpu=1, mem_mb="1000 * attempt")
    profile["set-threads"] = {rule: 1 for rule in rules}
    profile.update(
        {"jobs": 4, "retries": 0, "latency-wait": 10, "slurm-init-seconds-before-status-checks": 1}
    )
    out = tmp_path / f"profile-{name}"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out


def rule_of(comment: str, groups: set[str]) -> str:
    """A job's rule or group, from the plugin's comment: `rule_<rule>[_wildcards_...]`, or
    `rule_<group>_<member rules>` for a group job."""
    m = re.match(r"^rule_(.+?)(?:_wildcards_.*)?$", comment)
    assert m, comment
    name = m.group(1)
    return next((g for g in groups if name.startswith(f"{g}_")), name)


def test_campaign_through_slurm_matches_local_run(slurm_cluster, small_campaign_run, tmp_path):
    local, local_s = small_campaign_run
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    write_config(cluster, small_config())
    expected = planned_jobs(cluster)
    expected.pop("all")  # a rule without an action runs inside Snakemake itself

    profile = profile_overlay(tmp_path, expected)
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    groups, arrays = settings["groups"], set(settings["slurm-array-jobs"].split(","))
    start = time.monotonic()
    snakemake(cluster, "--profile", str(profile), env=slurm_cluster.env)
    wall = time.monotonic() - start
    jobs = slurm_cluster.sacct()
    jobs["rule"] = jobs["Comment"].map(lambda c: rule_of(c, set(groups.values())))
    print(
        f"\nlocal run {local_s:.0f} s; SLURM run: {len(jobs)} sbatch jobs/array tasks "
        f"in {wall:.0f} s\n" + jobs.drop(columns="Comment").to_string(index=False)
    )

    assert (jobs["State"] == "COMPLETED").all(), jobs
    submitted = jobs["rule"].value_counts().to_dict()
    # ungrouped rules: one sbatch job or array task per planned job
    assert {r: n for r, n in submitted.items() if r not in groups.values()} == {
        r: n for r, n in expected.items() if r not in groups
    }
    # grouped rules: never alone, and fewer submissions than member jobs
    for group in set(groups.values()):
        members = sum(n for r, n in expected.items() if groups.get(r) == group)
        assert 1 <= submitted.get(group, 0) < members, (group, submitted)
    # array rules: jobs ready together share one sbatch (both shards after preprocess)
    in_array = jobs["JobID"].str.contains("_")
    assert set(jobs.loc[in_array, "rule"]) <= arrays, jobs
    shards = jobs["rule"] == "reconstruct_shard"
    assert in_array[shards].all() and shards.sum() == expected["reconstruct_shard"] >= 2
    gpu_units = GPU_RULES & set(expected)
    for _, job in jobs.iterrows():
        if job["rule"] in gpu_units:
            assert job["Partition"] == "gpu" and "gres/gpu=1" in job["AllocTRES"], job
        else:
            assert job["Partition"] == "cpu" and "gres/gpu" not in job["AllocTRES"], job
            assert "gres/gpu" not in job["ReqTRES"], job
    assert GPU_RULES - {"reconstruct_warmstart"} <= set(jobs["rule"])

    for name in ("target/nucleus/metrics.csv", "datasets/ipsc/tilt.csv"):
        got, want = (
            pd.read_csv(d / name).drop(columns="wall_s", errors="ignore") for d in (cluster, local)
        )
        pd.testing.assert_frame_equal(got, want, rtol=1e-4, atol=1e-6)

    # the 4-GPU training variant: real SLURM accepts its geometry, and the executor's
    # one-task step is what lets Lightning start the DDP ranks itself
    four = profile_overlay(tmp_path, expected, "slurm-4gpu")
    for done in cluster.glob("target/*/*/*/last.ckpt"):
        done.unlink()  # else the finished run is resumed and nothing trains
    snakemake(
        cluster, "--profile", str(four), "--forcerun", "train", "--until", "train",
        env=slurm_cluster.env,
    )  # fmt: skip
    jobs = slurm_cluster.sacct().iloc[len(jobs) :]
    print(jobs.drop(columns="Comment").to_string(index=False))
    assert len(jobs) == expected["train"] and (jobs["State"] == "COMPLETED").all(), jobs
    for _, job in jobs.iterrows():
        assert job["Partition"] == "gpu" and "gres/gpu=4" in job["AllocTRES"], job
        assert "cpu=4" in job["AllocTRES"], job  # --ntasks-per-gpu=1: four tasks
    plans = [
        line
        for log in (cluster / "logs/train").rglob("*.log")
        for line in log.read_text().splitlines()
        if "distributed plan" in line
    ]  # one per trained (non-identity) model: Snakemake removed the first run's logs
    assert len(plans) == expected["train"] - 1, plans
    assert all(line.endswith("(SLURM step tasks: 1)") for line in plans), plans
