"""A run's outputs at a path or in a bucket (tsdae.storage.OutputDir, on moto's S3 server): what is put
where, what replaces an earlier attempt, a missing bucket named as a storage failure and never created,
jobs.evaluate --out on S3, and (marked ray) jobs.run end to end with output_dir: s3://…"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from test_evaluate_job import _small_sts
from test_validation_run import _tiny_run_config

from jobs import stages
from jobs.config import dump_config
from jobs.evaluate import main as evaluate_main
from jobs.exits import EXIT_STORAGE
from tsdae.storage import OutputDir, StorageError, publish

ROOT = Path(__file__).resolve().parents[1]


def _s3():
    return fsspec.filesystem("s3")


def _folder(path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def _missing_bucket(s3_bucket: str) -> str:
    return f"{s3_bucket}-missing"


@pytest.fixture
def staging(tmp_path, monkeypatch) -> Path:
    """OutputDir's staging folders go under the test's tmp_path (a failed upload keeps its own)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


# -- tier 2: the storage layer on the S3 server ----------------------------------------------------------------
def test_a_local_output_dir_is_written_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with OutputDir("runs/r-1") as out:  # relative stays relative, as the demo logs it
        assert out.local == Path("runs/r-1") and out.local.is_dir() and not out.remote
        (out.local / "report.md").write_text("x")
        assert out.publish("report.md", "not-written") == {"report.md": "runs/r-1/report.md"}
        assert out.published == {"report.md": "runs/r-1/report.md"}
    assert (tmp_path / "runs/r-1/report.md").read_text() == "x"  # close leaves a local folder alone
    with OutputDir(f"file://{tmp_path}/abs") as out:
        assert out.local == tmp_path / "abs" and out.uri_of("encoder") == str(tmp_path / "abs" / "encoder")


def test_publish_mirrors_folders_and_files_into_the_bucket(s3_bucket, tmp_path):
    run = f"{s3_bucket}/runs/r-1"
    with OutputDir(run) as out:
        assert out.remote and out.uri == run and out.uri_of("encoder") == f"{run}/encoder"
        staging = out.local
        _folder(out.local / "encoder", {"config.json": "{}", "1_Pooling/config.json": "{}", "old.bin": "stale"})
        _folder(out.local / "final_encoder", {"config.json": "{}"})
        (out.local / "report.md").write_text("first")
        assert out.publish("encoder", "final_encoder", "report.md") == {
            "encoder": f"{run}/encoder", "final_encoder": f"{run}/final_encoder", "report.md": f"{run}/report.md"}
        # a second attempt of the same run: encoder/ without old.bin, no final_encoder/, a new report
        (out.local / "encoder" / "old.bin").unlink()
        (out.local / "report.md").write_text("second")
        for path in (out.local / "final_encoder").rglob("*"):
            path.unlink()
        (out.local / "final_encoder").rmdir()
        out.publish("encoder", "final_encoder", "report.md")
    assert not staging.exists()  # the staging folder goes with the job
    root = run.removeprefix("s3://")
    assert sorted(_s3().find(root)) == [f"{root}/encoder/1_Pooling/config.json", f"{root}/encoder/config.json",
                                        f"{root}/report.md"]
    assert _s3().cat_file(f"{root}/report.md") == b"second"


def test_a_missing_bucket_is_a_storage_error_naming_the_uri_and_is_never_created(s3_bucket, tmp_path, staging):
    missing = _missing_bucket(s3_bucket)
    folder = _folder(tmp_path / "encoder", {"config.json": "{}", "sub/x.json": "{}"})
    with pytest.raises(StorageError, match=rf"{missing}/runs/r/encoder: storage failure \(missing bucket\)"):
        publish(folder, f"{missing}/runs/r/encoder")
    with pytest.raises(StorageError, match=rf"{missing}/runs/r/config.json: storage failure \(missing bucket\)"):
        publish(folder / "config.json", f"{missing}/runs/r/config.json")
    assert not _s3().exists(missing.removeprefix("s3://"))
    out = OutputDir(f"{missing}/runs/r")
    (out.local / "report.md").write_text("kept")
    with pytest.raises(StorageError, match=f"{missing}/runs/r/report.md"):
        out.publish("report.md")
    out.close()
    assert out.local.parent == staging and (out.local / "report.md").read_text() == "kept"  # not lost


