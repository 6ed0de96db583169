"""Nightly retraining: train on the new partitions, warm-started from production; promote if not worse.

    python -m jobs.nightly --config configs/nightly.yaml [--through 2024-05-31]
    ray job submit --runtime-env deploy/runtime_env.yaml -- python -m jobs.nightly --config configs/nightly.yaml

One night: find the partitions `<read.uri>/date=YYYY-MM-DD/` dated up to --through (default yesterday,
UTC) that production has not trained on → warm-start from production (the config's model on the first
night) → read, evaluate production, train, evaluate the candidate (jobs.stages.run_all) → regression gate
→ publish the model with its lineage, verify it, and only then move the production pointer
(jobs.registry).

A night is identified by an idempotency key over its inputs (new and replayed partitions with their
file sizes, the parent model, the config). The Ray Train run name contains it, so re-submitting a night
that failed resumes its run from the last checkpoint; a night that finished (promoted or rejected) is
recorded in the registry and re-submitting it does nothing and exits with the same code.

The night's outputs (report, charts, encoder/, decoder/, metrics, summary, lineage.json) go to
`<output_dir>/<model id>/`, a local folder or a bucket; the job logs the URI of each.

Exit codes: 0 promoted, nothing new, or this night already promoted; 2 bad config; 3 bad data;
4 training failed; 5 evaluation failed; 6 the gate rejected the candidate; 7 publishing or verifying the
model failed; 8 storage failure. Production is unchanged on every non-zero exit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import ray

from jobs import stages, tracking
from jobs.config import OVERRIDES_HELP, ConfigError
from jobs.exits import EXIT_GATE, EXIT_OK, EXIT_PROMOTE
from jobs.gate import decide, gated_tasks, summarize
from jobs.lease import Lease, holder_name
from jobs.lineage import build_lineage, git_info, package_versions
from jobs.registry import MANIFEST, RegistryError, open_registry
from jobs.stages import start_job
from pipeline import CorpusError, Partition, list_partitions
from tsdae.eval import SentenceEncoder, render_markdown, write_report
from tsdae.storage import OutputDir, StorageError, is_local, storage_failures

log = logging.getLogger("tsdae")


# -- data: hive date partitions ---------------------------------------------------------------------------
def list_days(root_uri: str, key: str) -> list[Partition]:
    """The corpus stage's partitions ``<key>=YYYY-MM-DD`` under root_uri (pipeline.list_partitions), oldest
    first; one whose value is not a date is skipped with a warning. Raises CorpusError if root_uri does
    not exist."""
    days = []
    for p in list_partitions(root_uri, key):
        try:
            date.fromisoformat(p.value)
        except ValueError:
            log.warning("skipping partition %s: %r is not a YYYY-MM-DD date", p.name, p.value)
            continue
        days.append(p)
    return days


def select_partitions(partitions: list[Partition], consumed: set[str], through: date, replay: int,
                      replay_seed: int) -> tuple[list[Partition], list[Partition]]:
    """(new, replayed): the partitions dated ≤ through that production has not trained on, and `replay`
    of those it has, drawn from np.random.default_rng((replay_seed, night)) so a re-run draws the same."""
    new = [p for p in partitions if date.fromisoformat(p.value) <= through and p.name not in consumed]
    seen = [p for p in partitions if p.name in consumed]
    if not new or not replay or not seen:
        return new, []
    rng = np.random.default_rng((replay_seed, through.toordinal()))
    picked = sorted(rng.choice(len(seen), size=min(replay, len(seen)), replace=False))
    return new, [seen[i] for i in picked]


def partition_record(p: Partition) -> dict:
    """A partition for the lineage: files with sizes and the row count from the parquet footers."""
    fs, base = fsspec.core.url_to_fs(p.uri)
    rows = 0
    for rel, _ in p.files:
        with fs.open(f"{base.rstrip('/')}/{rel}", "rb") as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    return {"name": p.name, "uri": p.uri, "files": [{"path": rel, "size": size} for rel, size in p.files],
            "rows": rows}


def idempotency_key(parent: str | None, new: list[Partition], replay: list[Partition], cfg) -> str:
    """sha256 over everything that decides what a night trains: same inputs → same key → same run."""
    payload = {
        "parent": parent,
        "new": [(p.name, p.files) for p in new],
        "replay": [(p.name, p.files) for p in replay],
        "config": cfg.model_dump(exclude={"tracking"}),  # where a night is logged does not change what it trains
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# -- model ----------------------------------------------------------------------------------------------
def warm_start(model_cfg, model_uri: str):
    """The model config that starts from a registry model (encoder/, decoder/) at model_uri, a URI or shared
    path that every worker and actor fetches itself (tsdae.model_cache), checked against its manifest."""
    if model_cfg.tie_decoder:
        return model_cfg.replace(name_or_path=f"{model_uri}/encoder")
    return model_cfg.replace(name_or_path=f"{model_uri}/encoder", decoder_name_or_path=f"{model_uri}/decoder")


def warm_start_uri(registry, model_id: str, local: Path, storage_path: str) -> str:
    """Where every node can fetch a registry model from, given its verified local copy (on the driver's
    disk, so never that): the registry's own folder when it is storage (a bucket, or a local registry on a
    shared path: jobs.stages.check_cluster_storage), else (MLflow, whose artifacts fsspec cannot read) a
    copy under ``<storage_path>/warm-start/<model_id>/``, its MANIFEST.json written last."""
    source = registry.model_source(model_id)
    if source is not None:
        return source
    uri = f"{storage_path.rstrip('/')}/warm-start/{model_id}"
    fs, root = fsspec.core.url_to_fs(uri)
    if is_local(fs):
        uri = root  # absolute: a relative path would be resolved against each worker's working directory
    manifest = (local / MANIFEST).read_bytes()
    try:
        if fs.cat_file(f"{root}/{MANIFEST}") == manifest:
            return uri
    except FileNotFoundError:
        pass
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST)
    for path in files:
        remote = f"{root}/{path.relative_to(local).as_posix()}"
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), remote)
    fs.pipe_file(f"{root}/{MANIFEST}", manifest)
    return uri


def verify_loads(encoder_dir: Path, pooling: str) -> None:
    """Load the encoder the way evaluation does and embed two sentences; raise if anything is off."""
    emb = np.asarray(SentenceEncoder(str(encoder_dir), pooling).encode(["A man is playing a guitar.",
                                                                         "Nightly verification."]))
    if emb.ndim != 2 or emb.shape[0] != 2 or not np.isfinite(emb).all():
        raise ValueError(f"{encoder_dir}: embeddings of shape {emb.shape} are not finite 2 × H")


# -- one night ------------------------------------------------------------------------------------------
@dataclass
class NightResult:
    exit_code: int
    status: str  # promoted | rejected | nothing-new | already-done | held | failed
    model_id: str | None = None
    report: dict | None = None
    decision: dict | None = None


def run_night(cfg, through: date, config_label: str, git_commit: str | None = None) -> NightResult:
    """One night of retraining (see the module docstring). Joins Ray only if there is work to do."""
    nightly = cfg.nightly
    registry = open_registry(nightly.registry_uri, cfg.tracking.server())

    # 1. Data: what is new since the production model.
    stages.announce("find new data")
    try:
        production = registry.production()
    except StorageError as e:
        log.error("%s", e)
        return NightResult(stages.EXIT_STORAGE, "failed")
    parent = production["model_id"] if production else None
    consumed = set(production["consumed_partitions"]) if production else set()
    try:
        partitions = list_days(cfg.read.uri, nightly.partition_key)
    except CorpusError as e:
        log.error("bad data: %s", e)
        return NightResult(stages.EXIT_DATA, "failed")
    except StorageError as e:
        log.error("%s", e)
        return NightResult(stages.EXIT_STORAGE, "failed")
    new, replay = select_partitions(partitions, consumed, through, nightly.replay_partitions, nightly.replay_seed)
    log.info("production: %s; %d partitions, %d new through %s: %s; replay: %s", parent or "none (first night)",
             len(partitions), len(new), through, [p.name for p in new], [p.name for p in replay])
    if not new:
        log.info("nothing new through %s: production has trained on every partition", through)
        return NightResult(EXIT_OK, "nothing-new", parent)
    key = idempotency_key(parent, new, replay, cfg)
    model_id = f"{cfg.name}-{through:%Y%m%d}-{key[:10]}"  # also the Ray Train run name
    # One submission of a night at a time (jobs.lease): another one stops here, naming the holder.
    lease = Lease(f"{cfg.storage_path.rstrip('/')}/leases/{model_id}.json", holder_name(), nightly.lease_ttl_s)
    try:
        with storage_failures(lease.uri):
            held = lease.acquire()
    except StorageError as e:
        log.error("%s; production stays %s", e, parent or "empty")
        return NightResult(stages.EXIT_STORAGE, "failed")
    if held is not None:
        log.info("night %s is being run by %s (lease until %s UTC); this submission stops", model_id, held["holder"],
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(held["expires_at"])))
        return NightResult(EXIT_OK, "held", model_id)
    try:
        with lease.renewing():
            done = registry.night(key)
            if done is not None:
                log.info("night %s already ran (key %s): %s; nothing to do", model_id, key[:10], done["status"])
                return NightResult(done["exit_code"], "already-done", done.get("model_id"),
                                   decision=done.get("decision"))
            with OutputDir(cfg.run_output(model_id)) as out:
                try:
                    return train_night(cfg, registry, out, parent, consumed, new, replay, key, model_id, through,
                                       config_label, git_commit)
                finally:
                    stages.log_outputs(out)
    finally:
        lease.release()


def train_night(cfg, registry, out: OutputDir, parent, consumed, new, replay, key, model_id, through, config_label,
                git_commit) -> NightResult:
    """Steps 2-5 of a night, under its lease: warm start, train and evaluate, gate, promote. out: the
    night's output folder; the registry publishes from its local copy, in this process."""
    nightly = cfg.nightly

    # 2. Warm start: production's model, checksum-verified here before anything starts, else the config's
    # base model. The workers get its URI, never this driver's copy (they may run on other machines).
    stages.announce("warm start")
    model_cfg = cfg.model
    if parent is not None:
        try:
            local = registry.fetch(parent, Path(nightly.cache_dir) / parent)
            model_cfg = warm_start(cfg.model, warm_start_uri(registry, parent, local, cfg.storage_path))
        except (RegistryError, OSError) as e:
            log.error("cannot fetch production model %s: %s", parent, e)
            return NightResult(EXIT_PROMOTE, "failed")
    log.info("warm start from %s (%s)", parent or cfg.model.name_or_path, model_cfg.name_or_path)
    run_cfg = cfg.replace(model=model_cfg.model_dump(), read=cfg.read.replace(uri=[p.uri for p in new + replay]).model_dump())

    # 3. Read, evaluate production, train, evaluate the candidate, export; tracked as one MLflow run.
    out_dir = out.local
    if not ray.is_initialized():
        stages.connect_ray(cfg.ray_address, cfg.scale.local_num_cpus)
    tracker = tracking.start(cfg.tracking, model_id, tracking.run_tags(run_cfg, config_label, {
        "tsdae.model_id": model_id, "tsdae.parent_model": parent or cfg.model.name_or_path,
        "tsdae.through": through.isoformat(), "tsdae.corpus": json.dumps([p.name for p in new]),
        "tsdae.replay": json.dumps([p.name for p in replay]), "tsdae.idempotency_key": key}))

    def finish(result: NightResult) -> NightResult:
        tracker.set_tags({"tsdae.night_status": result.status})
        tracker.finish(result.exit_code)
        return result

    try:
        report = stages.run_all(run_cfg, model_id, out, config_label=config_label, tracker=tracker)
    except stages.StageError as e:
        log.error("%s", e)
        return finish(NightResult(e.exit_code, "failed", model_id))

    # 4. Gate; the decision and the lineage go into the report and beside the model.
    stages.announce("regression gate")
    decision = decide(report["before"], report["after"], nightly.gate)
    log.info("gate: %s", summarize(decision))
    lineage = build_lineage(
        model_id=model_id, parent=parent, base_model=cfg.model.name_or_path, through=through.isoformat(),
        key=key, partitions=[partition_record(p) for p in new], replay=[partition_record(p) for p in replay],
        consumed=sorted(consumed | {p.name for p in new}), cfg=run_cfg, config_label=config_label,
        report=report, decision=decision, git=git_info(git_commit), versions=package_versions(),
        mlflow_run_id=tracker.run_id if tracker.on else None,
    )
    report["meta"].update({"model_id": model_id, "parent_model": parent or cfg.model.name_or_path,
                           "gate": summarize(decision), "gate_decision": decision})
    paths = write_report(report, str(out_dir))
    (out_dir / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    try:
        stages.publish_outputs(out, *(Path(p).name for p in paths.values()), "lineage.json")
    except stages.StageError as e:
        log.error("%s; production stays %s", e, parent or "empty")
        return finish(NightResult(e.exit_code, "failed", model_id, report, decision))
    tracker.set_tags({"tsdae.gate": "PROMOTE" if decision["promote"] else "REJECT"})
    tracker.log_metrics({f"gate/{k}": v for k, v in (("production_avg", decision["production"]["avg"]),
                         ("candidate_avg", decision["candidate"]["avg"]), ("delta_avg", decision["delta"]["avg"]))
                         if v is not None})
    tracker.log_files([*map(Path, paths.values()), out_dir / "lineage.json"])
    night = {"model_id": model_id, "through": through.isoformat(), "parent": parent, "decision": decision}
    if not decision["promote"]:
        registry.record_night(key, {**night, "status": "rejected", "exit_code": EXIT_GATE})
        log.info("production stays %s", parent or "empty")
        return finish(NightResult(EXIT_GATE, "rejected", model_id, report, decision))

    # 5. Promote: publish every file, fetch it back and load it, then move the pointer (the last write).
    try:
        stages.announce("publish")
        registry.publish(model_id, out_dir)
        stages.announce("verify")
        local = registry.fetch(model_id, Path(nightly.cache_dir) / model_id)
        verify_loads(local / "encoder", cfg.model.pooling)
        stages.announce("promote")
        pointer = registry.promote(model_id, expected_current=parent,
                                   consumed_partitions=lineage["data"]["consumed_partitions"],
                                   through=through.isoformat(), gate=decision["candidate"])
    except Exception as e:  # storage errors, a checksum mismatch, a model that does not load
        log.error("promotion of %s failed, production stays %s: %s", model_id, parent or "empty", e)
        return finish(NightResult(EXIT_PROMOTE, "failed", model_id, report, decision))
    registry.record_night(key, {**night, "status": "promoted", "exit_code": EXIT_OK})
    tracker.set_tags({"tsdae.registry": registry.uri, **({"tsdae.registry_version": pointer["version"]}
                                                         if "version" in pointer else {})})
    return finish(NightResult(EXIT_OK, "promoted", model_id, report, decision))


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML with a nightly: section (configs/nightly.yaml)")
    p.add_argument("--through", type=date.fromisoformat,
                   help="train on partitions dated up to this day, YYYY-MM-DD (default: yesterday, UTC)")
    p.add_argument("--git-commit", help="the commit being run, for the lineage (default: TSDAE_GIT_COMMIT or git)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    return p.parse_intermixed_args(argv)


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)

    # 1. Config: a run config with a nightly section, a single corpus root and a gated STS task.
    def check(cfg) -> None:
        if cfg.nightly is None:
            raise ConfigError(f"{args.config}: no nightly: section")
        if not isinstance(cfg.read.uri, str):
            raise ConfigError(f"{args.config}: read.uri must be one folder of {cfg.nightly.partition_key}= partitions")
        if not gated_tasks(cfg.eval.tasks):
            raise ConfigError(f"{args.config}: eval.tasks has no task of the 7-task average for the gate")

    cfg = start_job(args.config, check, overrides=args.overrides)
    if isinstance(cfg, int):  # the exit code of a bad config or a failed store
        return cfg
    through = args.through or (datetime.now(timezone.utc).date() - timedelta(days=1))

    # 2. Run the night.
    result = run_night(cfg, through, config_label=args.config, git_commit=args.git_commit)

    # 3. Report.
    if result.report is not None:
        print(render_markdown(result.report), flush=True)
    log.info("night through %s: %s%s (exit %d)", through, result.status,
             f", model {result.model_id}" if result.model_id else "", result.exit_code)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
