"""Run TSDAE end to end: read the corpus → evaluate the base model → train → evaluate → report.

    python -m jobs.run --config configs/demo.yaml train.lr=1e-4 scale.num_workers=4   # = tsdae-ray run …
    ray job submit --working-dir . -- python -m jobs.run --config configs/gpu-cluster.yaml

The outputs go to `<output_dir>/<run name>/`, a local folder or a bucket (output_dir: s3://bucket/runs);
the job ends by logging the URI of each.

Exit codes: 0 success, 2 bad config, 3 bad corpus, 4 training failed, 5 evaluation failed, 8 storage
failure, 143 stopped by SIGTERM after a checkpoint (continue with --resume RUN_NAME).
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone

from jobs import tracking
from jobs.config import OVERRIDES_HELP
from jobs.stages import StageError, connect_ray, log_outputs, run_all, start_job
from tsdae.eval import render_markdown
from tsdae.storage import OutputDir

log = logging.getLogger("tsdae")


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--name", help="run name (default: the config's name); a UTC timestamp is appended")
    p.add_argument("--resume", metavar="RUN_NAME",
                   help="continue a stopped or failed run from its last checkpoint (its full name)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    return p.parse_intermixed_args(argv)


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)

    # 1. Config.
    cfg = start_job(args.config, overrides=args.overrides)
    if isinstance(cfg, int):  # the exit code of a bad config or a failed store
        return cfg
    run_name = args.resume or f"{args.name or cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    with OutputDir(cfg.run_output(run_name)) as out:
        log.info("run %s → %s", run_name, out.uri)

        # 2. Build and run: join or start Ray, start the MLflow run (when tracking is on), every stage in order.
        connect_ray(cfg.ray_address, cfg.scale.local_num_cpus)
        tracker = tracking.start(cfg.tracking, run_name, tracking.run_tags(cfg, args.config))
        try:
            report = run_all(cfg, run_name, out, config_label=args.config, tracker=tracker)
        except StageError as e:
            log.error("%s", e)
            tracker.finish(e.exit_code)
            return e.exit_code
        finally:
            log_outputs(out)
        tracker.finish(0)

    # 3. Report.
    print(render_markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