def test_an_unreachable_endpoint_is_a_storage_error_naming_the_uri(tmp_path, staging, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}"), ("AWS_ACCESS_KEY_ID", "test"),
                       ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_MAX_ATTEMPTS", "1")):
        monkeypatch.setenv(key, value)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # a client made for another endpoint is cached
    with OutputDir("s3://runs-bucket/runs/r-1") as out:
        (out.local / "config.yaml").write_text("name: r\n")
        with pytest.raises(stages.StageError) as failed:
            stages.publish_outputs(out, "config.yaml")
    assert failed.value.exit_code == EXIT_STORAGE
    assert "s3://runs-bucket/runs/r-1/config.yaml: storage failure (endpoint or network)" in str(failed.value)


def test_the_first_write_of_a_run_fails_the_job_with_the_storage_code(s3_bucket, tmp_path, staging, tiny_bert_dir):
    """run_all puts config.yaml in the bucket before anything starts: a bucket that cannot be written
    stops the run there, exit 8, naming the URI (no Ray is needed to get that far)."""
    cfg = _tiny_run_config(tmp_path, tiny_bert_dir, "nobucket", 0, output_dir=f"{_missing_bucket(s3_bucket)}/runs")
    with OutputDir(cfg.run_output("nobucket-1")) as out:
        with pytest.raises(stages.StageError) as failed:
            stages.run_all(cfg, "nobucket-1", out, config_label="test")
    assert failed.value.exit_code == EXIT_STORAGE
    assert f"{_missing_bucket(s3_bucket)}/runs/nobucket-1/config.yaml: storage failure (missing bucket)" in str(failed.value)


def test_evaluate_writes_its_report_to_a_bucket(s3_bucket, tiny_bert_dir, tmp_path, monkeypatch, caplog, staging):
    caplog.set_level("INFO", logger="tsdae")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    sts_dir = _small_sts(tmp_path / "sts")
    args = ["--model", tiny_bert_dir, "--sts-dir", sts_dir, "--tasks", "STSB-dev"]
    assert evaluate_main([*args, "--out", f"{s3_bucket}/evals/e1"]) == 0
    root = f"{s3_bucket}/evals/e1".removeprefix("s3://")
    assert sorted(Path(p).name for p in _s3().find(root)) == ["report.json", "report.md", "sts_tasks.png"]
    assert json.loads(_s3().cat_file(f"{root}/report.json"))["before"]["tasks"]["STSB-dev"]["n_pairs"] == 40
    assert f"{s3_bucket}/evals/e1/report.json" in caplog.text
    assert os.listdir(tmp_path / "cwd") == [] and sorted(os.listdir(staging)) == ["cwd", "sts"]  # no "s3:"
    missing = f"{_missing_bucket(s3_bucket)}/evals/e2"
    assert evaluate_main([*args, "--out", missing]) == EXIT_STORAGE
    assert f"{missing}/report.json: storage failure (missing bucket)" in caplog.text


