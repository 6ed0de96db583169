"""`ray job submit` to a real local Ray head on loopback: exit codes through the CLI and the Python client.
A whole run and nights submitted with a working_dir, on two nodes: tests/test_two_node.py."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The job client talks to a token-authenticated head. Ray caches its auth mode per process, so every
# client call runs in a subprocess with the head's environment and this test process stays untouched.
_CLIENT = """
import json, sys, time
from ray.job_submission import JobSubmissionClient
address, action, arg = sys.argv[1:4]
client = JobSubmissionClient(address)
if action == "ping":
    client.list_jobs(); print(json.dumps({}))
elif action == "submit":
    spec = json.loads(arg)
    print(json.dumps({"job_id": client.submit_job(**spec)}))
elif action == "wait":
    deadline = time.time() + 900
    while client.get_job_status(arg) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
        time.sleep(3)
    info = client.get_job_info(arg)
    print(json.dumps({"status": str(info.status), "driver_exit_code": info.driver_exit_code,
                      "logs": client.get_job_logs(arg)}))
elif action == "list":
    print(json.dumps([{"entrypoint": j.entrypoint, "status": str(j.status), "driver_exit_code": j.driver_exit_code}
                      for j in client.list_jobs()]))
elif action == "logs":
    print(json.dumps({"status": str(client.get_job_status(arg)), "logs": client.get_job_logs(arg)}))
elif action == "stop":
    print(json.dumps({"stopped": client.stop_job(arg)}))
elif action == "placement":  # arg: the GCS address; where every actor and task ran, and which node is the head
    from ray.util.state import list_actors, list_nodes, list_tasks
    head = [n.node_id for n in list_nodes(address=arg, detail=True) if n.is_head_node]
    print(json.dumps({"head": head,
                      "actors": [[a.class_name, a.node_id] for a in list_actors(address=arg, limit=10000, detail=True)],
                      "tasks": [[t.name, t.node_id] for t in list_tasks(address=arg, limit=10000, detail=True)]}))
