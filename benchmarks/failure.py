"""Cost of a worker failure: a 2-worker run killed once mid-run vs the same run uninterrupted.

    python -m benchmarks.failure [--steps 12 --fault-at 7 --checkpoint-every 4]

Tiny random BERT, deterministic mode, CPU/gloo. Last line: JSON with the wall times, the steps lost
(trained again after the restart), the failure's cost in seconds (killed − uninterrupted − the injected
crash's own wait, tsdae.train.faults.settle_seconds: the restart plus the lost steps trained again), and
whether the final weights are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from benchmarks.publish import machine, publish
from jobs.stages import WORKER_ENV
from pipeline import CorruptConfig, ReadConfig, build_train_dataset
from tsdae.model import ModelConfig
from tsdae.train import CrashOnce, ScaleConfig, TrainConfig, build_trainer, train_loop_per_worker
from tsdae.train.faults import settle_seconds

ROOT = Path(__file__).resolve().parents[1]


def _tiny_bert(path: Path) -> str:
    tokenizer = BertTokenizerFast(vocab=str(ROOT / "tests/assets/vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--fault-at", type=int, default=7)
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/failure-cpu.json")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp())
    model = _tiny_bert(tmp / "model")
    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[: args.steps * 8 + 8]
    pq.write_table(pa.table({"text": texts}), tmp / "corpus.parquet")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})

    def run(name: str, fault_at):
        dataset = build_train_dataset(ReadConfig(uri=str(tmp / "corpus.parquet")), CorruptConfig(max_length=32),
                                      model, epochs=1, num_actors=1, cpus_per_actor=0.5)
        train = TrainConfig(global_batch_size=8, max_steps=args.steps, lr=1e-3, report_every=1,
                            checkpoint_every=args.checkpoint_every, deterministic=True)
        trainer = build_trainer(dataset, model=ModelConfig(name_or_path=model), train=train,
                                scale=ScaleConfig(num_workers=2, cpus_per_worker=0.5, max_failures=1),
                                max_seq_length=32, rows=len(texts), name=name, storage_path=str(tmp / "ray"),
                                loop=train_loop_per_worker if fault_at is None else CrashOnce(fault_at))
        t = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)["model"]
            summary = json.loads((Path(d) / "summary.json").read_text())
        return seconds, state, summary

    clean_s, clean_state, _ = run("uninterrupted", None)
    killed_s, killed_state, summary = run("killed", args.fault_at)
    lost = args.fault_at - summary["resumed_from_step"]
    out = {
        "steps": args.steps,
        "fault_at_step": args.fault_at,
        "resumed_from_step": summary["resumed_from_step"],
        "steps_lost": lost,
        "uninterrupted_s": round(clean_s, 1),
        "killed_s": round(killed_s, 1),
        "injected_wait_s": settle_seconds(),
        "failure_cost_s": round(killed_s - clean_s - settle_seconds(), 1),
        "weights_identical": all(torch.equal(clean_state[k], killed_state[k]) for k in clean_state),
        "machine": machine(),
    }
    ray.shutdown()
    return publish(out, args.out)


if __name__ == "__main__":
    main()
