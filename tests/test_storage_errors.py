"""A failing store is a storage failure (exit 8, the URI and the likely cause named), never "bad corpus"
and never a file skipped by on_bad_file: skip (that would change the run's rows)."""

from __future__ import annotations

import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import stages
from jobs.config import parse_config
from jobs.exits import EXIT_DATA, EXIT_STORAGE
from pipeline import CorpusError
from pipeline import read as corpus_read
from tsdae.storage import StorageError, storage_cause


@pytest.mark.parametrize("error, cause", [
    (PermissionError("Access Denied"), "permission"),
    (OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"), "permission"),
    (OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect"),
     "endpoint or network"),
    (OSError("When reading information for key 'x': AWS Error SLOW_DOWN (HTTP status 503)"), "throttling"),
    (OSError("Unable to locate credentials"), "credentials"),
    (FileNotFoundError("The specified bucket does not exist: NoSuchBucket"), "missing bucket"),
    (ConnectionResetError("reset by peer"), "endpoint or network"),
    (pa.ArrowInvalid("Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
                     "parquet file."), None),
    (OSError("Couldn't deserialize thrift: TProtocolException: Invalid data"), None),
    (OSError("Corrupt snappy compressed data."), None),
    # A status code counts as a whole token only: this hash in a path once read as HTTP 429 (throttling).
    (FileNotFoundError("No such file or directory: '/r/nights/5e5d358303ae094144429821e.json'"), None),
    (OSError("Too many requests (429)"), "throttling"),
])
def test_storage_failures_are_told_from_bad_bytes(error, cause):
    assert storage_cause(error) == cause


@pytest.mark.parametrize("on_bad_file", ["fail", "skip"])
def test_a_denied_footer_read_is_a_storage_error_even_with_skip(tmp_path, monkeypatch, on_bad_file):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one", "two"]}), path)

    def denied(*args, **kwargs):
        raise OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")

    monkeypatch.setattr(corpus_read.pq, "read_schema", denied)
    with pytest.raises(StorageError, match=r"a\.parquet: storage failure \(permission\)"):
        corpus_read.validate_schemas([str(path)], pa.fs.LocalFileSystem(), "text", on_bad_file)


def test_a_damaged_footer_is_still_bad_data(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="not a readable parquet file"):
        corpus_read.validate_schemas([str(path)], pa.fs.LocalFileSystem(), "text", "fail")
    assert corpus_read.validate_schemas([str(path)], pa.fs.LocalFileSystem(), "text", "skip")[0] == []


@pytest.mark.parametrize("listing", [corpus_read.list_corpus_files,
                                     lambda uri: corpus_read.list_partitions(uri, "date")])
def test_an_unreachable_s3_endpoint_is_a_storage_error_naming_the_uri(monkeypatch, listing):
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import fsspec

    fsspec.get_filesystem_class("s3").clear_instance_cache()  # a client made for another endpoint is cached
    with pytest.raises(StorageError, match=r"s3://corpus-bucket/days/: storage failure \(endpoint or network\)"):
        listing("s3://corpus-bucket/days/")


def test_the_read_stage_exits_with_the_storage_code(monkeypatch):
    cfg = parse_config({"read": {"uri": "s3://corpus-bucket/days/"}})

    def failing(read_cfg):
        raise StorageError("s3://corpus-bucket/days/: storage failure (credentials): NoCredentialsError")

    monkeypatch.setattr(stages, "corpus_stats", failing)
    with pytest.raises(stages.StageError) as e:
        stages.read_stage(cfg)
    assert e.value.exit_code == EXIT_STORAGE != EXIT_DATA and "s3://corpus-bucket/days/" in str(e.value)


def test_a_storage_error_inside_a_wrapped_training_failure_is_found():
    try:
        try:
            raise StorageError("s3://b/x.parquet: storage failure (throttling): SlowDown")
        except StorageError as inner:
            raise RuntimeError("Training failed due to worker errors") from inner
    except RuntimeError as outer:
        assert stages.storage_failed(outer)
    assert stages.storage_failed(RuntimeError("worker traceback ...\ntsdae.storage.StorageError: s3://b: ..."))
    assert not stages.storage_failed(RuntimeError("CUDA out of memory"))


def test_ray_trains_own_upload_failure_is_a_storage_failure():
    """Seen on the two-node cluster: a checkpoint snapshot upload that the network broke failed the run as
    "training failed" (exit 4); it is the store, exit 8."""
    from ray.train import ControllerError

    upload = OSError("When uploading part for key 'ray/run/checkpoint_manager_snapshot.json' in bucket 'b': AWS Error "
                     "NETWORK_CONNECTION during UploadPart operation: curlCode: 52, Server returned nothing")
    assert stages.storage_failed(ControllerError(upload))
    assert not stages.storage_failed(ControllerError(ValueError("loss is nan at step 3")))


def _no_credentials(monkeypatch) -> None:
    import fsspec

    for key, value in {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                       "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    fsspec.get_filesystem_class("s3").clear_instance_cache()


def test_missing_credentials_while_the_config_is_checked_exit_with_the_storage_code(s3_bucket, monkeypatch, tmp_path,
                                                                                    caplog):
    """Preflight reads the model's config.json from the bucket: without credentials the job exits 8 naming
    the URI (it was a traceback, exit 1)."""
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {{name_or_path: {s3_bucket}/models/base}}\n")
    _no_credentials(monkeypatch)
    assert stages.start_job(str(config)) == EXIT_STORAGE
    assert f"{s3_bucket}/models/base: storage failure (credentials)" in caplog.text


def test_a_night_whose_registry_cannot_be_read_exits_with_the_storage_code(s3_bucket, monkeypatch, caplog):
    from datetime import date

    from jobs.nightly import run_night

    cfg = parse_config({"read": {"uri": f"{s3_bucket}/days"}, "nightly": {"registry_uri": f"{s3_bucket}/registry"}})
    _no_credentials(monkeypatch)
    assert run_night(cfg, date(2024, 1, 1), "test").exit_code == EXIT_STORAGE
    assert f"{s3_bucket}/registry/production.json: storage failure (credentials)" in caplog.text
