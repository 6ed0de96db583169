"""Two Ray nodes with no shared disk, every durable byte in an S3 server (issue 18).

The cluster is real and started here, like a user would: a head (``ray start --head``) and one worker node
(``ray start --address``) whose processes see a private tmpfs over /tmp (the raylet runs under
``unshare -m``): its Ray temp dir, its working_dir copy and its model cache are on that tmpfs, and nothing
the head or this test wrote under /tmp (the tiny model, the corpus, configs) is visible there. Training
workers, tokenizer actors and evaluation tasks require the custom resource ``worker_node`` that only the
worker node has; the drivers run on the head from Ray's unpacked copy of the working dir (JobSubmissionClient).
Corpus, model, checkpoints, outputs, registry and leases are all in a moto S3 server on loopback; faults
come from a loopback proxy in front of it (connection resets, 403s), never from mocks of our code.

One cluster for the module; every job's result is read with the job client (get_job_info / logs). Seven
jobs in all (a run stopped and resumed, three nights, two faulty nights), each checking several things: the
module is part of ``make test``, so each job serves as many of the five scenarios as it can.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_port
from test_job_submit import _client, _stop_group

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "two-node"
WORKER_RESOURCE = "worker_node"
# Everything that touches a model or trains: only the worker node has this resource.
ON_WORKER = {WORKER_RESOURCE: 1}
EXCLUDES = [".venv", "runs", ".git", "benchmarks/results", "**/__pycache__"]


# -- a proxy in front of the S3 server: real connection resets and real 403s ------------------------------
class FaultyS3Proxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server that reads every HTTP request (path-style
    ``/<bucket>/<key>``; bodies by Content-Length): the first GET of each key in ``reset_once`` has its
    connection reset (TCP RST, no answer); any request for a key starting with ``deny_prefix`` gets
    ``403 AccessDenied`` (S3's XML error). Everything else is forwarded unchanged."""

    def __init__(self, upstream: str, reset_once: tuple[str, ...] = (), deny_prefix: str | None = None):
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.reset_once, self.deny_prefix = set(reset_once), deny_prefix
        self.resets: list[str] = []
        self.denied: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        stream = _Stream(client)
        try:
            while (head := stream.read_until(b"\r\n\r\n")) is not None:
                lines = head.decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                key = target.split("?", 1)[0].lstrip("/").partition("/")[2]
                if self.deny_prefix and key.startswith(self.deny_prefix):
                    if headers.get("expect", "").lower() != "100-continue" and "content-length" in headers:
                        stream.read_exactly(int(headers["content-length"]))  # read, so that closing sends no RST
                    with self._lock:
                        self.denied.append(f"{method} {key}")
                    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                            b"<Message>Access Denied</Message></Error>")
                    client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    client.shutdown(socket.SHUT_WR)
                    return
                with self._lock:
                    reset = method == "GET" and key in self.reset_once
                    if reset:
                        self.reset_once.discard(key)
                        self.resets.append(key)
                if reset:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                upstream.sendall(head)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    while True:  # chunks: "<hex size>[;ext]\r\n<data>\r\n", a 0-size one, trailers, "\r\n"
                        line = stream.read_until(b"\r\n")
                        upstream.sendall(line)
                        size = int(line.split(b";")[0].strip(), 16)
                        if size == 0:
                            while (trailer := stream.read_until(b"\r\n")) != b"\r\n":
                                upstream.sendall(trailer)
                            upstream.sendall(trailer)
                            break
                        upstream.sendall(stream.read_exactly(size + 2))
                else:
                    length = int(headers.get("content-length", 0))
                    while length:
                        chunk = stream.read_some(length)
                        upstream.sendall(chunk)
                        length -= len(chunk)
        except (OSError, ValueError, EOFError):
            return
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()


