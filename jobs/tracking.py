"""MLflow tracking of a run (the optional extra ``tsdae-ray[mlflow]``): what a run logs, from where, and
why a tracking failure never fails training.

One MLflow run per Ray Train run, with the same name, in ``tracking.experiment`` on
``tracking.mlflow_uri`` (else MLFLOW_TRACKING_URI); a resumed run or a re-submitted night continues its
MLflow run. It logs:

    params     the resolved run config, flattened: train.lr, scale.num_workers, … (lists as JSON)
    tags       mlflow.source.git.commit, tsdae.git_dirty, ray.job_id, ray.submission_id (a submitted job),
               tsdae.run_name, tsdae.config, tsdae.corpus (the corpus URI; a night: its partitions),
               tsdae.parent_model (the base model; a night: the production model it started from);
               a night adds tsdae.model_id, tsdae.gate, tsdae.night_status, tsdae.registry_version
    metrics    per report step, rank 0's (already summed over the ranks): loss, lr, sentences_per_s,
               tokens_per_s, mfu, epoch; per validation, at its step: val_spearman, val_spearman_wmean,
               val_seconds; the STS table: sts_<before|after|production|delta|delta_production>/<task>
               (``all``), …/<task>.wmean and …/avg7_all, …/avg7_wmean; run/ and corpus/ totals; a
               night's gate/
    artifacts  config.yaml (the resolved config), report.md, report.json, the charts, metrics.jsonl,
               summary.json, lineage.json (a night), encoder/ (tracking.log_model)

The training metrics are logged live by a Ray Train ``UserCallback`` on the controller (``LiveMetrics``),
not by the workers: the controller already receives every rank's report, it is one process per run (one
client; GPU workers need no route or credentials to the server), and since the callback only queues and
a thread sends, a slow or dead server never holds up a training step. The driver logs the rest, and
after training it reconciles: a report step or a validation that the live path missed (the server was
down, the controller restarted) is logged from the run's own records (metrics.jsonl,
``tsdae_validation/``), so a finished MLflow run matches metrics.jsonl and report.json.

Failures: every call is best-effort. The first failure is logged once, as a warning, and tracking stops
for the rest of that process; the run goes on. A server that does not answer ``/health`` within
HEALTH_TIMEOUT_S counts as failed at once, instead of after MLflow's client retries (7, with backoff:
minutes).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train

from jobs.config import RunConfig, TrackingConfig
from jobs.lineage import git_info
from jobs.stop import run_uri
from tsdae.train import load_validation_history

log = logging.getLogger("tsdae")

TRAIN_METRICS = ("loss", "lr", "sentences_per_s", "tokens_per_s", "mfu", "epoch")
VALIDATION_METRICS = ("val_spearman", "val_spearman_wmean", "val_seconds")
REPORT_SIDES = ("before", "after", "production", "delta", "delta_production")
TAG_RUN_NAME = "tsdae.run_name"
HEALTH_TIMEOUT_S = 5
FLUSH_TIMEOUT_S = 30  # how long the final report waits for the live metrics still queued
MAX_TAG_CHARS = 5000
# Exit codes that mean the run itself succeeded: done, or a candidate the gate rejected.
FINISHED_EXITS = (0, 6)


# -- pure: what is logged --------------------------------------------------------------------------------
def flatten_params(data: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: {"train.lr": "3e-05", "read.uri": '["a", "b"]', …}; strings as
    they are, everything else as JSON (null, true, numbers, lists)."""
    params = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            params.update(flatten_params(value, f"{name}."))
        else:
            params[name] = value if isinstance(value, str) else json.dumps(value)
    return params


def metric_key(name: str) -> str:
    """name with the characters MLflow refuses in a metric key (custom STS set names) replaced by _."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def report_metrics(report: dict) -> dict[str, float]:
    """The report's STS table as metrics: ``sts_<side>/<task>`` (``all``), ``sts_<side>/<task>.wmean`` and
    ``sts_<side>/avg7_all`` / ``avg7_wmean``, for each side the report has (before, after, production and
    the deltas after − before, candidate − production). Undefined scores are left out."""
    metrics = {}
    for side in REPORT_SIDES:
        result = report.get(side)
        if result is None:
            continue
        for task, scores in result["tasks"].items():
            for agg, suffix in (("all", ""), ("wmean", ".wmean")):
                if scores.get(agg) is not None:
                    metrics[metric_key(f"sts_{side}/{task}{suffix}")] = float(scores[agg])
        for avg in ("avg7_all", "avg7_wmean"):
            if result.get(avg) is not None:
                metrics[f"sts_{side}/{avg}"] = float(result[avg])
    return metrics


def run_metrics(meta: dict) -> dict[str, float]:
    """A report's run totals as metrics: run/train_seconds, run/sentences_per_s, run/wall_seconds, the
    training steps, and the corpus counts (corpus/rows_kept, …)."""
    train = meta.get("train") or {}
    metrics = {f"run/{k}": train.get(v) for k, v in (("train_seconds", "seconds"), ("sentences_per_s", "sentences_per_s"),
                                                      ("steps", "steps"), ("sentences", "sentences"))}
    metrics["run/wall_seconds"] = meta.get("wall_seconds")
    metrics.update({f"corpus/{k}": v for k, v in (meta.get("corpus") or {}).items()})
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_tags(cfg: RunConfig, config_label: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The tags every run carries: the code's commit, the Ray job, the config, the corpus and the model it
    started from; extra (a night's) replace or add to them."""
    git = git_info()
    tags = {"tsdae.config": config_label, "tsdae.corpus": cfg.read.uri if isinstance(cfg.read.uri, str)
            else json.dumps(cfg.read.uri), "tsdae.parent_model": cfg.model.name_or_path}
    if git["commit"]:
        tags["mlflow.source.git.commit"] = git["commit"]  # MLflow's own tag: the UI shows it
        tags["tsdae.git_dirty"] = json.dumps(git["dirty"])
    if ray.is_initialized():
        tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    # A job started by `ray job submit` gets its submission id in the job config Ray hands its driver.
    submission = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
    if submission.get("job_submission_id"):
        tags["ray.submission_id"] = submission["job_submission_id"]
    tags.update(extra or {})
    return {k: v[:MAX_TAG_CHARS] for k, v in tags.items()}


