"""Nightly retraining: new-partition discovery, the regression gate, idempotent nights, promotion that
survives a crash at every stage, and (marked ray) three real nights on a local cluster."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import nightly
from jobs.config import GateConfig, load_config
from jobs.gate import decide
from jobs.registry import POINTER, Registry

ROOT = Path(__file__).resolve().parents[1]
DAYS = ("2024-01-01", "2024-01-02", "2024-01-03")


# -- fixtures: a corpus of daily partitions and a nightly config -------------------------------------------
@pytest.fixture(scope="module")
def texts() -> list[str]:
    return pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:48 * len(DAYS)]


def _add_day(corpus: Path, day: str, texts: list[str]) -> None:
    folder = corpus / f"date={day}"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), folder / "part-0.parquet")


def _config(tmp_path: Path, tiny_bert_dir: str, nightly_section: dict | None = None, **overrides):
    cfg = {
        "name": "nightly",
        "storage_path": str(tmp_path / "ray"),
        "output_dir": str(tmp_path / "runs"),
        "read": {"uri": str(tmp_path / "corpus")},
        "corrupt": {"max_length": 32},
        "model": {"name_or_path": tiny_bert_dir},
        "train": {"max_steps": 3, "lr": 1e-3, "report_every": 1},
        "scale": {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_actors": 1,
                  "cpus_per_preprocess_actor": 0.5},
        "eval": {"sts_dir": str(ROOT / "data/sts"), "tasks": ["STS16", "STSB-test"], "num_cpus": 1,
                 "validation_task": None},  # checkpoint validation has tests of its own
        "nightly": {"registry_uri": str(tmp_path / "registry"), "cache_dir": str(tmp_path / "cache"),
                    **(nightly_section or {})},
        **overrides,
    }
    path = tmp_path / "nightly.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


# -- tier 1: pure -------------------------------------------------------------------------------------------
def test_partitions_are_listed_oldest_first_and_junk_is_skipped(tmp_path):
    corpus = tmp_path / "corpus"
    for day in ("2024-01-02", "2024-01-01"):
        _add_day(corpus, day, ["a b c"])
    (corpus / "date=2024-01-03").mkdir()  # still empty: being written
    (corpus / "date=yesterday").mkdir()
    (corpus / "_SUCCESS").write_text("")
    (corpus / "date=2024-01-01" / "_tmp.parquet").write_text("")
    parts = nightly.list_days(str(corpus), "date")
    assert [p.name for p in parts] == ["date=2024-01-01", "date=2024-01-02"]
    assert parts[0].files[0][0] == "part-0.parquet" and parts[0].files[0][1] > 0
    assert nightly.partition_record(parts[0])["rows"] == 1


def test_selection_takes_unseen_days_up_to_the_night_and_a_derived_replay(tmp_path):
    parts = [nightly.Partition(f"date={d}", d, f"x/date={d}", (("p.parquet", 1),))
             for d in ("2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05")]
    consumed = {"date=2024-01-01", "date=2024-01-02", "date=2024-01-03"}
    new, replay = nightly.select_partitions(parts, consumed, date(2024, 1, 4), replay=2, replay_seed=0)
    assert [p.name for p in new] == ["date=2024-01-04"]  # 01-05 is after the night
    assert len(replay) == 2 and {p.name for p in replay} <= consumed
    again = nightly.select_partitions(parts, consumed, date(2024, 1, 4), replay=2, replay_seed=0)[1]
    assert again == replay  # a re-run draws the same replay
    late = nightly.select_partitions(parts, consumed - {"date=2024-01-02"}, date(2024, 1, 4), 0, 0)[0]
    assert [p.name for p in late] == ["date=2024-01-02", "date=2024-01-04"]  # a late backfill is picked up


def test_idempotency_key_changes_with_every_input(tmp_path, tiny_bert_dir):
    cfg = _config(tmp_path, tiny_bert_dir)
    p = nightly.Partition("date=2024-01-01", "2024-01-01", "x", (("p.parquet", 10),))
    key = nightly.idempotency_key(None, [p], [], cfg)
    assert key == nightly.idempotency_key(None, [p], [], cfg)
    rewritten = nightly.Partition(p.name, p.value, p.uri, (("p.parquet", 11),))
    others = [nightly.idempotency_key("m0", [p], [], cfg), nightly.idempotency_key(None, [rewritten], [], cfg),
              nightly.idempotency_key(None, [p], [p], cfg),
              nightly.idempotency_key(None, [p], [], _config(tmp_path, tiny_bert_dir, corrupt={"seed": 1}))]
    assert len({key, *others}) == 5


def _result(scores: dict) -> dict:
    return {"tasks": {t: {"all": s} for t, s in scores.items()}}


def test_gate_promotes_only_within_tolerance_and_per_task_drop():
    prod = _result({"STS16": 70.0, "STSB-test": 60.0, "STSB-dev": 80.0})
    gate = GateConfig(tolerance=0.5, max_task_drop=1.0)
    better = decide(prod, _result({"STS16": 71.0, "STSB-test": 59.5, "STSB-dev": 10.0}), gate)
    assert better["promote"] and better["average_tasks"] == ["STS16", "STSB-test"]  # STSB-dev is not gated
    assert better["delta"]["avg"] == pytest.approx(0.25) and not better["is_7_task_average"]
    lower = decide(prod, _result({"STS16": 69.5, "STSB-test": 59.4}), gate)
    assert not lower["promote"] and "below production" in lower["reasons"][0]
    one_task = decide(prod, _result({"STS16": 72.0, "STSB-test": 58.5}), gate)
    assert not one_task["promote"] and "STSB-test" in one_task["reasons"][0]
    collapsed = decide(prod, _result({"STS16": None, "STSB-test": 60.0}), gate)
    assert not collapsed["promote"] and "no defined score" in collapsed["reasons"][0]
    must_improve = decide(prod, _result({"STS16": 70.0, "STSB-test": 60.0}), GateConfig(tolerance=-0.1))
    assert not must_improve["promote"]
    json.dumps(better, allow_nan=False)


def test_gate_uses_the_7_task_average_when_all_seven_were_evaluated():
    from tsdae.eval import AVERAGE_TASKS

    prod = _result({t: 50.0 for t in AVERAGE_TASKS})
    cand = _result({t: 50.0 + i for i, t in enumerate(AVERAGE_TASKS)})
    decision = decide(prod, cand, GateConfig())
    assert decision["promote"] and decision["is_7_task_average"] and decision["delta"]["avg"] == pytest.approx(3.0)


def test_bad_configs_exit_2(tmp_path, tiny_bert_dir):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"nightly": {"gate": {"tolerence": 1}}}))
    assert nightly.main(["--config", str(path)]) == 2
    path.write_text(yaml.safe_dump({"name": "no-nightly-section"}))
    assert nightly.main(["--config", str(path)]) == 2
    path.write_text(yaml.safe_dump({"nightly": {}, "eval": {"tasks": ["STSB-dev"]}}))
    assert nightly.main(["--config", str(path)]) == 2


# -- tier 2: the night's control flow with the Ray stages replaced by fakes (tiny BERT, no Ray) -------------
class FakeStages:
    """Stand-ins for jobs.stages' Ray stages. A model's STS score travels inside its encoder folder
    (score.json), so production's score really comes back from the registry; the next trained model
    scores `next_score`. Every call is recorded."""

    BASE_SCORE = 10.0

    def __init__(self, tmp_path: Path, tiny_bert_dir: str):
        self.ckpts, self.tiny = tmp_path / "fake-ckpts", tiny_bert_dir
        self.next_score = 20.0
        self.calls: list[tuple] = []

    def _score(self, encoder: Path) -> float:
        f = Path(encoder) / "score.json"
        return json.loads(f.read_text()) if f.exists() else self.BASE_SCORE

    def read_stage(self, cfg):
        self.calls.append(("read", list(cfg.read.uri)))
        rows = sum(pq.ParquetDataset(u).read().num_rows for u in cfg.read.uri)
        return {"rows_read": rows, "dropped_null": 0, "dropped_empty": 0, "rows_kept": rows}

    def evaluate_stage(self, label, model_ref, pooling, eval_cfg):
        encoder = Path(model_ref)
        self.calls.append(("evaluate", label, str(encoder)))
        s = self._score(encoder)
        return {"tasks": {t: {"all": s, "wmean": s} for t in eval_cfg.tasks}, "avg7_all": None, "avg7_wmean": None}

    def train_stage(self, cfg, rows, run_name, callbacks=None):
        self.calls.append(("train", cfg.model.name_or_path, run_name))
        ckpt = self.ckpts / run_name
        if ckpt.exists():
            shutil.rmtree(ckpt)
        shutil.copytree(self.tiny, ckpt / "encoder")
        (ckpt / "encoder" / "score.json").write_text(json.dumps(self.next_score))
        return SimpleNamespace(checkpoint=SimpleNamespace(path=str(ckpt)), error=None, metrics={"step": 3},
                               path=str(self.ckpts / "no-validation-history"), filesystem=None)

    def export_stage(self, result, selected, out_dir, cfg):
        self.calls.append(("export",))
        for item in ("encoder", "decoder"):
            if (out_dir / item).exists():
                shutil.rmtree(out_dir / item)
            shutil.copytree(Path(selected.checkpoint.path) / "encoder", out_dir / item)
        summary = {"steps": 3, "world_size": 2, "rows_trained_per_rank": [24, 24], "replicas_identical": True}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        (out_dir / "metrics.jsonl").write_text("")
        return summary

    def install(self, monkeypatch):
        import jobs.stages

        for name in ("read_stage", "evaluate_stage", "train_stage", "export_stage"):
            monkeypatch.setattr(jobs.stages, name, getattr(self, name))
        monkeypatch.setattr(jobs.stages, "connect_ray", lambda *args: None)
        return self


@pytest.fixture
def fake(tmp_path, tiny_bert_dir, monkeypatch):
    return FakeStages(tmp_path, tiny_bert_dir).install(monkeypatch)


def test_a_night_promotes_records_lineage_and_a_rerun_is_a_no_op(tmp_path, tiny_bert_dir, texts, fake):
    for i, day in enumerate(DAYS[:2]):
        _add_day(tmp_path / "corpus", day, texts[48 * i:48 * (i + 1)])
    cfg = _config(tmp_path, tiny_bert_dir, {"replay_partitions": 1})
    first = nightly.run_night(cfg, date(2024, 1, 1), "nightly.yaml", git_commit="abc123")
    assert (first.exit_code, first.status) == (0, "promoted")
    registry = Registry(cfg.nightly.registry_uri)
    pointer = registry.production()
    assert pointer["model_id"] == first.model_id and pointer["consumed_partitions"] == ["date=2024-01-01"]
    lineage = registry.read_json("models", first.model_id, "lineage.json")
    assert lineage["parent"] is None and lineage["base_model"] == tiny_bert_dir
    assert [(p["name"], p["rows"]) for p in lineage["data"]["partitions"]] == [("date=2024-01-01", 48)]
    assert lineage["code"]["commit"] == "abc123" and lineage["packages"]["ray"]
    assert lineage["corruption"]["del_ratio"] == 0.6 and lineage["seeds"]["train"] == 0
    assert lineage["gate"]["promote"] and lineage["metrics"]["candidate"]["tasks"]["STS16"]["all"] == 20.0
    report = json.loads((Path(cfg.output_dir) / first.model_id / "report.json").read_text())
    assert report["meta"]["gate"].startswith("PROMOTE") and report["meta"]["gate_decision"]["promote"]

    fake.calls.clear()
    assert nightly.run_night(cfg, date(2024, 1, 1), "nightly.yaml").status == "nothing-new"
    assert fake.calls == []  # no Ray, no stage

    fake.next_score = 25.0
    second = nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml")
    assert second.status == "promoted"
    ((_, warm, _),) = [c for c in fake.calls if c[0] == "train"]
    # warm start from production, by the registry's own folder that every node fetches (not the driver's copy)
    assert warm == str(tmp_path / "registry" / "models" / first.model_id / "encoder")
    assert [c for c in fake.calls if c[0] == "read"] == [("read", [str(tmp_path / "corpus" / f"date={d}")
                                                                   for d in ("2024-01-02", "2024-01-01")])]
    pointer = registry.production()
    assert pointer["previous_model_id"] == first.model_id
    assert pointer["consumed_partitions"] == ["date=2024-01-01", "date=2024-01-02"]
    assert registry.read_json("models", second.model_id, "lineage.json")["data"]["replay"][0]["name"] == "date=2024-01-01"


def test_a_night_warm_starts_from_the_registry_uri_in_the_bucket(tmp_path, tiny_bert_dir, texts, fake, s3_bucket,
                                                                 monkeypatch):
    """With the registry in a bucket, night 2's model reference is production's URI there: each worker
    fetches it into its own node's cache, checked against the model's manifest."""
    from tsdae.model_cache import RECORD, fetch_model

    monkeypatch.setenv("TSDAE_MODEL_CACHE", str(tmp_path / "node-cache"))
    for i, day in enumerate(DAYS[:2]):
        _add_day(tmp_path / "corpus", day, texts[48 * i:48 * (i + 1)])
    cfg = _config(tmp_path, tiny_bert_dir, {"registry_uri": f"{s3_bucket}/registry"})
    first = nightly.run_night(cfg, date(2024, 1, 1), "nightly.yaml")
    fake.next_score = 25.0
    assert nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml").status == "promoted"
    ((_, warm, _),) = [c for c in fake.calls if c[0] == "train" and c[2] != first.model_id]
    assert warm == f"{s3_bucket}/registry/models/{first.model_id}/encoder"
    local = Path(fetch_model(warm))
    manifest = Registry(cfg.nightly.registry_uri).manifest(first.model_id)["files"]
    assert json.loads((local / RECORD).read_text())["files"] == {
        rel.removeprefix("encoder/"): entry for rel, entry in manifest.items() if rel.startswith("encoder/")}


def test_a_rejected_night_leaves_production_and_is_not_retrained(tmp_path, tiny_bert_dir, texts, fake):
    for i, day in enumerate(DAYS[:2]):
        _add_day(tmp_path / "corpus", day, texts[48 * i:48 * (i + 1)])
    cfg = _config(tmp_path, tiny_bert_dir, {"gate": {"tolerance": 0.5, "max_task_drop": 5.0}})
    first = nightly.run_night(cfg, date(2024, 1, 1), "nightly.yaml")
    pointer = (tmp_path / "registry" / POINTER).read_bytes()
    fake.next_score = 19.0  # one point worse than production's 20
    worse = nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml")
    assert (worse.exit_code, worse.status) == (6, "rejected")
    assert "below production's 20.00" in worse.decision["reasons"][0]
    assert (tmp_path / "registry" / POINTER).read_bytes() == pointer
    assert not (tmp_path / "registry" / "models" / worse.model_id).exists()
    report = json.loads((Path(cfg.output_dir) / worse.model_id / "report.json").read_text())
    assert report["meta"]["gate"].startswith("REJECT")
    fake.calls.clear()
    again = nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml")
    assert (again.exit_code, again.status, fake.calls) == (6, "already-done", [])
    assert Registry(cfg.nightly.registry_uri).production()["model_id"] == first.model_id


class Crash(BaseException):
    """An injected crash: a BaseException, so no `except Exception` in the job can absorb it."""


def _crash(*args, **kwargs):
    raise Crash()


def _crash_on_second_call(real):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Crash()
        return real(*args, **kwargs)
    return wrapped


# Every step of a night, in order. Each crash leaves production byte-identical, or (after the pointer
# write) fully on the new model; a re-run then finishes the night exactly as an uninterrupted one.
CRASH_POINTS = {
    "read": ("jobs.stages", "read_stage", lambda fake, real: _crash),
    "evaluate production": ("jobs.stages", "evaluate_stage", lambda fake, real: _crash),
    "train": ("jobs.stages", "train_stage", lambda fake, real: _crash),
    "evaluate candidate": ("jobs.stages", "evaluate_stage", lambda fake, real: _crash_on_second_call(real)),
    "export": ("jobs.stages", "export_stage", lambda fake, real: _crash),
    "report": ("jobs.stages", "write_report", lambda fake, real: _crash),
    "gate": ("jobs.nightly", "decide", lambda fake, real: _crash),
    "upload (after some files)": ("jobs.registry.Registry", "_put_file", lambda fake, real: _crash_on_second_call(real)),
    "manifest": ("jobs.registry.Registry", "publish", None),  # files uploaded, manifest write dies
    "verify download": ("jobs.registry.Registry", "fetch", lambda fake, real: _crash_on_second_call(real)),
    "verify load": ("jobs.nightly", "verify_loads", lambda fake, real: _crash),
    "pointer write": ("os", "replace", None),
    "night record": ("jobs.registry.Registry", "record_night", lambda fake, real: _crash),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_crash_at_any_stage_never_half_updates_production(point, tmp_path, tiny_bert_dir, texts, fake,
                                                            monkeypatch):
    import importlib
    import os

    import jobs.registry

    for i, day in enumerate(DAYS[:2]):
        _add_day(tmp_path / "corpus", day, texts[48 * i:48 * (i + 1)])
    cfg = _config(tmp_path, tiny_bert_dir)
    first = nightly.run_night(cfg, date(2024, 1, 1), "nightly.yaml")
    pointer_path = tmp_path / "registry" / POINTER
    before = pointer_path.read_bytes()
    fake.next_score = 21.0

    module, attr, make = CRASH_POINTS[point]
    if point == "manifest":
        real_write = jobs.registry.Registry.write_json

        def write_json(self, obj, *parts):
            if parts[-1] == jobs.registry.MANIFEST:
                raise Crash()
            return real_write(self, obj, *parts)
        monkeypatch.setattr(jobs.registry.Registry, "write_json", write_json)
    elif point == "pointer write":
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith(POINTER):
                raise Crash()
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    else:
        owner = (jobs.registry.Registry if module == "jobs.registry.Registry" else importlib.import_module(module))
        monkeypatch.setattr(owner, attr, make(fake, getattr(owner, attr)))

    with pytest.raises(Crash):
        nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml")
    monkeypatch.undo()
    fake.install(monkeypatch)  # undo removed the fakes too

    registry = Registry(cfg.nightly.registry_uri)
    if point == "night record":  # the pointer write had already happened: production is the new model, whole
        assert registry.production()["model_id"] != first.model_id
        registry.fetch(registry.production()["model_id"], tmp_path / "check")
    else:
        assert pointer_path.read_bytes() == before
    registry.fetch(registry.production()["model_id"], tmp_path / "check2")  # every checksum verifies

    rerun = nightly.run_night(cfg, date(2024, 1, 2), "nightly.yaml")
    assert rerun.exit_code == 0
    pointer = registry.production()
    # Every attempt at night 2 used one Ray Train run name (so a re-run resumes it), the promoted model's id.
    assert {c[2] for c in fake.calls if c[0] == "train"} - {first.model_id} <= {pointer["model_id"]}
    assert pointer["previous_model_id"] == first.model_id
    assert pointer["consumed_partitions"] == ["date=2024-01-01", "date=2024-01-02"]
    nightly.verify_loads(registry.fetch(pointer["model_id"], tmp_path / "check3") / "encoder", "cls")


# -- tier 3: three real nights on the local Ray cluster ------------------------------------------------------
@pytest.mark.ray
def test_three_nights_promote_hold_and_reject_a_regression(ray_local, tmp_path, tiny_bert_dir, texts):
    """Night 1 trains the base model and promotes; night 2 warm-starts from it and promotes (or holds)
    within the gate; night 3 is made to regress on purpose, with a learning rate of 5.0 that wrecks the
    encoder, and the gate keeps night 2's model in production."""
    registry = Registry(str(tmp_path / "registry"))
    gate = {"tolerance": 1.0, "max_task_drop": 2.0}
    results = []
    for i, day in enumerate(DAYS):
        _add_day(tmp_path / "corpus", day, texts[48 * i:48 * (i + 1)])
        train = {"max_steps": 3, "lr": 5.0 if i == 2 else 1e-4, "report_every": 1}
        cfg = _config(tmp_path, tiny_bert_dir, {"gate": gate, "replay_partitions": 1}, train=train)
        results.append(nightly.run_night(cfg, date.fromisoformat(day), "three-nights"))
        print(day, results[-1].status, results[-1].decision and results[-1].decision["delta"])
        if i < 2:
            assert results[-1].status == "promoted", results[-1].decision
            assert registry.production()["model_id"] == results[-1].model_id
    one, two, three = results
    assert (three.exit_code, three.status) == (6, "rejected"), three.decision
    assert three.decision["reasons"] and three.report["meta"]["gate"].startswith("REJECT")
    pointer = registry.production()
    assert pointer["model_id"] == two.model_id and pointer["previous_model_id"] == one.model_id
    assert pointer["consumed_partitions"] == [f"date={d}" for d in DAYS[:2]]  # night 3's day is retried
    lineage = registry.read_json("models", two.model_id, "lineage.json")
    assert lineage["parent"] == one.model_id and lineage["train"]["replicas_identical"]
    assert lineage["data"]["corpus"]["rows_kept"] == 96  # day 2 and day 1 replayed
    # production's score on night 3 is night 2's candidate score, re-measured: the same model, same suite
    assert three.report["before"]["tasks"]["STS16"]["all"] == pytest.approx(two.report["after"]["tasks"]["STS16"]["all"])


