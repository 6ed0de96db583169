"""The model registry on MLflow: each published model is a version of one registered model, and production
is its ``production`` alias.

    nightly.registry_uri: mlflow://<registered model name>      (server: tracking.mlflow_uri or MLFLOW_TRACKING_URI)
    python -m jobs.registry mlflow://<name> show | promote <model_id>

The same contract as the storage registry (``jobs.registry.ModelRegistry``), kept the same way:

    publish   every file goes up as an artifact under model/ of the night's tracking run (lineage.json
              names it; without one, a new run in the experiment ``<name>-registry``), then
              model/MANIFEST.json, then the model version is created (source: that folder; tags: the
              model id and the lineage). A version exists only for a complete upload: it is what the
              storage registry's manifest is. A crash before it leaves files that nothing points at.
    fetch     downloads the version's files one by one and checks each against MANIFEST.json (size, sha256)
    promote   refuses a model without a version, or a production alias that moved; writes the pointer's
              fields as a tag on the version (``tsdae.pointer``), then moves the alias: the one write that
              changes production, atomic in MLflow's database
    nights    what each night decided, as tags ``tsdae.night.<key>`` on the registered model

Models are found by their model id (tag ``tsdae.model_id``); a night's lineage tags give the parent,
partitions, commit and gate on the version itself, and its source run is the night's tracking run, so the
MLflow UI links the version and the metrics of the night that trained it (MLflow requires a version's
files to be inside its run).
mlflow is an optional extra (``tsdae-ray[mlflow]``): jobs.registry.open_registry imports this module only
for an ``mlflow://`` URI.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from jobs.config import MLFLOW_SCHEME
from jobs.registry import (MANIFEST, SCHEMA_VERSION, RegistryError, _now, check_model_id, install_verified,
                           manifest_entries)

ALIAS = "production"
MODEL_DIR = "model"
TAG_MODEL_ID = "tsdae.model_id"
TAG_POINTER = "tsdae.pointer"
TAG_NIGHT = "tsdae.night."

log = logging.getLogger("tsdae")


def lineage_tags(lineage: dict) -> dict[str, str]:
    """A lineage.json's essentials as model version tags (the whole file is published with the model)."""
    night, data, gate = lineage.get("night") or {}, lineage.get("data") or {}, lineage.get("gate") or {}
    tags = {
        "tsdae.parent": lineage.get("parent") or "",
        "tsdae.base_model": lineage.get("base_model") or "",
        "tsdae.through": night.get("through") or "",
        "tsdae.idempotency_key": night.get("idempotency_key") or "",
        "tsdae.partitions": json.dumps([p["name"] for p in data.get("partitions", [])]),
        "tsdae.replay": json.dumps([p["name"] for p in data.get("replay", [])]),
        "tsdae.consumed_partitions": str(len(data.get("consumed_partitions", []))),
        "tsdae.git_commit": (lineage.get("code") or {}).get("commit") or "",
        "tsdae.gate_candidate_avg": json.dumps((gate.get("candidate") or {}).get("avg")),
        "tsdae.gate_delta_avg": json.dumps((gate.get("delta") or {}).get("avg")),
        "tsdae.mlflow_run_id": night.get("mlflow_run_id") or "",
    }
    return {k: v for k, v in tags.items() if v}


