"""MLflow's model registry as the nightly registry (``mlflow://<name>``), against a real `mlflow server`:
the same contract as the storage registry (complete-or-absent versions, verified downloads, an alias that
moves last), nights with the MLflow registry and tracking on (the Ray stages replaced by the fakes of
tests/test_nightly.py), and a crash at each of its steps leaving production unchanged."""

from __future__ import annotations

import json
import uuid
from datetime import date
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_nightly import DAYS, Crash, _add_day, _config, _crash, fake, texts  # noqa: F401 (fixtures)
from test_registry import _model_dir

from jobs import nightly
from jobs.mlflow_registry import ALIAS, MlflowRegistry
from jobs.registry import RegistryError, open_registry
from jobs.registry import main as registry_main


@pytest.fixture
def name() -> str:
    """A registered model of its own for each test (the server is shared by the session)."""
    return f"tsdae-test-{uuid.uuid4().hex[:8]}"


def _stored(server, registry: MlflowRegistry, model_id: str, rel: str) -> Path:
    """Where the server's artifact store keeps a published file (to corrupt it on purpose)."""
    run_id = registry._version(model_id).run_id
    (path,) = (server.log.parent / "artifacts").rglob(f"{run_id}/artifacts/model/{rel}")
    return path


# -- the registry on its own ----------------------------------------------------------------------------
def test_publish_fetch_promote_roundtrip(mlflow_server, name, tmp_path):
    registry = open_registry(f"mlflow://{name}", mlflow_server.uri)
    assert isinstance(registry, MlflowRegistry) and registry.production() is None and registry.night("k") is None
    manifest = registry.publish("m1", _model_dir(tmp_path / "src"))
    assert set(manifest["files"]) == {"encoder/model.safetensors", "encoder/config.json", "lineage.json"}
    assert registry.manifest("m1") == manifest and registry.lineage("m1")["data"]["consumed_partitions"] == ["date=weights"]
    local = registry.fetch("m1", tmp_path / "cache" / "m1")
    assert (local / "encoder" / "model.safetensors").read_text() == "weights"
    pointer = registry.promote("m1", expected_current=None, consumed_partitions=["date=2024-01-01"])
    assert registry.production() == pointer
    assert (pointer["model_id"], pointer["version"], pointer["previous_model_id"]) == ("m1", "1", None)
    client = MlflowClient(mlflow_server.uri)
    assert client.get_model_version_by_alias(name, ALIAS).version == "1"


def test_a_model_without_a_version_cannot_be_promoted_or_fetched(mlflow_server, name, tmp_path, monkeypatch):
    registry = MlflowRegistry(f"mlflow://{name}", mlflow_server.uri)
    monkeypatch.setattr(registry.client, "create_model_version", _crash)  # files and manifest uploaded, then dead
    with pytest.raises(Crash):
        registry.publish("m1", _model_dir(tmp_path / "src"))
    monkeypatch.undo()
    with pytest.raises(RegistryError, match="never completely written"):
        registry.promote("m1", expected_current=None)
    with pytest.raises(RegistryError, match="no complete version"):
        registry.fetch("m1", tmp_path / "cache")
    assert registry.production() is None
    registry.publish("m1", tmp_path / "src")  # a re-run registers it
    assert registry.promote("m1", expected_current=None)["version"] == "1"


def test_fetch_refuses_a_corrupted_file_and_leaves_no_partial_copy(mlflow_server, name, tmp_path):
    registry = MlflowRegistry(f"mlflow://{name}", mlflow_server.uri)
    registry.publish("m1", _model_dir(tmp_path / "src"))
    _stored(mlflow_server, registry, "m1", "encoder/model.safetensors").write_text("weightz")
    with pytest.raises(RegistryError, match="model.safetensors"):
        registry.fetch("m1", tmp_path / "cache" / "m1")
    assert not list((tmp_path / "cache").iterdir())


def test_promote_refuses_a_production_that_moved_and_production_is_never_rewritten(mlflow_server, name, tmp_path):
    registry = MlflowRegistry(f"mlflow://{name}", mlflow_server.uri)
    first = registry.publish("m1", _model_dir(tmp_path / "a", "one"))
    registry.publish("m2", _model_dir(tmp_path / "b", "two"))
    registry.promote("m1", expected_current=None)
    with pytest.raises(RegistryError, match="moved"):
        registry.promote("m2", expected_current=None)
    assert registry.production()["model_id"] == "m1"
    assert registry.publish("m1", tmp_path / "a") == first  # the same files: nothing to do
    with pytest.raises(RegistryError, match="in production"):
        registry.publish("m1", _model_dir(tmp_path / "c", "eins"))
    again = registry.publish("m2", _model_dir(tmp_path / "d", "zwei"))  # never promoted: registered anew
    assert registry._version("m2").version == "3" and registry.fetch("m2", tmp_path / "m2").joinpath(
        "encoder", "model.safetensors").read_text() == "zwei"
    assert again["files"] == registry.manifest("m2")["files"]


