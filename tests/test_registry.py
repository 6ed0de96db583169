"""The model registry: complete-or-absent models, verified downloads, an atomic production pointer."""

from __future__ import annotations

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