class _Stream:
    """Buffered reads from a socket: up to a delimiter, an exact count, or what is there."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buffer += data

    def read_until(self, delimiter: bytes) -> bytes | None:
        """Up to and including delimiter; None at a clean end of the stream."""
        while delimiter not in self.buffer:
            try:
                self._fill()
            except EOFError:
                if self.buffer:
                    raise
                return None
        end = self.buffer.index(delimiter) + len(delimiter)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_some(self, limit: int) -> bytes:
        if not self.buffer:
            self._fill()
        data, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return data


# -- the cluster ---------------------------------------------------------------------------------------------
def _ray_start(*args: str) -> list[str]:
    """`ray start --block` with free ports for everything that listens (two nodes on one machine)."""
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
    return ["nice", "-n", "19", str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", *(f"{p}={free_port()}" for p in ports), *args]


class TwoNodeCluster:
    """A Ray head on this machine's disk and a worker node with a private /tmp (see the module docstring)."""

    def __init__(self, folder: Path, env: dict):
        self.folder = folder
        self.head_tmp = folder / "head-tmp"  # the head's TMPDIR: where its processes' temp files go
        self.head_tmp.mkdir()
        self.ray_head_dir = folder / "ray-head"
        dashboard, gcs = free_port(), free_port()
        self.gcs = f"127.0.0.1:{gcs}"
        # RAY_ADDRESS for every process of the cluster: Ray Train's own actors (PlacementGroupCleaner) look
        # the cluster up by "auto", which fails when this machine runs other Ray instances too.
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": self.gcs}
        self.address = f"http://127.0.0.1:{dashboard}"
        self.client = (self.address, self.env)
        self.processes = []
        head = _ray_start("--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                          "--num-cpus=2", f"--temp-dir={self.ray_head_dir}", f"--ray-client-server-port={free_port()}")
        self._start(head, {**self.env, "TMPDIR": str(self.head_tmp)}, "head.log")
        # The worker node gives up if the head is not registered in its GCS soon enough (seen on the loaded
        # 2-core machine): it starts once the head's job API answers.
        self._until(lambda: _client(self.client, "list"), timeout_s=180)
        worker = _ray_start(f"--address={self.gcs}", "--num-cpus=4", f"--resources={json.dumps({WORKER_RESOURCE: 100})}",
                            "--temp-dir=/tmp/ray")
        # A mount namespace of its own, with a fresh tmpfs over /tmp: the worker node's Ray temp dir,
        # working_dir copy, model cache and temp files, invisible to the head, and the head's to it.
        private = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs -o size=4g tsdae-worker-tmp /tmp && exec "$@"', "sh"]
        self._start(private + worker, {**self.env, "TMPDIR": "/tmp"}, "worker.log")

    def _start(self, command: list[str], env: dict, log: str) -> None:
        with open(self.folder / log, "wb") as out:
            self.processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def _until(self, call, timeout_s: float) -> None:
        """call() until it stops raising RuntimeError; raise, with the nodes' logs, at the deadline or when a
        node process has exited."""
        deadline = time.time() + timeout_s
        while True:
            try:
                call()
                return
            except RuntimeError as e:
                error = str(e)
            if time.time() > deadline or any(p.poll() is not None for p in self.processes):
                logs = "\n".join((self.folder / f).read_text()[-2000:] for f in ("head.log", "worker.log")
                                 if (self.folder / f).exists())
                self.stop()
                raise RuntimeError(f"the two-node cluster did not come up: {error[-3000:]}\n{logs}")
            time.sleep(3)

    def wait_ready(self, timeout_s: float = 240) -> None:
        """Until a job sees two alive nodes (the head's job agent also takes jobs only after a while)."""
        check = "import ray; ray.init(); assert sum(n['Alive'] for n in ray.nodes()) == 2, ray.nodes()"

        def two_nodes() -> None:
            info = self.wait(self.submit(f"python -c {json.dumps(check)}", runtime_env={}))
            if info["driver_exit_code"] != 0:
                raise RuntimeError(info["logs"][-2000:])

        self._until(two_nodes, timeout_s)

    def submit(self, entrypoint: str, runtime_env: dict | None = None, env_vars: dict | None = None) -> str:
        if runtime_env is None:
            runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES}
        if env_vars:
            runtime_env = {**runtime_env, "env_vars": env_vars}
        return _client(self.client, "submit", json.dumps({"entrypoint": entrypoint, "runtime_env": runtime_env}))["job_id"]

    def wait(self, job_id: str) -> dict:
        return _client(self.client, "wait", job_id)

    def logs(self, job_id: str) -> dict:
        return _client(self.client, "logs", job_id)

    def stop(self) -> None:
        for process in reversed(self.processes):
            _stop_group(process)


