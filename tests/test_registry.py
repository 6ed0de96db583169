"""The model registry: complete-or-absent models, verified downloads, an atomic production pointer."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from jobs.registry import MANIFEST, POINTER, Registry, RegistryError
from jobs.registry import main as registry_main


def _model_dir(path: Path, text: str = "weights") -> Path:
    (path / "encoder").mkdir(parents=True)
    (path / "encoder" / "model.safetensors").write_text(text)
    (path / "encoder" / "config.json").write_text("{}")
    (path / "lineage.json").write_text(json.dumps({"data": {"consumed_partitions": [f"date={text}"]}}))
    return path


def test_publish_fetch_promote_roundtrip(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    assert registry.production() is None
    manifest = registry.publish("m1", _model_dir(tmp_path / "src"))
    assert set(manifest["files"]) == {"encoder/model.safetensors", "encoder/config.json", "lineage.json"}
    local = registry.fetch("m1", tmp_path / "cache" / "m1")
    assert (local / "encoder" / "model.safetensors").read_text() == "weights"
    pointer = registry.promote("m1", expected_current=None, consumed_partitions=["date=2024-01-01"])
    assert registry.production() == pointer
    assert pointer["model_id"] == "m1" and pointer["previous_model_id"] is None
    assert not [p for p in (tmp_path / "reg").iterdir() if p.name.endswith(".tmp")]


def test_a_model_without_manifest_cannot_be_promoted(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    registry.publish("m1", _model_dir(tmp_path / "src"))
    (tmp_path / "reg" / "models" / "m1" / MANIFEST).unlink()  # as if the upload died before its manifest
    with pytest.raises(RegistryError, match="never completely written"):
        registry.promote("m1", expected_current=None)
    with pytest.raises(RegistryError, match=MANIFEST):
        registry.fetch("m1", tmp_path / "cache")
    assert registry.production() is None


def test_fetch_refuses_a_corrupted_file_and_leaves_no_partial_copy(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    registry.publish("m1", _model_dir(tmp_path / "src"))
    (tmp_path / "reg" / "models" / "m1" / "encoder" / "model.safetensors").write_text("weightz")
    with pytest.raises(RegistryError, match="model.safetensors"):
        registry.fetch("m1", tmp_path / "cache" / "m1")
    assert not (tmp_path / "cache" / "m1").exists()
    assert not list((tmp_path / "cache").iterdir())  # the temp download folder is gone too


def test_promote_refuses_when_production_moved_underneath(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    registry.publish("m1", _model_dir(tmp_path / "a", "one"))
    registry.publish("m2", _model_dir(tmp_path / "b", "two"))
    registry.promote("m1", expected_current=None)
    with pytest.raises(RegistryError, match="moved"):
        registry.promote("m2", expected_current=None)
    assert registry.production()["model_id"] == "m1"


def test_pointer_write_crash_keeps_the_old_pointer(tmp_path, monkeypatch):
    registry = Registry(str(tmp_path / "reg"))
    registry.publish("m1", _model_dir(tmp_path / "a", "one"))
    registry.publish("m2", _model_dir(tmp_path / "b", "two"))
    registry.promote("m1", expected_current=None)
    before = (tmp_path / "reg" / POINTER).read_bytes()

    def dies(src, dst):
        raise KeyboardInterrupt("killed while renaming")  # a BaseException: nothing catches it

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        registry.promote("m2", expected_current="m1")
    monkeypatch.undo()
    assert (tmp_path / "reg" / POINTER).read_bytes() == before


def test_republish_same_files_is_a_no_op_and_unpromoted_models_are_rewritten(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    first = registry.publish("m1", _model_dir(tmp_path / "a", "one"))
    assert registry.publish("m1", tmp_path / "a") == first
    second = registry.publish("m1", _model_dir(tmp_path / "b", "uno"))  # never promoted: a re-run rewrites it
    assert second["files"] != first["files"]
    registry.promote("m1", expected_current=None)
    with pytest.raises(RegistryError, match="in production"):
        registry.publish("m1", _model_dir(tmp_path / "c", "eins"))
    assert registry.fetch("m1", tmp_path / "cache")  # still the promoted files, all checksums intact


def test_nights_are_recorded(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    assert registry.night("abc") is None
    registry.record_night("abc", {"status": "rejected", "exit_code": 6})
    assert registry.night("abc")["status"] == "rejected"


def test_cli_rolls_back_to_a_verified_model(tmp_path, capsys):
    uri = str(tmp_path / "reg")
    registry = Registry(uri)
    registry.publish("m1", _model_dir(tmp_path / "a", "one"))
    registry.publish("m2", _model_dir(tmp_path / "b", "two"))
    registry.promote("m1", expected_current=None)
    registry.promote("m2", expected_current="m1")
    assert registry_main([uri, "promote", "m1"]) == 0
    pointer = registry.production()
    assert pointer["model_id"] == "m1" and pointer["previous_model_id"] == "m2" and pointer["manual"] is True
    assert pointer["consumed_partitions"] == ["date=one"]  # from m1's own lineage
    assert registry_main([uri, "show"]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == "m1"


@pytest.mark.parametrize("bad_id", ["..", "../outside", "/etc", "a/b", "a\\b", "", "x'or'1'='1", "m1/.."])
def test_model_ids_that_are_not_one_name_are_refused_before_any_path_is_used(tmp_path, bad_id):
    registry = Registry(str(tmp_path / "reg"))
    for call in (lambda: registry.publish(bad_id, _model_dir(tmp_path / "src")),
                 lambda: registry.fetch(bad_id, tmp_path / "cache" / "x"),
                 lambda: registry.promote(bad_id, expected_current=None),
                 lambda: registry.lineage(bad_id)):
        with pytest.raises(RegistryError, match="not a valid model id"):
            call()
    assert not (tmp_path / "reg").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("bad_key", ["../../outside.txt", "/tmp/abs.txt", "encoder/../../x", "a\\..\\b", "./x", "c:/x"])
def test_a_manifest_key_outside_the_model_folder_is_refused_and_nothing_is_written(tmp_path, bad_key):
    registry = Registry(str(tmp_path / "reg"))
    registry.publish("m1", _model_dir(tmp_path / "src"))
    manifest_path = tmp_path / "reg" / "models" / "m1" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][bad_key] = {"size": 1, "sha256": "0" * 64}  # someone with write access to the bucket
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="not a relative path inside"):
        registry.fetch("m1", tmp_path / "cache" / "m1")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "outside.txt").exists()


def test_a_production_pointer_naming_a_path_is_refused_by_fetch(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    registry.publish("m1", _model_dir(tmp_path / "src"))
    registry.promote("m1", expected_current=None)
    pointer_path = tmp_path / "reg" / POINTER
    pointer = json.loads(pointer_path.read_text()) | {"model_id": "../../victim"}
    pointer_path.write_text(json.dumps(pointer))
    parent = registry.production()["model_id"]
    with pytest.raises(RegistryError, match="not a valid model id"):
        registry.fetch(parent, tmp_path / "cache" / parent)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_promotions_from_the_same_production_exactly_one_wins(tmp_path, where, request):
    uri = str(tmp_path / "reg") if where == "local" else request.getfixturevalue("s3_bucket") + "/registry"
    first, second = Registry(uri), Registry(uri)
    first.publish("m0", _model_dir(tmp_path / "s0", "zero"))
    first.promote("m0", expected_current=None)
    for i in (1, 2):
        first.publish(f"m{i}", _model_dir(tmp_path / f"s{i}", str(i)))
    if where == "local":
        # The lock makes check and write one step: run the second promotion while the first holds it.
        import threading

        entered, release, outcome = threading.Event(), threading.Event(), {}
        real = Registry._pointer_swap

        @contextlib.contextmanager
        def slow_swap(self):
            with real(self) as (current, commit):
                if self is first:
                    entered.set()
                    release.wait(5)
                yield current, commit

        def second_job():
            entered.wait(5)
            try:
                second.promote("m2", expected_current="m0")
                outcome["second"] = "promoted"
            except RegistryError as e:
                outcome["second"] = str(e)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Registry, "_pointer_swap", slow_swap)
            t = threading.Thread(target=second_job)
            t.start()
            first.promote("m1", expected_current="m0")
            release.set()
            t.join(10)
        assert "production moved from m0 to m1" in outcome["second"]
    else:
        # S3: the second job has read production (m0) with its ETag when the first job's write lands.
        with second._pointer_swap() as (current, commit):
            assert current["model_id"] == "m0"
            first.promote("m1", expected_current="m0")
            with pytest.raises(RegistryError, match="changed while this promotion was being written"):
                commit({"schema_version": 1, "model_id": "m2"})
    assert first.production()["model_id"] == "m1"  # moved once, by the winner


def test_the_first_promotion_on_s3_is_a_create_only_write(s3_bucket, tmp_path):
    first, second = Registry(f"{s3_bucket}/registry"), Registry(f"{s3_bucket}/registry")
    first.publish("m1", _model_dir(tmp_path / "s1", "1"))
    with second._pointer_swap() as (current, commit):
        assert current is None
        first.promote("m1", expected_current=None)
        with pytest.raises(RegistryError, match="another promotion won"):
            commit({"schema_version": 1, "model_id": "m2"})
    assert second.production()["model_id"] == "m1"
    local = second.fetch("m1", tmp_path / "cache" / "m1")  # and the model round-trips through the bucket
    assert (local / "encoder" / "model.safetensors").read_text() == "1"
