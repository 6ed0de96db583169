"""STS evaluation of a large model on a cluster: Ray Data streams the suite's distinct sentences through
a pool of model actors (one per GPU, or a few per CPU node), the driver scores.

Every sentence carries its row index through the pipeline and the driver checks that each index comes
back exactly once, so no pair can be lost (Ray's equal split drops tail rows; nothing here splits).
Sentences are sorted by length on the driver and cut into contiguous blocks, so each actor batch holds
sentences of similar length (little padding), as in the single-process ``SentenceEncoder``.

On the 2-core development machine the pool cannot beat one process using both cores (actor start-up
and model loading per actor are pure overhead there; ``python -m benchmarks.evaluation --distributed``
times it); it pays off with one actor per GPU, or per CPU node of a cluster.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import ray

from tsdae.device import compute_device
from tsdae.eval.config import EvalConfig
from tsdae.eval.encode import SentenceEncoder, with_run_info
from tsdae.eval.protocol import evaluate_sts
from tsdae.eval.sts import load_suite
from tsdae.model import fetch_model, model_pooling, resolve_model_path

ROWS_PER_BLOCK_BATCHES = 8  # a block is 8 actor batches: small enough to balance, big enough to amortise


class EncoderActor:
    """A Ray Data model actor: loads the encoder once, then maps {"idx", "text"} batches to
    {"idx", "embedding"} (embedding: (B, H) float32).

    model_ref: ``package:<module>``, a local path or an fsspec URI, fetched by each actor into its node's
    model cache (``tsdae.model_cache``).
    """

    def __init__(self, model_ref: str, pooling: str, max_length: int, batch_size: int, precision: str,
                 num_cpus: float, num_gpus: float):
        device = compute_device(num_gpus, num_cpus)
        model_dir = fetch_model(model_ref)
        self.encoder = SentenceEncoder(model_dir, pooling, max_length, batch_size, str(device), precision)
        self.pooling = self.encoder.pooling

    def __call__(self, batch: dict) -> dict:
        emb_BH = self.encoder.encode([str(t) for t in batch["text"]])
        return {"idx": np.asarray(batch["idx"], dtype=np.int64), "embedding": emb_BH}


def length_sorted_blocks(sentences: list[str], rows_per_block: int) -> list[pa.Table]:
    """pyarrow tables {"idx": int64, "text": string}: the sentences longest first (character length, a
    cheap proxy for tokens on the driver), cut into contiguous blocks of at most rows_per_block rows."""
    lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
    order = np.argsort(-lengths, kind="stable")
    return [pa.table({"idx": order[i:i + rows_per_block], "text": [sentences[j] for j in order[i:i + rows_per_block]]})
            for i in range(0, len(order), rows_per_block)]


def encode_with_actors(sentences: list[str], model_ref: str, pooling: str, cfg: EvalConfig) -> np.ndarray:
    """Embed sentences with max(1, cfg.actors) Ray Data actors of cfg.num_cpus / cfg.num_gpus each;
    returns emb_NH float32, row i for sentences[i]. Raises RuntimeError if any row is missing or
    duplicated. Needs a connected Ray cluster (``ray.init``)."""
    if not sentences:
        raise ValueError("no sentences to encode")
    blocks = length_sorted_blocks(sentences, cfg.batch_size * ROWS_PER_BLOCK_BATCHES)
    encoded = ray.data.from_arrow(blocks).map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "model_ref": model_ref, "pooling": pooling, "max_length": cfg.max_length, "batch_size": cfg.batch_size,
            "precision": cfg.precision, "num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.actors)),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        resources=cfg.resources or None,
    )
    out_NH, seen = None, np.zeros(len(sentences), dtype=np.int64)
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        idx, emb_BH = batch["idx"], np.asarray(batch["embedding"], dtype=np.float32)
        if out_NH is None:
            out_NH = np.empty((len(sentences), emb_BH.shape[1]), dtype=np.float32)
        out_NH[idx] = emb_BH
        np.add.at(seen, idx, 1)
    if not np.all(seen == 1):
        lost, dup = int((seen == 0).sum()), int((seen > 1).sum())
        raise RuntimeError(f"distributed encoding lost {lost} and duplicated {dup} of {len(sentences)} sentences")
    return out_NH


def evaluate_distributed(model_ref: str, pooling: str, cfg: EvalConfig) -> dict:
    """``tsdae.eval.encode.evaluate_model_dir`` with the encoding spread over Ray Data model actors.
    pooling may be "auto" (read here from the model's files). Returns the same dict, plus "actors"."""
    t0 = time.perf_counter()
    pooling = model_pooling(resolve_model_path(model_ref), pooling)
    subsets_by_task, bad_rows = load_suite(cfg)
    encode_s = 0.0

    def encode(sentences: list[str]) -> np.ndarray:
        nonlocal encode_s
        t = time.perf_counter()
        emb = encode_with_actors(sentences, model_ref, pooling, cfg)
        encode_s += time.perf_counter() - t
        return emb

    result = evaluate_sts(encode, subsets_by_task)
    return with_run_info(result, pooling=pooling, cfg=cfg, bad_rows=bad_rows, wall_s=time.perf_counter() - t0,
                         encode_s=encode_s, actors=max(1, cfg.actors))