class MlflowRegistry:
    """One registered model of an MLflow server, as a model registry. Every method is safe to re-run."""

    def __init__(self, uri: str, tracking_uri: str | None = None):
        if not uri.startswith(MLFLOW_SCHEME) or not uri[len(MLFLOW_SCHEME):].strip("/"):
            raise ValueError(f"{uri!r}: expected mlflow://<registered model name>")
        self.uri, self.name = uri, uri[len(MLFLOW_SCHEME):].strip("/")
        if "'" in self.name:
            raise ValueError(f"{uri!r}: a registered model name without quotes, please")
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()  # None: MLFLOW_TRACKING_URI
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # -- lookups -----------------------------------------------------------------------------------------
    def _registered(self):
        """The registered model, or None before the first publish or night record."""
        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _ensure_registered(self):
        return self._registered() or self.client.create_registered_model(
            self.name, description="TSDAE encoders published by tsdae-ray (jobs.nightly); production: the "
                                   f"@{ALIAS} alias.")

    def _version(self, model_id: str):
        """The model version of model_id (the newest, if a re-run registered it again), or None."""
        check_model_id(model_id)  # it goes into a filter string
        found = self.client.search_model_versions(f"name='{self.name}' and tags.`{TAG_MODEL_ID}`='{model_id}'")
        return max(found, key=lambda v: int(v.version)) if found else None

    def _read_json(self, version, rel: str) -> dict | None:
        with tempfile.TemporaryDirectory(prefix="tsdae-mlflow-") as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"{version.source}/{rel}", dst_path=tmp,
                                                            tracking_uri=self.tracking_uri)
            except (MlflowException, OSError):
                return None
            return json.loads(Path(local).read_text())

    # -- the pointer -------------------------------------------------------------------------------------
    def production(self) -> dict | None:
        """The production pointer: the fields of the aliased version's last promotion, or None."""
        registered = self._registered()
        version = (registered.aliases or {}).get(ALIAS) if registered else None
        if version is None:
            return None
        mv = self.client.get_model_version(self.name, version)
        pointer = json.loads(mv.tags.get(TAG_POINTER) or "{}")
        return {**pointer, "schema_version": SCHEMA_VERSION, "model_id": mv.tags[TAG_MODEL_ID], "version": mv.version,
                "model_uri": f"models:/{self.name}/{mv.version}"}

    def promote(self, model_id: str, *, expected_current: str | None, **fields) -> dict:
        """Move the production alias to model_id's version (registered, so complete). The last write.

        expected_current: the production model_id the caller started from; a production that moved in
        between is refused (a check, not a lock: MLflow has no conditional alias update).
        fields: extra JSON fields for the pointer (consumed partitions, metrics).
        """
        mv = self._version(model_id)
        if mv is None:
            raise RegistryError(f"model {model_id} has no version of {self.name}: it was never completely written")
        current = self.production()
        current_id = current["model_id"] if current else None
        if current_id != expected_current:
            raise RegistryError(f"production moved from {expected_current} to {current_id} while this job ran")
        pointer = {"schema_version": SCHEMA_VERSION, "model_id": model_id, "version": mv.version,
                   "model_uri": f"models:/{self.name}/{mv.version}", "promoted_at": _now(),
                   "previous_model_id": current_id, **fields}
        self.client.set_model_version_tag(self.name, mv.version, TAG_POINTER, json.dumps(pointer))
        self.client.set_registered_model_alias(self.name, ALIAS, mv.version)
        log.info("production → %s (version %s of %s; was %s)", model_id, mv.version, self.name, current_id)
        return pointer

    # -- immutable models --------------------------------------------------------------------------------
    def model_source(self, model_id: str) -> None:
        """None: a version's files are MLflow artifacts, which workers cannot read with fsspec (the nightly
        job stages a verified copy where they can: jobs.nightly.warm_start_uri)."""
        return None

    def manifest(self, model_id: str) -> dict | None:
        mv = self._version(model_id)
        return self._read_json(mv, MANIFEST) if mv is not None else None

    def publish(self, model_id: str, src: Path) -> dict:
        """Upload every file under the local folder src to model/ of the night's tracking run (named by
        src/lineage.json; else of a new run), then MANIFEST.json, then register that folder as a version of
        the registered model, tagged with model_id and the lineage.

        A version of model_id with the same files is left as it is. One with other files (a re-run after a
        crash between publish and promote) is deleted first, unless it is production's.
        """
        src = Path(src)
        entries = manifest_entries(src)
        existing = self._version(model_id)
        if existing is not None:
            manifest = self._read_json(existing, MANIFEST)
            if manifest is not None and manifest["files"] == entries:
                log.info("model %s is already version %s of %s with the same files", model_id, existing.version,
                         self.name)
                return manifest
            current = self.production()
            if current is not None and current["model_id"] == model_id:
                raise RegistryError(f"model {model_id} is in production; it cannot be rewritten")
            log.warning("model %s was registered (version %s) but never promoted; registering it again", model_id,
                        existing.version)
            self.client.delete_model_version(self.name, existing.version)
        lineage = json.loads((src / "lineage.json").read_text()) if (src / "lineage.json").exists() else {}
        run, own_run = self._tracking_run((lineage.get("night") or {}).get("mlflow_run_id")), False
        if run is None:
            experiment = self.client.get_experiment_by_name(f"{self.name}-registry")
            experiment_id = (experiment.experiment_id if experiment
                             else self.client.create_experiment(f"{self.name}-registry"))
            run, own_run = self.client.create_run(experiment_id, run_name=model_id, tags={TAG_MODEL_ID: model_id}), True
        run_id = run.info.run_id
        total = sum(e["size"] for e in entries.values())
        log.info("upload %s: %d files, %.1f MB to run %s", model_id, len(entries), total / 1e6, run_id)
        for rel in entries:
            self.client.log_artifact(run_id, str(src / rel), Path(MODEL_DIR, rel).parent.as_posix())
        manifest = {"schema_version": SCHEMA_VERSION, "model_id": model_id, "created_at": _now(), "files": entries}
        self.client.log_text(run_id, json.dumps(manifest, indent=2) + "\n", f"{MODEL_DIR}/{MANIFEST}")
        self._ensure_registered()
        version = self.client.create_model_version(
            self.name, f"{run.info.artifact_uri}/{MODEL_DIR}", run_id=run_id,
            tags={TAG_MODEL_ID: model_id, **lineage_tags(lineage)},
            description=f"{model_id}: TSDAE encoder and decoder with report.json and lineage.json")
        if own_run:
            self.client.set_terminated(run_id)
        log.info("registered %s as version %s of %s", model_id, version.version, self.name)
        return manifest

    def _tracking_run(self, run_id: str | None):
        """The night's tracking run, when it is on this server."""
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def fetch(self, model_id: str, dest: str | Path) -> Path:
        """Download model_id's version to the local folder dest, checking every size and checksum against
        its manifest; returns dest, complete or absent (``install_verified``)."""
        mv = self._version(model_id)
        manifest = self._read_json(mv, MANIFEST) if mv is not None else None
        if manifest is None:
            raise RegistryError(f"model {model_id} has no complete version of {self.name}")

        def download(rel: str, local: Path) -> None:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/{rel}", dst_path=str(local.parent),
                                                tracking_uri=self.tracking_uri)
        return install_verified(model_id, manifest, Path(dest), download)

    def lineage(self, model_id: str) -> dict | None:
        mv = self._version(model_id)
        return self._read_json(mv, "lineage.json") if mv is not None else None

    # -- nights ------------------------------------------------------------------------------------------
    def night(self, key: str) -> dict | None:
        registered = self._registered()
        value = (registered.tags or {}).get(TAG_NIGHT + key) if registered else None
        return json.loads(value) if value else None

    def record_night(self, key: str, record: dict) -> None:
        self._ensure_registered()
        value = {"schema_version": SCHEMA_VERSION, "key": key, "recorded_at": _now(), **record}
        self.client.set_registered_model_tag(self.name, TAG_NIGHT + key, json.dumps(value, allow_nan=False))