# -- tier 3: jobs.run end to end, outputs in the bucket ------------------------------------------------------
@pytest.mark.ray
def test_a_run_with_output_dir_in_a_bucket_puts_every_output_there(s3_bucket, tiny_bert_dir, tmp_path):
    """6 steps of the tiny BERT, checkpoints at 3 and 6 scored on STS-B dev, launched as `python -m
    jobs.run` from an empty working directory (as Ray's scratch copy of a job would be): the config,
    report, charts, exports and records are in the bucket, logged by URI; nothing is left in the working
    directory; SentenceTransformer loads the encoder downloaded from the bucket and embeds as our encoder
    does."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from tsdae.eval import SentenceEncoder

    cfg = _tiny_run_config(tmp_path, tiny_bert_dir, "s3run", 3, output_dir=f"{s3_bucket}/runs")
    cfg = cfg.replace(scale=cfg.scale.replace(local_num_cpus=4).model_dump())
    config = tmp_path / "s3run.yaml"
    config.write_text(dump_config(cfg))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(config)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-6000:]
    assert sorted(os.listdir(cwd)) == []  # no folder named "s3:", nothing else either

    s3 = _s3()
    (run,) = s3.ls(f"{s3_bucket}/runs".removeprefix("s3://"))
    run_uri = f"s3://{run}"
    names = {p[len(run) + 1:] for p in s3.find(run)}
    top = {n.split("/")[0] for n in names}
    assert {"config.yaml", "report.json", "report.md", "sts_tasks.png", "loss.png", "dev_over_steps.png",
            "encoder", "decoder", "metrics.jsonl", "summary.json"} <= top <= {
            "config.yaml", "report.json", "report.md", "sts_tasks.png", "loss.png", "dev_over_steps.png",
            "encoder", "decoder", "final_encoder", "metrics.jsonl", "summary.json"}
    assert {"encoder/config.json", "encoder/model.safetensors", "encoder/modules.json", "encoder/tsdae.json",
            "encoder/1_Pooling/config.json", "decoder/config.json", "decoder/model.safetensors"} <= names
    report = json.loads(s3.cat_file(f"{run}/report.json"))
    assert report["meta"]["encoder_dir"] == f"{run_uri}/encoder"
    assert report["after"]["tasks"]["STSB-dev"]["n_pairs"] == 200
    assert json.loads(s3.cat_file(f"{run}/summary.json"))["steps"] == 6
    assert json.loads(s3.cat_file(f"{run}/metrics.jsonl").decode().splitlines()[-1])["step"] == 6
    assert s3.size(f"{run}/loss.png") > 1000
    for name in sorted(top):  # the job's last log block: one URI per output
        assert f"  {run_uri}/{name}\n" in log, name

    local = tmp_path / "downloaded"
    s3.get(f"{run}/encoder/", str(local) + "/", recursive=True)
    sentences = ["A man is playing a guitar.", "The cat sleeps on the sofa.", "Stocks fell sharply today."]
    ours = SentenceEncoder(str(local), report["after"]["pooling"]).encode(sentences)
    theirs = SentenceTransformer(str(local), device="cpu").encode(sentences)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_a_night_with_outputs_and_registry_in_a_bucket(s3_bucket, tiny_bert_dir, tmp_path):
    """One real night (`python -m jobs.nightly`, an empty working directory): its report, lineage and
    exports are in the bucket under the model id, and the registry (in the bucket too) published the model
    from the night's own copy, in the same process; the promoted model's manifest verifies."""
    import pyarrow.parquet as pq
    from test_nightly import DAYS, _add_day, _config

    from jobs.registry import Registry

    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:48]
    _add_day(tmp_path / "corpus", DAYS[0], texts)
    scale = {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_actors": 1, "cpus_per_preprocess_actor": 0.5,
             "local_num_cpus": 4}
    gate = {"tolerance": 1.0, "max_task_drop": 2.0}  # as the three nights of test_nightly: 3 steps of a random model
    _config(tmp_path, tiny_bert_dir, {"registry_uri": f"{s3_bucket}/registry", "gate": gate},
            output_dir=f"{s3_bucket}/runs", scale=scale, train={"max_steps": 3, "lr": 1e-4, "report_every": 1})
    # (_config wrote tmp_path/nightly.yaml)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.run([sys.executable, "-m", "jobs.nightly", "--config", str(tmp_path / "nightly.yaml"),
                          "--through", DAYS[0]], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-6000:]
    assert os.listdir(cwd) == []

    registry = Registry(f"{s3_bucket}/registry")
    model_id = registry.production()["model_id"]
    run = f"{s3_bucket}/runs/{model_id}".removeprefix("s3://")
    s3 = _s3()
    top = {p[len(run) + 1:].split("/")[0] for p in s3.find(run)}
    assert {"config.yaml", "report.json", "report.md", "sts_tasks.png", "loss.png", "lineage.json", "encoder",
            "decoder", "metrics.jsonl", "summary.json"} <= top
    assert json.loads(s3.cat_file(f"{run}/report.json"))["meta"]["gate"].startswith("PROMOTE")
    assert json.loads(s3.cat_file(f"{run}/lineage.json")) == registry.lineage(model_id)
    assert f"  s3://{run}/lineage.json\n" in log
    local = registry.fetch(model_id, tmp_path / "check")  # every size and checksum against the manifest
    assert (local / "encoder" / "model.safetensors").read_bytes() == s3.cat_file(f"{run}/encoder/model.safetensors")