@pytest.fixture(scope="module")
def bucket(s3_server):
    """The bucket with the corpus and the tiny model; the test process's own S3 environment points at
    the server too (module-scoped, so no monkeypatch fixture)."""
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import fsspec

        fsspec.get_filesystem_class("s3").clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:64]


@pytest.fixture(scope="module")
def inputs(bucket, tiny_bert_dir, texts):
    """The tiny model and the corpus in the bucket: a flat corpus file for jobs.run, date partitions for
    the nights (16 sentences a day)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(f"{tiny_bert_dir}/", f"{BUCKET}/models/tiny-bert/", recursive=True)
    with fs.open(f"{BUCKET}/corpus/part-0.parquet", "wb") as f:
        pq.write_table(pa.table({"text": texts}), f)
    for i, day in enumerate(["2024-01-01", "2024-01-02", "2024-01-03"]):
        with fs.open(f"{BUCKET}/days/date={day}/part-0.parquet", "wb") as f:
            pq.write_table(pa.table({"text": texts[16 * i:16 * (i + 1)]}), f)
    return {"model": f"s3://{BUCKET}/models/tiny-bert", "corpus": f"s3://{BUCKET}/corpus/part-0.parquet",
            "days": f"s3://{BUCKET}/days"}


@pytest.fixture(scope="module")
def cluster(bucket, inputs, tmp_path_factory):
    env = {**os.environ, **bucket, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           # what a job submitted with `--runtime-env` gets: give the stop protocol time to checkpoint
           "RAY_JOB_STOP_WAIT_TIME_S": "120"}
    env.pop("TSDAE_MODEL_CACHE", None)
    # A short folder: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    cluster = TwoNodeCluster(Path(tempfile.mkdtemp(prefix="tn-", dir="/tmp")), env)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def _config(folder: Path, name: str, inputs: dict, *, storage: str = f"s3://{BUCKET}", **overrides) -> Path:
    """A tiny run config with corpus, model, checkpoints and outputs in the bucket (storage: the prefix for
    checkpoints and outputs) and every model-touching process on the worker node."""
    cfg = {
        "name": name,
        "storage_path": f"{storage}/ray",
        "output_dir": f"{storage}/runs",
        "read": {"uri": inputs["corpus"]},
        "corrupt": {"max_length": 32},
        "model": {"name_or_path": inputs["model"]},
        "train": {"global_batch_size": 8, "max_steps": 4, "lr": 1e-3, "report_every": 2, "checkpoint_every": 2},
        "scale": {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_actors": 1, "cpus_per_preprocess_actor": 0.5,
                  "resources_per_worker": ON_WORKER, "resources_per_preprocess_actor": ON_WORKER},
        # relative: each node reads the STS data from its own copy of the job's working dir
        # eval.max_length: also the export's max_seq_length (longer than training's corrupt.max_length)
        "eval": {"sts_dir": "data/sts", "tasks": ["STS16"], "num_cpus": 1, "validation_task": None, "max_length": 48,
                 "resources": ON_WORKER},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _s3():
    import fsspec

    fsspec.get_filesystem_class("s3").clear_instance_cache()
    return fsspec.filesystem("s3")


def _job(cluster, entrypoint: str, env_vars: dict | None = None) -> dict:
    info = cluster.wait(cluster.submit(entrypoint, env_vars=env_vars))
    info["text"] = f"status {info['status']}, exit {info['driver_exit_code']}:\n{info['logs'][-5000:]}"
    return info


def _working_dirs(cluster) -> list[Path]:
    """The head's unpacked copies of the jobs' working dir (each driver's cwd)."""
    return sorted(cluster.ray_head_dir.glob("session_*/runtime_resources/working_dir_files/*"))


# -- 1, 3 and 4a: jobs.run end to end, stopped by `ray job stop` and resumed; a read that fails once --------------
@pytest.fixture(scope="module")
def s3_run(cluster, inputs, s3_server, tmp_path_factory):
    """jobs.run with everything in the bucket, stopped with `ray job stop` during training, then resumed
    (`--resume`) to its end. Both jobs go through a proxy that resets the first GET of the corpus file and of
    the model's weights: each is read by several processes on both nodes, and one of them, in the first
    job (every cache is cold), is refused once."""
    proxy = FaultyS3Proxy(s3_server.endpoint, reset_once=("corpus/part-0.parquet", "models/tiny-bert/model.safetensors"))
    env = {"AWS_ENDPOINT_URL": proxy.endpoint}
    try:
        config = _config(tmp_path_factory.mktemp("run"), "twonode", inputs,
                         train={"epochs": 50, "max_steps": 10_000, "report_every": 1, "checkpoint_every": 0})
        # Ray records no exit code for a stopped job: the entrypoint's shell prints the driver's (its trap
        # only keeps the shell alive, SIGTERM still reaches the driver).
        job = cluster.submit(f"trap : TERM; python -m jobs.run --config {config}; echo driver exit code: $?",
                             env_vars=env)
        deadline = time.time() + 600
        while "[train] step 2/" not in (state := cluster.logs(job))["logs"]:
            assert state["status"] in ("PENDING", "RUNNING") and time.time() < deadline, state["logs"][-4000:]
            time.sleep(2)
        _client(cluster.client, "stop", job)
        stopped = cluster.wait(job)
        assert stopped["status"] == "STOPPED", stopped["logs"][-4000:]
        run = re.search(r"resume with --resume (twonode-\d{8}-\d{6})", stopped["logs"]).group(1)
        (complete,) = [p for p in _s3().find(f"{BUCKET}/ray/{run}") if p.endswith("/complete.json")]
        stopped_at = json.loads(_s3().cat_file(complete))["step"]
        resumed = _job(cluster, f"python -m jobs.run --config {config} --resume {run} train.max_steps={stopped_at + 2}",
                       env_vars=env)
    finally:
        proxy.close()
    assert resumed["driver_exit_code"] == 0, resumed["text"]
    return {"stopped": stopped, "resumed": resumed, "run": run, "stopped_at": stopped_at, "resets": proxy.resets}


def test_run_end_to_end_puts_every_artifact_in_the_bucket(cluster, s3_run, tmp_path, texts):
    from sentence_transformers import SentenceTransformer

    from tsdae.eval import SentenceEncoder, evaluate_sts, load_tasks

    fs, run = _s3(), s3_run["run"]
    outputs = f"{BUCKET}/runs/{run}"
    files = {p[len(outputs) + 1:] for p in fs.find(outputs)}
    for name in ("config.yaml", "report.md", "report.json", "metrics.jsonl", "summary.json",
                 "encoder/config.json", "encoder/modules.json", "decoder/config.json"):
        assert name in files, sorted(files)
    assert any(f.endswith(".png") for f in files), sorted(files)  # the charts
    checkpoints = {p.split("/")[3] for p in fs.find(f"{BUCKET}/ray/{run}") if re.search(r"/checkpoint_\d", p)}
    assert len(checkpoints) == 2, checkpoints  # the stop's and the final one
    assert all(fs.exists(f"{BUCKET}/ray/{run}/{c}/complete.json") for c in checkpoints)
    for name in ("report.md", "encoder", "decoder", "metrics.jsonl", "summary.json"):
        assert f"s3://{outputs}/{name}" in s3_run["resumed"]["logs"]  # the job logs the final URIs

    # The encoder, downloaded from the bucket, in SentenceTransformer: the embeddings and the score the
    # run's evaluation reported. Its max_seq_length is the evaluation's max_length (48), not training's
    # corrupt.max_length (32): the long sentences show the difference.
    report = json.loads(fs.cat_file(f"{outputs}/report.json"))
    fs.get(f"{outputs}/encoder/", str(tmp_path / "encoder") + "/", recursive=True)
    st = SentenceTransformer(str(tmp_path / "encoder"), device="cpu")
    assert st.max_seq_length == report["after"]["max_length"] == 48
    ours = SentenceEncoder(str(tmp_path / "encoder"), "auto", max_length=48, device="cpu", precision="fp32")
    sentences = texts[:16] + [" ".join(texts[16:24])]
    np.testing.assert_allclose(st.encode(sentences), ours.encode(sentences), atol=1e-5)
    score = evaluate_sts(lambda s: st.encode(s, batch_size=128), load_tasks(str(ROOT / "data/sts"), ["STS16"]))
    assert score["tasks"]["STS16"]["all"] == pytest.approx(report["after"]["tasks"]["STS16"]["all"], abs=0.01)

    # Nothing durable on the head's disk: no outputs in the driver's working dir, no staging folder left.
    for copy in _working_dirs(cluster):
        assert not (copy / "runs").exists() and not (copy / "s3:").exists(), copy
    assert not list(cluster.head_tmp.glob("tsdae-out-*"))

    # Training workers, tokenizer actors and evaluation tasks ran on the worker node, never on the head.
    placement = _client(cluster.client, "placement", cluster.gcs)
    ours_actors = [(c, n) for c, n in placement["actors"] if "RayTrainWorker" in c or "CorruptAndTokenize" in c]
    ours_tasks = [(t, n) for t, n in placement["tasks"] if t.endswith("evaluate_here")]
    assert ours_actors and ours_tasks, placement
    assert all(n not in placement["head"] for _, n in ours_actors + ours_tasks), placement


def test_job_stop_checkpoints_in_the_bucket_and_resume_finishes(s3_run):
    stopped, run, stopped_at = s3_run["stopped"], s3_run["run"], s3_run["stopped_at"]
    assert "driver exit code: 143" in stopped["logs"], stopped["logs"][-4000:]
    assert f"stop requested: checkpointed at step {stopped_at}" in stopped["logs"], stopped["logs"][-4000:]
    summary = json.loads(_s3().cat_file(f"{BUCKET}/runs/{run}/summary.json"))
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == stopped_at + 2


def test_a_read_that_fails_once_is_retried_and_the_rows_are_unchanged(s3_run, texts):
    assert sorted(s3_run["resets"]) == ["corpus/part-0.parquet", "models/tiny-bert/model.safetensors"]
    # Both jobs counted every row of the corpus (the first one through the reset) and skipped nothing.
    for job in (s3_run["stopped"], s3_run["resumed"]):
        counts = {k: int(v) for k, v in re.findall(r"'(rows_read|rows_kept)': (\d+)", job["logs"])}
        assert counts == {"rows_read": len(texts), "rows_kept": len(texts)}, job["logs"][-4000:]
        assert "damaged" not in job["logs"] and "skipp" not in job["logs"]
    report = json.loads(_s3().cat_file(f"{BUCKET}/runs/{s3_run['run']}/report.json"))
    assert report["meta"]["corpus"]["files_skipped"] == []
    assert sum(report["meta"]["train"]["rows_trained_per_rank"]) == 2 * 8  # the resumed job's steps × global batch


# -- 2, 4b and 5: nights with the registry in the bucket ----------------------------------------------------------
def _nightly_config(folder: Path, inputs: dict, storage: str = f"s3://{BUCKET}/nightly") -> Path:
    return _config(folder, "night", inputs, storage=storage, read={"uri": inputs["days"]},
                   nightly={"registry_uri": f"s3://{BUCKET}/registry", "gate": {"tolerance": 100, "max_task_drop": 100}})


def _production() -> dict | None:
    fs = _s3()
    path = f"{BUCKET}/registry/production.json"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


@pytest.fixture(scope="module")
def nights(cluster, inputs, tmp_path_factory):
    """Night 1 alone; night 2 submitted twice at once (a cron retry, a double click)."""
    config = _nightly_config(tmp_path_factory.mktemp("nights"), inputs)
    first = _job(cluster, f"python -m jobs.nightly --config {config} --through 2024-01-01")
    assert first["driver_exit_code"] == 0, first["text"]
    first_production = _production()
    jobs = [cluster.submit(f"python -m jobs.nightly --config {config} --through 2024-01-02") for _ in range(2)]
    second = [cluster.wait(job) for job in jobs]
    assert [i["driver_exit_code"] for i in second] == [0, 0], [i["logs"][-3000:] for i in second]
    return {"first": first_production, "second": second, "jobs": jobs, "production": _production()}


def test_two_submissions_of_one_night_train_once(nights):
    infos = nights["second"]
    trained = [i for i in infos if "stage: train" in i["logs"]]
    held = [i for i in infos if "this submission stops" in i["logs"]]
    assert len(trained) == 1 and len(held) == 1, [i["logs"][-3000:] for i in infos]
    winner = nights["jobs"][infos.index(trained[0])]
    assert re.search(rf"is being run by {re.escape(winner)}@", held[0]["logs"]), held[0]["logs"][-3000:]
    # moved once, from the production both started from
    assert nights["production"]["previous_model_id"] == nights["first"]["model_id"]


def test_second_night_warm_starts_from_the_registry_in_the_bucket(nights, tmp_path):
    from jobs.registry import Registry

    first, second = nights["first"], nights["production"]
    assert second["previous_model_id"] == first["model_id"] != second["model_id"]
    warm = f"s3://{BUCKET}/registry/models/{first['model_id']}/encoder"
    (trained,) = [i for i in nights["second"] if "stage: train" in i["logs"]]
    assert f"warm start from {first['model_id']} ({warm})" in trained["logs"]
    registry = Registry(f"s3://{BUCKET}/registry")
    local = registry.fetch(second["model_id"], tmp_path / "promoted")  # checks every file against MANIFEST.json
    assert (local / "encoder" / "config.json").exists() and (local / "lineage.json").exists()
    assert json.loads((local / "lineage.json").read_text())["parent"] == first["model_id"]

    # The night's own outputs are in the bucket under its model id, logged by URI; the registry published
    # the model from them.
    fs, run = _s3(), f"{BUCKET}/nightly/runs/{second['model_id']}"
    top = {p[len(run) + 1:].split("/")[0] for p in fs.find(run)}
    assert {"config.yaml", "report.json", "report.md", "sts_tasks.png", "loss.png", "lineage.json", "encoder",
            "decoder", "metrics.jsonl", "summary.json"} <= top, sorted(top)
    assert json.loads(fs.cat_file(f"{run}/report.json"))["meta"]["gate"].startswith("PROMOTE")
    assert json.loads(fs.cat_file(f"{run}/lineage.json")) == registry.lineage(second["model_id"])
    assert f"  s3://{run}/lineage.json\n" in trained["logs"]
    assert (local / "encoder" / "model.safetensors").read_bytes() == fs.cat_file(f"{run}/encoder/model.safetensors")


def test_storage_faults_exit_8_naming_the_uri_and_production_stays(cluster, nights, inputs, s3_server, tmp_path):
    before = _production()
    # Missing credentials: no key in the environment, no credentials file, no instance metadata.
    no_credentials = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                      "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
    config = _nightly_config(tmp_path / "creds", inputs)
    info = _job(cluster, f"python -m jobs.nightly --config {config} --through 2024-01-03", env_vars=no_credentials)
    assert info["driver_exit_code"] == 8, info["text"]
    assert "storage failure (credentials)" in info["logs"] and f"s3://{BUCKET}/" in info["logs"], info["text"]

    # Access denied for the night's outputs (a 403 from the proxy for every key under denied/).
    proxy = FaultyS3Proxy(s3_server.endpoint, deny_prefix="denied/")
    try:
        config = _nightly_config(tmp_path / "denied", inputs, storage=f"s3://{BUCKET}/denied")
        info = _job(cluster, f"python -m jobs.nightly --config {config} --through 2024-01-03",
                    env_vars={"AWS_ENDPOINT_URL": proxy.endpoint})
    finally:
        proxy.close()
    assert info["driver_exit_code"] == 8, info["text"]
    assert proxy.denied and "storage failure (permission)" in info["logs"], info["text"]
    assert f"s3://{BUCKET}/denied/" in info["logs"] and "stage: train" not in info["logs"]
    assert _production() == before
