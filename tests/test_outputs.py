"""A run's outputs at a path or in a bucket (tsdae.storage.OutputDir, on moto's S3 server): what is put
where, what replaces an earlier attempt, a missing bucket named as a storage failure and never created,
jobs.evaluate --out on S3. Runs and nights end to end with every output in a bucket, on two nodes:
tests/test_two_node.py."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import fsspec
import pytest
from test_evaluate_job import _small_sts
from test_validation_run import _tiny_run_config

from jobs import stages
from jobs.evaluate import main as evaluate_main
from jobs.exits import EXIT_STORAGE
from tsdae.storage import OutputDir, StorageError, publish


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
