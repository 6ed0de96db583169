"""On a real two-node Ray cluster (ray.cluster_utils, both nodes on this machine; ~10 s to start and stop)
a run refuses a local storage_path at start, exit 2, before any stage; a config that declares it shared
passes the check."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray

# Run in its own process with its own RAY_TMPDIR: the cluster then never becomes the "current" Ray
# cluster (ray_current_cluster) that other processes on this machine would join with a bare ray.init().
SCRIPT = """
import sys
import ray
from ray.cluster_utils import Cluster

from jobs import run, stages
from jobs.config import load_config

out = sys.argv[1]
# Both nodes on this machine's own address, as Ray's own tests start them: a driver given 127.0.0.1
# resolves it to that address anyway (ray._private.services.resolve_ip_for_localhost).
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    args = ["--config", "configs/demo.yaml", f"ray_address={cluster.address}", f"storage_path={out}/ray",
            f"output_dir={out}/runs"]
    print("EXIT", run.main(args), flush=True)
    shared = load_config("configs/demo.yaml", {"storage_path": f"{out}/ray", "scale": {"shared_filesystem": True}})
    stages.check_cluster_storage(shared)
    print("SHARED OK", len([n for n in ray.nodes() if n["Alive"]]), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_local_storage_path_on_two_nodes_exits_2_naming_the_key(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    try:
        # Its own session, so that a timeout can stop the cluster's processes with it (by group id).
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = stdout + stderr
    assert proc.returncode == 0, output[-4000:]
    assert "EXIT 2" in stdout, output[-4000:]
    assert f"storage_path: '{tmp_path}/ray' is a local path, and the Ray cluster has 2 nodes" in output
    assert "SHARED OK 2" in stdout
    assert not (tmp_path / "ray").exists()  # refused before anything was written there
