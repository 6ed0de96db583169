"""Deployment recipes parse and carry what they must: the runtime_env and .rayignore (upload size
measured with Ray's own packaging), the cron line, the KubeRay RayCronJob, and package pins that agree
with pyproject.toml in cluster.yaml and the Dockerfile."""

from __future__ import annotations

import re
import shlex
import tomllib
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
_PIN = re.compile(r'"([A-Za-z0-9_.\-]+)(?:\[[a-z,]+\])?==([0-9][^"\s]*)"')


def _pins(text: str) -> dict[str, str]:
    return dict(_PIN.findall(text))


def test_runtime_env_recipe_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    recipe = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**recipe)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert "pip" not in recipe and "conda" not in recipe  # packages come pinned in the image


def test_recipes_do_not_set_what_the_jobs_ray_init_sets():
    """Ray fails a job whose runtime_env sets an env var that the driver's ray.init also sets (found by
    tests/test_job_submit.py: "Failed to merge the Job's runtime env ... because of a conflict")."""
    from jobs.stages import WORKER_ENV

    recipe = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    job = yaml.safe_load((DEPLOY / "kuberay" / "raycronjob.yaml").read_text())["spec"]["jobTemplate"]
    for env_vars in (recipe.get("env_vars", {}), yaml.safe_load(job["runtimeEnvYAML"]).get("env_vars", {})):
        assert not set(env_vars) & set(WORKER_ENV)


def test_rayignore_keeps_the_working_dir_upload_small(tmp_path):
    """Package the checkout exactly as `ray job submit --working-dir .` does, ignoring .gitignore (a
    user may set RAY_RUNTIME_ENV_IGNORE_GITIGNORE), so .rayignore alone must do the job."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    package = tmp_path / "pkg.zip"
    create_package(str(ROOT), package, include_gitignore=False)
    names = zipfile.ZipFile(package).namelist()
    size = package.stat().st_size
    assert size < 50 * 2**20 < GCS_STORAGE_MAX_SIZE, f"{size / 2**20:.1f} MiB"
    files = [n for n in names if not n.endswith("/")]  # an empty folder (e.g. runs/) is only a name
    assert not [n for n in files if n.split("/")[0] in (".venv", ".git", "runs") or "__pycache__" in n]
    for needed in ("jobs/nightly.py", "tsdae/train/loop.py", "pipeline/read.py", "configs/nightly-gpu.yaml",
                   "deploy/runtime_env.yaml"):
        assert needed in names
    assert any(n.startswith("data/sts/") for n in names)


def test_cron_line_submits_the_nightly_job():
    lines = [line for line in (DEPLOY / "nightly.cron").read_text().splitlines()
             if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    (line,) = lines
    fields = line.split(None, 5)
    minute, hour, dom, month, dow, command = fields
    assert re.fullmatch(r"\d+", minute) and re.fullmatch(r"\d+", hour) and (dom, month, dow) == ("*", "*", "*")
    assert "%" not in command  # cron turns an unescaped % into a newline
    argv = shlex.split(command.split("&&")[-1].split(">>")[0])
    assert argv[:3] == [".venv/bin/ray", "job", "submit"]
    assert argv[argv.index("--runtime-env") + 1] == "deploy/runtime_env.yaml"
    entry = argv[argv.index("--") + 1:]
    assert entry[:3] == ["python", "-m", "jobs.nightly"]
    assert (ROOT / entry[entry.index("--config") + 1]).exists()


def test_raycronjob_manifest_has_the_required_fields():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "raycronjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCronJob" and doc["metadata"]["name"]
    assert len(doc["spec"]["schedule"].split()) == 5
    job = doc["spec"]["jobTemplate"]
    assert job["entrypoint"].startswith("python -m jobs.nightly --config ")
    assert (ROOT / job["entrypoint"].split("--config ")[1].split()[0]).exists()
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 0
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    cluster = job["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no work on the head
    groups = cluster["workerGroupSpecs"]
    for group in groups:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] and container["resources"]["limits"]
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups)


def test_cluster_and_image_pin_what_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {}
    for dep in project["dependencies"] + project["optional-dependencies"]["cloud"]:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[a-z,]+\])?==(\S+)", dep)
        if m:
            wanted[m[1]] = m[2]
    wanted["torch"] = re.search(r"torch==(\S+)", (ROOT / "Makefile").read_text())[1]  # the build we test
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.\d+-py311-gpu$", dockerfile, re.M)
    for name, text in (("cluster.yaml", (ROOT / "cluster.yaml").read_text()), ("Dockerfile", dockerfile)):
        pins = _pins(text)
        assert "--pre" not in text and "ray-wheels" not in text  # no pre-release or nightly wheels
        differ = {k: (v, pins.get(k)) for k, v in wanted.items() if pins.get(k) != v}
        assert not differ, f"{name} pins differ from pyproject.toml/Makefile: {differ}"
