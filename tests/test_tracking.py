"""MLflow tracking against a real `mlflow server` (SQLite backend store, local artifact store): what a run
logs (pure), a run whose server dies mid-run and goes on (the Ray stages replaced by fakes, the live
callback driven as Ray Train's controller drives it), and (marked ray) a tiny real run whose params,
metrics, validation scores, STS table and files are read back through MlflowClient and compared with
report.json and metrics.jsonl."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import MlflowServer
from mlflow import MlflowClient
from test_validation_run import _tiny_run_config

from jobs import stages, tracking
from jobs.config import parse_config
from tsdae.eval import STS_TASKS, build_report
from tsdae.storage import OutputDir

ROOT = Path(__file__).resolve().parents[1]


# -- tier 1: pure ----------------------------------------------------------------------------------------
def test_the_config_becomes_flat_params():
    cfg = parse_config({"train": {"lr": 1e-4}, "read": {"uri": ["a.parquet", "b.parquet"]}})
    params = tracking.flatten_params(cfg.model_dump())
    assert params["train.lr"] == "0.0001" and params["scale.num_workers"] == "2"
    assert params["read.uri"] == '["a.parquet", "b.parquet"]' and params["model.pooling"] == "cls"
    assert params["nightly"] == "null" and params["train.max_steps"] == "null" and params["tracking.enabled"] == "true"


def _result(offset: float, tasks=STS_TASKS) -> dict:
    return {"tasks": {t: {"all": 70.0 + i + offset, "wmean": 69.0 + i + offset} for i, t in enumerate(tasks)},
            "avg7_all": 73.0 + offset, "avg7_wmean": 72.0 + offset}


def test_the_sts_table_becomes_metrics_for_every_side():
    production = _result(1.0)
    production["tasks"]["STS12"]["all"] = None  # an undefined score is left out, not logged as NaN
    after = _result(2.0)
    after["tasks"]["mine (v2)"] = {"all": 50.0, "wmean": 49.0}  # a custom set: the name is made a valid key
    report = build_report(_result(0.0), after, {}, production=production)
    metrics = tracking.report_metrics(report)
    assert metrics["sts_before/STS12"] == 70.0 and metrics["sts_after/STS12"] == 72.0
    assert metrics["sts_after/STS12.wmean"] == 71.0 and metrics["sts_delta/STS12"] == 2.0
    assert metrics["sts_after/avg7_all"] == 75.0 and metrics["sts_delta_production/avg7_wmean"] == 1.0
    assert "sts_production/STS12" not in metrics and metrics["sts_production/STS12.wmean"] == 70.0
    assert metrics["sts_after/mine _v2_"] == 50.0
    assert {k.split("/")[0] for k in metrics} == {f"sts_{s}" for s in tracking.REPORT_SIDES}


def test_exit_codes_map_to_run_statuses():
    assert [tracking.status_of(c) for c in (0, 6, 2, 4, 7, 143)] == ["FINISHED", "FINISHED", "FAILED", "FAILED",
                                                                   "FAILED", "KILLED"]


def test_tracking_off_logs_nothing_and_needs_no_server(tmp_path):
    off = tracking.start(parse_config({}).tracking, "run", {})
    assert not off.on and off.live_callbacks(str(tmp_path), "run") == []
    off.log_metrics({"x": 1.0})
    off.finish(0)
    unused = parse_config({"tracking": {"mlflow_uri": "http://127.0.0.1:9", "enabled": False}}).tracking
    assert not tracking.start(unused, "run", {}).on


# -- tier 2: a run whose server dies mid-run (stages faked, no Ray) --------------------------------------
def _metrics_row(step: int) -> dict:
    """One report of the train loop (tsdae.train.loop.Meter.report), as every rank reports it."""
    return {"step": step, "epoch": 0, "loss": 8.0 - step, "lr": 1e-3, "sentences_per_s": 10.0 + step,
            "tokens_per_s": 100.0 + step, "mfu": 0.01 * step, "world_size": 2, "stopped": False}


class DyingServerStages:
    """Stand-ins for jobs.stages' Ray stages. The train stage drives the live callbacks the way Ray Train's
    controller does (two workers' metrics per report): steps 1 and 2 while the server is up, then the
    server is stopped, then steps 3 and 4 and the final report."""

    def __init__(self, server: MlflowServer, tiny_bert_dir: str, tmp_path: Path):
        self.server, self.tiny, self.tmp = server, tiny_bert_dir, tmp_path
        self.live_before_stop: list[int] = []

    def read_stage(self, cfg):
        return {"rows_read": 64, "dropped_null": 0, "dropped_empty": 0, "rows_kept": 64}

    def evaluate_stage(self, label, model_ref, pooling, eval_cfg):
        score = 40.0 if label == "base model" else 45.0
        return {"tasks": {t: {"all": score, "wmean": score} for t in eval_cfg.tasks}, "avg7_all": None,
                "avg7_wmean": None}

    def train_stage(self, cfg, rows, run_name, callbacks):
        (live,) = callbacks
        for step in (1, 2):
            live.after_report(None, [_metrics_row(step)] * 2, None)
        client = MlflowClient(self.server.uri)
        for _ in range(100):  # the sender thread logs in the background: wait for it (bounded), not for a time
            self.live_before_stop = [m.step for m in client.get_metric_history(live.run_id, "loss")]
            if len(self.live_before_stop) == 2:
                break
            time.sleep(0.1)
        self.server.stop()
        for step in (3, 4):
            live.after_report(None, [_metrics_row(step)] * 2, None)
        live.after_report(None, [{"step": 4, "final": True}] * 2, None)  # waits for the queue, then returns
        ckpt = self.tmp / "ckpt"
        (ckpt / "encoder").mkdir(parents=True)
        return SimpleNamespace(checkpoint=SimpleNamespace(path=str(ckpt)), error=None, metrics={"step": 4},
                               path=str(self.tmp / "no-validation"), filesystem=None)

    def export_stage(self, result, selected, out_dir, cfg):
        import shutil

        for item in ("encoder", "decoder"):
            shutil.copytree(self.tiny, out_dir / item)
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(_metrics_row(s)) + "\n" for s in (1, 2, 3, 4)))
        summary = {"steps": 4, "world_size": 2, "rows_trained_per_rank": [16, 16], "replicas_identical": True}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary


def test_a_server_that_dies_mid_run_is_logged_once_and_the_run_goes_on(tiny_bert_dir, tmp_path, monkeypatch,
                                                                       caplog):
    server = MlflowServer(tmp_path / "mlflow")
    fake = DyingServerStages(server, tiny_bert_dir, tmp_path)
    for name in ("read_stage", "evaluate_stage", "train_stage", "export_stage"):
        monkeypatch.setattr(stages, name, getattr(fake, name))
    cfg = parse_config({
        "output_dir": str(tmp_path / "runs"), "storage_path": str(tmp_path / "ray"),
        "model": {"name_or_path": tiny_bert_dir},
        "eval": {"sts_dir": str(ROOT / "data/sts"), "tasks": ["STS16"], "validation_task": None},
        "tracking": {"mlflow_uri": server.uri, "experiment": "dies-mid-run"},
    })
    out = tmp_path / "runs" / "dies-1"
    out.mkdir(parents=True)
    try:
        tracker = tracking.start(cfg.tracking, "dies-1", tracking.run_tags(cfg, "test"))
        assert tracker.on
        with caplog.at_level(logging.WARNING, logger="tsdae"):
            report = stages.run_all(cfg, "dies-1", OutputDir(str(out)), config_label="test", tracker=tracker)
            tracker.finish(0)
    finally:
        server.stop()
    assert fake.live_before_stop == [1, 2]  # logged live, from the controller's side, before the server died
    assert report["after"]["tasks"]["STS16"]["all"] == 45.0 and (out / "report.json").exists()
    assert (out / "config.yaml").exists() and not tracker.on
    driver_warnings = [r for r in caplog.records if "MLflow tracking failed" in r.getMessage()]
    live_warnings = [r for r in caplog.records if "MLflow live metrics failed" in r.getMessage()]
    assert len(driver_warnings) == 1 and len(live_warnings) == 1, [r.getMessage() for r in caplog.records]


# -- tier 3: a real run on the local Ray cluster -----------------------------------------------------------
@pytest.mark.ray
def test_a_run_logs_params_metrics_validation_and_files(ray_local, mlflow_server, tiny_bert_dir, tmp_path,
                                                       monkeypatch):
    """6 steps, a report every 2, checkpoints at 3 and 6, each validated: the MLflow run has the config,
    rank 0's metrics at steps 2, 3, 4, 6 (logged live, while training ran), the two validation scores, the
    STS table of report.json and the run's files."""
    ray_local.data.DataContext.get_current().enable_progress_bars = False
    cfg = _tiny_run_config(tmp_path, tiny_bert_dir, "tracked", 3,
                           tracking={"mlflow_uri": mlflow_server.uri, "experiment": "tracked-run"})
    trained_at = []
    train_stage = stages.train_stage
    monkeypatch.setattr(stages, "train_stage", lambda *a: (train_stage(*a), trained_at.append(time.time()))[0])
    out = tmp_path / "runs" / "tracked-1"
    out.mkdir(parents=True)
    tracker = tracking.start(cfg.tracking, "tracked-1", tracking.run_tags(cfg, "test.yaml"))
    report = stages.run_all(cfg, "tracked-1", OutputDir(str(out)), config_label="test.yaml", tracker=tracker)
    tracker.finish(0)

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked-run").experiment_id])
    assert run.info.run_name == "tracked-1" and run.info.status == "FINISHED"
    params, tags, run_id = run.data.params, run.data.tags, run.info.run_id
    assert params["train.lr"] == "0.001" and params["scale.num_workers"] == "2" and params["train.max_steps"] == "6"
    assert params["read.uri"] == str(tmp_path / "corpus.parquet") and params["tracking.experiment"] == "tracked-run"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit and tags["ray.job_id"]
    assert tags["tsdae.corpus"] == str(tmp_path / "corpus.parquet") and tags["tsdae.parent_model"] == tiny_bert_dir
    assert tags["tsdae.config"] == "test.yaml" and tags["tsdae.run_name"] == "tracked-1"

    # Rank 0's metrics at every report step, equal to metrics.jsonl, all logged before training returned.
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [2, 3, 4, 6]
    for key in tracking.TRAIN_METRICS:
        logged = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in logged] == [(r["step"], pytest.approx(r[key])) for r in history], key
    (trained,) = trained_at
    assert max(m.timestamp for m in client.get_metric_history(run_id, "loss")) <= trained * 1000

    # Every validation score at its step, equal to report.json's.
    validation = json.loads((out / "report.json").read_text())["validation"]
    assert [r["val_step"] for r in validation] == [3, 6]
    logged = sorted(client.get_metric_history(run_id, "val_spearman"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in logged] == [(r["val_step"], pytest.approx(r["val_spearman"])) for r in validation]

    # The STS table and the run totals.
    metrics = run.data.metrics
    for side in ("before", "after", "delta"):
        assert metrics[f"sts_{side}/STSB-dev"] == pytest.approx(report[side]["tasks"]["STSB-dev"]["all"])
    assert metrics["run/steps"] == 6 and metrics["corpus/rows_kept"] == 64

    # The files: report, charts, resolved config, records and the encoder; report.json round-trips.
    names = {f.path for f in client.list_artifacts(run_id)}
    assert names == {"config.yaml", "report.md", "report.json", "sts_tasks.png", "loss.png", "dev_over_steps.png",
                     "metrics.jsonl", "summary.json", "encoder"}
    assert {f.path for f in client.list_artifacts(run_id, "encoder")} >= {"encoder/config.json", "encoder/model.safetensors"}
    local = client.download_artifacts(run_id, "report.json", str(tmp_path / "download"))
    assert json.loads(Path(local).read_text()) == json.loads((out / "report.json").read_text())