"""


def _client(head, action: str, arg: str = "") -> dict | list:
    address, env = head
    out = subprocess.run([sys.executable, "-c", _CLIENT, address, action, arg], env=env,
                         capture_output=True, text=True, timeout=1000)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started like a user would (`ray start --head`), with token auth, torn down after."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    temp_dir = tmp_path_factory.mktemp("ray-head")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
         "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Free ports for the agents too: with the defaults, a second Ray head on this machine (another
         # test session) leaves this head without a job agent ("No available agent to submit job").
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    head = (f"http://127.0.0.1:{dashboard}", env)
    deadline = time.time() + 120

    def retry(call) -> None:
        """call() until it stops raising RuntimeError; give up (stopping the head) at the deadline."""
        while True:
            try:
                call()
                return
            except RuntimeError:
                if time.time() > deadline or proc.poll() is not None:
                    _stop_group(proc)
                    raise
                time.sleep(3)

    retry(lambda: _client(head, "ping"))
    # The job API answers before the head's agent takes jobs ("No available agent to submit job"): submit
    # a no-op job until it is accepted, so that the first real submission, by CLI or client, is not refused.
    retry(lambda: _client(head, "wait", _client(head, "submit", json.dumps({"entrypoint": "true"}))["job_id"]))
    yield head
    _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop the head and every process it started (its own process group, by id): SIGTERM, then SIGKILL
    after grace_s (a graceful Ray shutdown took ~30 s here, for nothing a test needs)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _config(tmp_path, tiny_bert_dir, **overrides) -> Path:
    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:64]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), corpus)
    cfg = {
        "name": "jobtest",
        "storage_path": str(tmp_path / "ray"),
        "output_dir": str(tmp_path / "runs"),
        "read": {"uri": str(corpus)},
        "corrupt": {"max_length": 32},
        "model": {"name_or_path": tiny_bert_dir},
        "train": {"global_batch_size": 8, "max_steps": 4, "lr": 1e-3, "report_every": 2},
        "scale": {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_actors": 1, "cpus_per_preprocess_actor": 0.5},
        "eval": {"sts_dir": str(ROOT / "data/sts"), "tasks": ["STS16", "STSB-test"], "num_cpus": 1,
                 "validation_task": None},  # checkpoint validation has tests of its own
        **overrides,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_config_gives_its_exit_code_through_the_cli(ray_head, tiny_bert_dir, tmp_path):
    address, env = ray_head
    config = _config(tmp_path, tiny_bert_dir, train={"learning_rate": 0.1})
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
         "--working-dir", str(ROOT), "--", sys.executable, "-m", "jobs.run", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 1  # the CLI says only "failed"; the client has the driver's own exit code
    assert "train.learning_rate" in cli.stdout + cli.stderr
    (job,) = [j for j in _client(ray_head, "list") if str(config) in j["entrypoint"]]
    assert job["status"] == "FAILED" and job["driver_exit_code"] == 2


def _nightly_config(tmp_path, tiny_bert_dir, days: dict[str, pa.Table]) -> Path:
    """A nightly config over a corpus of date= partitions (day → table)."""
    for day, table in days.items():
        (tmp_path / "corpus" / f"date={day}").mkdir(parents=True)
        pq.write_table(table, tmp_path / "corpus" / f"date={day}" / "part-0.parquet")
    return _config(tmp_path, tiny_bert_dir, read={"uri": str(tmp_path / "corpus")},
                   nightly={"registry_uri": str(tmp_path / "registry"), "cache_dir": str(tmp_path / "cache")})


def test_nightly_job_exit_codes_under_submission(ray_head, tiny_bert_dir, tmp_path):
    """The nightly entrypoint with the shipped runtime_env recipe: bad data exits 3 through the CLI; a
    night with nothing new exits 0 and a re-submitted rejected night exits 6 through the Python client.
    (A real training night that promotes or is rejected runs in tests/test_nightly.py, in-process.)"""
    from jobs.config import load_config
    from jobs.nightly import idempotency_key, list_days
    from jobs.registry import Registry

    address, env = ray_head
    recipe = yaml.safe_load((ROOT / "deploy/runtime_env.yaml").read_text())

    # 1. Bad data (no text column), submitted with the Ray CLI from the checkout, as the cron line does.
    bad = _nightly_config(tmp_path / "bad", tiny_bert_dir, {"2024-01-01": pa.table({"body": ["a b c"] * 8})})
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
         "--runtime-env", "deploy/runtime_env.yaml", "--", sys.executable, "-m", "jobs.nightly",
         "--config", str(bad), "--through", "2024-01-01"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 1
    logs = cli.stdout + cli.stderr
    assert "stage: find new data" in logs and "stage: read corpus" in logs and "no column 'text'" in logs
    (job,) = [j for j in _client(ray_head, "list") if str(bad) in j["entrypoint"]]
    assert job["status"] == "FAILED" and job["driver_exit_code"] == 3
    assert not (tmp_path / "bad" / "registry" / "production.json").exists()

    # 2. Nothing new up to the night: success without touching Ray Train.
    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:16]
    good = _nightly_config(tmp_path / "good", tiny_bert_dir, {"2024-01-02": pa.table({"text": texts})})
    runtime_env = {**recipe, "working_dir": str(ROOT)}
    spec = {"entrypoint": f"{sys.executable} -m jobs.nightly --config {good} --through 2024-01-01",
            "runtime_env": runtime_env}
    info = _client(ray_head, "wait", _client(ray_head, "submit", json.dumps(spec))["job_id"])
    assert (info["status"], info["driver_exit_code"]) == ("SUCCEEDED", 0), info["logs"][-3000:]
    assert "nothing new" in info["logs"]

    # 3. The same night again after the gate rejected it: the night's record answers, exit 6, no training.
    cfg = load_config(good)
    key = idempotency_key(None, list_days(cfg.read.uri, "date"), [], cfg)
    Registry(cfg.nightly.registry_uri).record_night(key, {"status": "rejected", "exit_code": 6})
    spec["entrypoint"] = f"{sys.executable} -m jobs.nightly --config {good} --through 2024-01-02"
    info = _client(ray_head, "wait", _client(ray_head, "submit", json.dumps(spec))["job_id"])
    assert (info["status"], info["driver_exit_code"]) == ("FAILED", 6), info["logs"][-3000:]
    assert "already ran" in info["logs"] and "stage: train" not in info["logs"]
