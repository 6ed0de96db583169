"""Cost of storage: the same small jobs.run on a two-node Ray cluster with every input and output on the
local disk vs in an S3 server.

    python -m benchmarks.storage [--repeats 3] [--out benchmarks/results/storage-cpu.json]

The cluster, the S3 server and the job submission are the ones of tests/test_two_node.py (a head and a
worker node with a private /tmp under ``unshare -m``, so this needs root; moto on loopback; the drivers
submitted with a working_dir). Local disk: corpus, model, checkpoints and outputs in one folder outside
/tmp that both nodes see at the same path, as NFS/EFS would be (``scale.shared_filesystem: true``). S3:
all of them in the bucket, the model fetched into each node's cache. Tiny random BERT, 64 sentences,
4 steps: the difference is what storage costs, not training. The runs alternate (local, S3, local, S3,
…); the first S3 run downloads the model into each node's cache, later ones find it there, as a cluster's
later nights do. Last line: JSON with, per storage, each run's job wall time (submission to end, as the
client sees it) and the run's own wall and training seconds from its report, their medians, and the URI
of every artifact of its first run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.failure import _tiny_bert
from benchmarks.publish import load_average, machine, publish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's S3 server and two-node cluster
from conftest import S3Server  # noqa: E402
from test_two_node import BUCKET, TwoNodeCluster, _config  # noqa: E402


def _artifacts(uri: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(uri)
    prefix = "s3://" if uri.startswith("s3://") else ""
    return sorted(prefix + p for p in fs.find(root))


def _run(cluster: TwoNodeCluster, config: Path, storage: str) -> dict:
    t0 = time.perf_counter()
    info = cluster.wait(cluster.submit(f"python -m jobs.run --config {config}"))
    job_wall = time.perf_counter() - t0
    if info["driver_exit_code"] != 0:
        raise RuntimeError(f"{config}: exit {info['driver_exit_code']}\n{info['logs'][-4000:]}")
    run = re.search(r"run (\S+) → ", info["logs"]).group(1)
    fs, root = fsspec.core.url_to_fs(f"{storage}/runs/{run}/report.json")
    meta = json.loads(fs.cat_file(root))["meta"]
    return {"job_wall_s": round(job_wall, 1), "run_wall_s": meta["wall_seconds"], "train_s": meta["train"]["seconds"],
            "run": run, "artifacts": _artifacts(f"{storage}/runs/{run}") + _artifacts(f"{storage}/ray/{run}")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per storage, alternating local and S3")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/storage-cpu.json"))
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="bs-"))  # short: Ray's socket paths under it have a length limit
    shared = ROOT / "runs" / f"bench-storage-{time.strftime('%Y%m%d-%H%M%S')}"  # outside /tmp: both nodes see it
    server = S3Server(tmp)
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    cluster = None
    try:
        model = _tiny_bert(shared / "model")
        texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:64]
        pq.write_table(pa.table({"text": texts}), shared / "corpus.parquet")
        s3 = fsspec.filesystem("s3")
        s3.mkdir(BUCKET)
        s3.put(f"{model}/", f"{BUCKET}/models/tiny-bert/", recursive=True)
        s3.put(str(shared / "corpus.parquet"), f"{BUCKET}/corpus/part-0.parquet")
        local_inputs = {"model": model, "corpus": str(shared / "corpus.parquet")}
        s3_inputs = {"model": f"s3://{BUCKET}/models/tiny-bert", "corpus": f"s3://{BUCKET}/corpus/part-0.parquet"}

        (tmp / "cluster").mkdir()
        cluster = TwoNodeCluster(tmp / "cluster", {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        cluster.wait_ready()
        # One job with the working dir first: each node unpacks it once, for neither measured run.
        warm = cluster.wait(cluster.submit("python -c pass"))
        assert warm["driver_exit_code"] == 0, warm["logs"][-2000:]
        configs = {"local": (_config(tmp, "local", local_inputs, storage=str(shared), scale={"shared_filesystem": True}),
                             str(shared)),
                   "s3": (_config(tmp, "s3", s3_inputs), f"s3://{BUCKET}")}
        runs = {name: [] for name in configs}
        for i in range(args.repeats):
            for name, (config, storage) in configs.items():
                runs[name].append(_run(cluster, config, storage))
                print(f"{name} {i + 1}/{args.repeats}: {json.dumps({k: v for k, v in runs[name][-1].items() if k != 'artifacts'})}",
                      flush=True)
    except BaseException:
        print(f"failed; the cluster's logs are kept in {tmp}", flush=True)
        tmp = None
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)
        with contextlib.suppress(OSError):
            shared.parent.rmdir()  # runs/, if this made it
    keys = ("job_wall_s", "run_wall_s", "train_s")
    results = {name: {"median": {k: round(statistics.median(r[k] for r in rs), 1) for k in keys},
                      "runs": [{k: v for k, v in r.items() if k != "artifacts"} for r in rs],
                      "artifacts": rs[0]["artifacts"]} for name, rs in runs.items()}
    return publish({"benchmark": "storage", "machine": machine(), "load_average": load_average(),
                    "nodes": 2, "run": "jobs.run, tiny random BERT, 64 sentences, 4 steps, STS16",
                    "repeats": args.repeats, **results,
                    "s3_minus_local_median_s": {k: round(results["s3"]["median"][k] - results["local"]["median"][k], 1)
                                                for k in keys}},
                   args.out)


if __name__ == "__main__":
    main()