def status_of(exit_code: int) -> str:
    """The MLflow run status for a job's exit code."""
    if exit_code in FINISHED_EXITS:
        return "FINISHED"
    return "KILLED" if exit_code == 143 else "FAILED"


# -- the server --------------------------------------------------------------------------------------------
def server_problem(uri: str) -> str | None:
    """Why the tracking server at uri cannot be used now, or None when it answers (http(s) servers are
    asked for /health; other URIs, a local sqlite or file store, are taken as they are)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as answer:
            return None if answer.status == 200 else f"{uri}/health answered {answer.status}"
    except OSError as e:  # refused, timed out, unknown host
        return f"{uri} does not answer: {e}"


def _client(uri: str):
    from mlflow import MlflowClient  # mlflow is an optional extra: imported only where tracking is on

    return MlflowClient(tracking_uri=uri)


def _metrics(values: dict[str, float], step: int):
    from mlflow.entities import Metric  # optional extra, as above

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, int(step)) for key, value in values.items()]


def _log_metrics(client, run_id: str, metrics: list) -> None:
    for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


# -- the driver's side -------------------------------------------------------------------------------------
class Tracker:
    """One MLflow run, written best-effort from the driver. ``Tracker()`` (tracking off) does nothing."""

    def __init__(self, client=None, uri: str | None = None, run_id: str | None = None, log_model: bool = False):
        self._client, self.uri, self.run_id, self.log_model = client, uri, run_id, log_model

    @property
    def on(self) -> bool:
        return self._client is not None

    def _failed(self, what: str, error: Exception | str) -> None:
        log.warning("MLflow tracking failed (%s); the run goes on without it: %s", what, error)
        self._client = None

    def _call(self, what: str, fn, *args) -> None:
        """fn(client, run_id, *args), best-effort: a server that does not answer or any error stops tracking
        in this process after one warning."""
        if self._client is None:
            return
        problem = server_problem(self.uri)
        if problem:
            self._failed(what, problem)
            return
        try:
            fn(self._client, self.run_id, *args)
        except Exception as e:  # tracking never fails the run
            self._failed(what, e)

    def log_config(self, cfg: RunConfig) -> None:
        """The resolved config as params. A continued run keeps the params it has (MLflow refuses to change
        one); the keys whose value differs are named once."""
        def send(client, run_id, params):
            existing = client.get_run(run_id).data.params
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            if changed:
                log.warning("MLflow run %s keeps its first values of %s", run_id, changed)
            from mlflow.entities import Param  # optional extra

            new = [Param(k, v) for k, v in params.items() if k not in existing]
            for i in range(0, len(new), 100):  # MLflow's limit per batch
                client.log_batch(run_id, params=new[i:i + 100])
        self._call("params", send, flatten_params(cfg.model_dump()))

    def set_tags(self, tags: dict[str, str]) -> None:
        def send(client, run_id, tags):
            from mlflow.entities import RunTag  # optional extra

            client.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()])
        self._call("tags", send, tags)

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        self._call("metrics", lambda client, run_id: _log_metrics(client, run_id, _metrics(values, step)))

    def live_callbacks(self, storage_path: str, run_name: str) -> list:
        """The Ray Train callbacks that log the training metrics live (none when tracking is off)."""
        return [LiveMetrics(self.uri, self.run_id, run_uri(storage_path, run_name))] if self.on else []

    def log_training(self, history: list[dict], validation: list[dict]) -> None:
        """After training: every report step of metrics.jsonl (history) and every validation record that the
        MLflow run does not have yet, at their steps."""
        def send(client, run_id):
            have = {m.step for m in client.get_metric_history(run_id, "loss")}
            metrics = [m for row in history if row["step"] not in have
                       for m in _metrics({k: row[k] for k in TRAIN_METRICS if k in row}, row["step"])]
            have_val = {m.step for m in client.get_metric_history(run_id, VALIDATION_METRICS[0])}
            metrics += [m for r in validation if r.get("val_step") is not None and r["val_step"] not in have_val
                        for m in _metrics({k: r[k] for k in VALIDATION_METRICS if r.get(k) is not None}, r["val_step"])]
            _log_metrics(client, run_id, metrics)
        self._call("training metrics", send)

    def log_files(self, paths: list[Path], directories: dict[str, Path] | None = None) -> None:
        """Upload files (to the run's artifact root) and folders ({artifact path: local folder})."""
        def send(client, run_id):
            for path in paths:
                if Path(path).is_file():
                    client.log_artifact(run_id, str(path))
            for name, folder in (directories or {}).items():
                client.log_artifacts(run_id, str(folder), name)
        self._call("artifacts", send)

    def log_report(self, report: dict, files: list[Path], encoder_dir: Path) -> None:
        """The STS table and the run totals as metrics; the report's files, and encoder/ with log_model."""
        self.log_metrics({**report_metrics(report), **run_metrics(report["meta"])})
        self.log_files(files, {"encoder": encoder_dir} if self.log_model else None)

    def finish(self, exit_code: int) -> None:
        """End the run with the status of the job's exit code (FINISHED, FAILED or KILLED)."""
        self._call("end", lambda client, run_id: client.set_terminated(run_id, status_of(exit_code)))


def start(cfg: TrackingConfig, run_name: str, tags: dict[str, str]) -> Tracker:
    """The Tracker of run_name: the MLflow run that an earlier attempt of the same run started (a resumed
    run, a re-submitted night), else a new one, in cfg.experiment. Tracking off, or a server that fails,
    gives a Tracker that does nothing (after one warning)."""
    if not cfg.active():
        return Tracker()
    uri = cfg.server()
    problem = server_problem(uri)
    if problem:
        log.warning("MLflow tracking is off for this run: %s", problem)
        return Tracker()
    try:
        client = _client(uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
        earlier = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_RUN_NAME}` = '{run_name}'",
                                     max_results=1) if "'" not in run_name else []
        if earlier:
            run_id = earlier[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, run_name=run_name, tags={TAG_RUN_NAME: run_name}).info.run_id
    except Exception as e:  # tracking never fails the run
        log.warning("MLflow tracking is off for this run: %s", e)
        return Tracker()
    log.info("MLflow run %s (%s): %s/#/experiments/%s/runs/%s", run_name, "continued" if earlier else "new",
             uri.rstrip("/"), experiment_id, run_id)
    tracker = Tracker(client, uri, run_id, cfg.log_model)
    tracker.set_tags(tags)
    return tracker


# -- the Ray Train controller's side -----------------------------------------------------------------------
class LiveMetrics(ray.train.UserCallback):
    """Ray Train callback, run on the controller: rank 0's metrics of every report, and every validation
    record that appears under the run's storage (run_path/tsdae_validation/), go to the MLflow run.

    after_report only puts the metrics in a queue; a daemon thread sends them, so the controller, and the
    workers waiting for it to collect their next report, never wait for the server. The final (or stop)
    report waits up to FLUSH_TIMEOUT_S for the queue to empty. A failure is logged once and the thread
    then drops what comes; the driver logs what was missed from the run's records after training.
    """

    def __init__(self, uri: str, run_id: str, run_path: str):
        self.uri, self.run_id, self.run_path = uri, run_id, run_path
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_queue": None, "_thread": None}  # the controller starts its own thread

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        rank0 = metrics[0] if metrics else {}
        if self._queue is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._send, name="tsdae-mlflow", daemon=True)
            self._thread.start()
        if not rank0.get("final") and "loss" in rank0:
            self._queue.put((rank0["step"], {k: rank0[k] for k in TRAIN_METRICS if k in rank0}))
        if rank0.get("final") or rank0.get("stopped"):
            self._queue.put(None)
            self._thread.join(FLUSH_TIMEOUT_S)

    def _send(self) -> None:
        client, validated, failed = None, set(), False
        fs, run_path = pafs.FileSystem.from_uri(self.run_path)
        while (item := self._queue.get()) is not None:
            if failed:
                continue
            try:
                problem = server_problem(self.uri)
                if problem:
                    raise ConnectionError(problem)
                if client is None:
                    client = _client(self.uri)
                    validated = {m.step for m in client.get_metric_history(self.run_id, VALIDATION_METRICS[0])}
                step, values = item
                metrics = _metrics(values, step)
                for record in load_validation_history(run_path, fs):
                    if record.get("val_step") is not None and record["val_step"] not in validated:
                        metrics += _metrics({k: record[k] for k in VALIDATION_METRICS if record.get(k) is not None},
                                            record["val_step"])
                        validated.add(record["val_step"])
                _log_metrics(client, self.run_id, metrics)
            except Exception as e:  # tracking never fails training
                log.warning("MLflow live metrics failed; training goes on, the driver logs the run's records "
                            "at the end: %s", e)
                failed = True