def test_a_second_submission_of_a_night_stops_naming_the_holder(tmp_path, tiny_bert_dir, texts, monkeypatch, caplog):
    """Before any training: the night's lease is held by another submission, so this one exits 0 with
    status "held", and neither Ray nor the registry is touched."""
    from jobs.lease import Lease

    caplog.set_level("INFO", logger="tsdae")
    _add_day(tmp_path / "corpus", DAYS[0], texts[:48])
    cfg = _config(tmp_path, tiny_bert_dir)
    seen = {}
    real_acquire = Lease.acquire

    def someone_else_holds_it(self):
        seen["uri"] = self.uri
        assert real_acquire(Lease(self.uri, "raysubmit_other@head:1:abc", ttl_s=600)) is None  # the other submission
        return real_acquire(self)

    monkeypatch.setattr(Lease, "acquire", someone_else_holds_it)
    monkeypatch.setattr(nightly.stages, "connect_ray", lambda *a: pytest.fail("a held night must not start Ray"))
    result = nightly.run_night(cfg, date.fromisoformat(DAYS[0]), "test")
    assert result.exit_code == 0 and result.status == "held"
    assert "is being run by raysubmit_other@head:1:abc" in caplog.text
    assert seen["uri"].startswith(str(tmp_path / "ray" / "leases"))
    assert not (tmp_path / "registry" / POINTER).exists()