def test_cli_shows_and_rolls_back_on_mlflow(mlflow_server, name, tmp_path, capsys):
    uri = f"mlflow://{name}"
    registry = MlflowRegistry(uri, mlflow_server.uri)
    registry.publish("m1", _model_dir(tmp_path / "a", "one"))
    registry.publish("m2", _model_dir(tmp_path / "b", "two"))
    registry.promote("m1", expected_current=None)
    registry.promote("m2", expected_current="m1")
    assert registry_main([uri, "--tracking-uri", mlflow_server.uri, "promote", "m1"]) == 0
    pointer = registry.production()
    assert (pointer["model_id"], pointer["previous_model_id"], pointer["manual"]) == ("m1", "m2", True)
    assert pointer["consumed_partitions"] == ["date=one"]  # from m1's own lineage
    assert registry_main([uri, "--tracking-uri", mlflow_server.uri, "promote", "nope"]) == 7
    assert registry_main(["mlflow://", "show"]) == 2
    capsys.readouterr()
    assert registry_main([uri, "--tracking-uri", mlflow_server.uri, "show"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1"


# -- nights with the MLflow registry (stages faked) --------------------------------------------------------
def _mlflow_config(tmp_path, tiny_bert_dir, server, name, tracked: bool = True, **nightly_section):
    """tests/test_nightly.py's night config with the MLflow registry, and tracking to the same server."""
    return _config(tmp_path, tiny_bert_dir, {"registry_uri": f"mlflow://{name}", **nightly_section},
                   tracking={"mlflow_uri": server.uri, "experiment": name, "enabled": tracked})


def test_two_nights_register_alias_and_reject_a_regression(mlflow_server, name, tmp_path, tiny_bert_dir, texts,
                                                          fake):
    for i, day in enumerate(DAYS[:2]):
        _add_day(tmp_path / "corpus", day, texts[48 * i:48 * (i + 1)])
    cfg = _mlflow_config(tmp_path, tiny_bert_dir, mlflow_server, name, gate={"tolerance": 0.5})
    first = nightly.run_night(cfg, date(2024, 1, 1), "nightly.yaml", git_commit="abc123")
    assert (first.exit_code, first.status) == (0, "promoted")
    client = MlflowClient(mlflow_server.uri)
    v1 = client.get_model_version_by_alias(name, ALIAS)
    assert v1.version == "1" and v1.tags["tsdae.model_id"] == first.model_id
    assert v1.tags["tsdae.partitions"] == '["date=2024-01-01"]' and v1.tags["tsdae.git_commit"] == "abc123"
    (night_run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    # The version's files are the night's run's model/ folder: the UI links the version and the night's metrics.
    assert v1.run_id == night_run.info.run_id == v1.tags["tsdae.mlflow_run_id"]
    assert v1.source.endswith(f"{night_run.info.run_id}/artifacts/model")
    assert night_run.data.tags["tsdae.gate"] == "PROMOTE" and night_run.data.tags["tsdae.registry_version"] == "1"
    assert night_run.data.tags["tsdae.night_status"] == "promoted" and night_run.info.status == "FINISHED"
    assert night_run.data.metrics["sts_after/STS16"] == 20.0 and night_run.data.metrics["gate/delta_avg"] == 10.0

    fake.next_score = 19.0  # one point worse than production's 20: a forced regression
    second = nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml")
    assert (second.exit_code, second.status) == (6, "rejected")
    # MLflow's artifacts are not readable by the workers: they warm-start from a verified copy in storage_path
    ((_, warm, _),) = [c for c in fake.calls if c[0] == "train" and c[2] == second.model_id]
    staged = Path(cfg.storage_path) / "warm-start" / first.model_id
    assert warm == str(staged / "encoder") and (staged / "MANIFEST.json").exists()
    assert client.get_model_version_by_alias(name, ALIAS).version == "1"
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == ["1"]  # nothing registered
    assert nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml").status == "already-done"
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])}
    assert runs[second.model_id].data.tags["tsdae.gate"] == "REJECT"


# The registry's side of a night reaches three states: no version yet (a crash while uploading, or
# registering), a version that production does not point at (a crash while verifying, or between
# registering and moving the alias), and production moved (a crash while recording the night). One crash
# point per state; the stages before them are the storage registry's tests' (tests/test_nightly.py).
MLFLOW_CRASH_POINTS = {
    "register": ("client", "create_model_version", lambda real: _crash),
    "between registering and aliasing": ("client", "set_registered_model_alias", lambda real: _crash),
    "night record": ("registry", "record_night", lambda real: _crash),
}


@pytest.mark.parametrize("point", list(MLFLOW_CRASH_POINTS))
def test_a_crash_at_any_registry_step_leaves_the_alias_and_a_rerun_finishes(point, mlflow_server, name, tmp_path,
                                                                            tiny_bert_dir, texts, fake, monkeypatch):
    for i, day in enumerate(DAYS[:2]):
        _add_day(tmp_path / "corpus", day, texts[48 * i:48 * (i + 1)])
    cfg = _mlflow_config(tmp_path, tiny_bert_dir, mlflow_server, name, tracked=False)
    first = nightly.run_night(cfg, date(2024, 1, 1), "nightly.yaml")
    fake.next_score = 21.0

    owner_name, attr, make = MLFLOW_CRASH_POINTS[point]
    owner = {"client": MlflowClient, "registry": MlflowRegistry}[owner_name]
    monkeypatch.setattr(owner, attr, make(getattr(owner, attr)))
    with pytest.raises(Crash):
        nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml")
    monkeypatch.undo()
    fake.install(monkeypatch)  # undo removed the fakes too

    registry = MlflowRegistry(cfg.nightly.registry_uri, mlflow_server.uri)
    if point == "night record":  # the alias had moved: production is the new model, whole
        assert registry.production()["model_id"] != first.model_id
    else:
        assert registry.production()["model_id"] == first.model_id
    registry.fetch(registry.production()["model_id"], tmp_path / "check")  # every checksum verifies

    rerun = nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml")
    assert rerun.exit_code == 0
    pointer = registry.production()
    assert pointer["model_id"] != first.model_id and pointer["previous_model_id"] == first.model_id
    assert pointer["consumed_partitions"] == ["date=2024-01-01", "date=2024-01-02"]
    nightly.verify_loads(registry.fetch(pointer["model_id"], tmp_path / "check2") / "encoder", "cls")
