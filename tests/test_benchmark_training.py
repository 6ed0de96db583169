"""The training benchmark's batch construction, and its device path on a tiny model (so a GPU-less
machine still runs every line of it that is not CUDA-specific)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import batches, training, training_cpu, training_gpu
from benchmarks.ablation import VARIANTS, variants

CORPUS = Path(__file__).resolve().parents[1] / batches.CORPUS


@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/corpus")
def test_pipeline_order_gives_length_aware_batches_of_the_same_rows(packaged_model_dir):
    texts, keys = batches.load_sentences(str(CORPUS), 600)
    data = batches.corrupt_and_tokenize(texts, keys, packaged_model_dir, 0.6, 0, batch_size=8)
    assert sorted(data["row_key"]) == list(range(600))
    lengths = np.array([len(ids) for ids in data["target_ids"]])

    def padding(rows):
        return 1 - sum(lengths[b].sum() for b in rows) / sum(lengths[b].max() * len(b) for b in rows)

    sorted_padding = padding(batches.consecutive_batches(600, 8))
    random_padding = padding(batches.random_batches(600, 8, np.random.default_rng(0)))
    assert sorted_padding < 0.05 < 0.3 < random_padding


GPU_RUN = """
import json, sys
sys.modules["ray"] = sys.modules["pyarrow"] = None  # what the GPU machine lacks: importing either fails
from benchmarks import training
from benchmarks.training_gpu import run_device
args = training.parse_args(["--device", "cuda", "--batch-sizes", "8", "64", "--rounds", "2", "--chunk", "2",
                            "--warmup", "1", "--peak-n", "64"])
args.device = "cpu"  # every line that is not CUDA-specific, on this machine
tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
print(json.dumps(run_device(args, tiny)))
"""


def test_gpu_side_runs_without_ray_or_pyarrow_on_a_tiny_model():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", GPU_RUN], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["per_batch_size"]) == {"8", "64"}
    for per_batch in result["per_batch_size"].values():
        for side in ("ours", "reference"):
            assert per_batch[side]["sentences_per_s"] > 0 and per_batch[side]["tokens_per_s"] > 0
            assert 0 < per_batch[side]["mfu"] < 1
            # both sides start from equal weights on equal batches: the same first loss (bf16 autocast)
        assert per_batch["ours"]["first_loss"] == pytest.approx(per_batch["reference"]["first_loss"], rel=0.05)
        assert per_batch["speedup"] > 0
    assert result["headline_batch_size"] == 64 and result["mfu"] == result["per_batch_size"]["64"]["ours"]["mfu"]
    assert result["host_syncs_per_step"] is None  # counted on CUDA only


def test_prepared_gpu_tokens_are_what_the_pipeline_gives_today(tmp_path):
    fresh = training_gpu.prepare_tokens(tmp_path / "tokens.npz")
    with np.load(training_gpu.TOKENS) as committed, np.load(fresh) as now:
        assert sorted(committed.files) == sorted(now.files)
        for name in now.files:
            assert np.array_equal(committed[name], now[name]), f"{name} changed: rerun python -m benchmarks.training_gpu --prepare"
    noisy, target, orders = training_gpu.load_tokens(fresh)
    assert len(noisy) == len(target) == 4000 and sum(map(len, target)) > sum(map(len, noisy))
    assert all(sorted(o.tolist()) == list(range(4000)) for o in orders.values())


@pytest.mark.model
@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/corpus")
def test_cpu_comparison_runs_each_side_in_its_own_process_from_equal_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = training.parse_args(["--sentences", "32", "--steps", "2", "--chunk", "1", "--eval-sentences", "8",
                                "--ablation-rounds", "1", "--ablation-steps", "2", "--no-stsb", "--peak-n", "256",
                                "--breakdown-steps", "2", "--out", str(tmp_path / "out.json")])
    result = training_cpu.run_cpu(args)
    assert result["initial_loss_ours"] == pytest.approx(result["initial_loss_reference"], abs=1e-4)
    assert result["settings"]["ours_process"].endswith("True")  # our side ran with retain_freed_memory
    assert len(result["speedup_per_chunk"]) == 2
    for key in ("ours_sentences_per_s", "reference_sentences_per_s", "mfu", "peak_gflops", "mask_speedup"):
        assert result[key] > 0
    assert 0 < result["mfu"] < 1 and 0 < result["step_breakdown"]["mfu"] < 1
    assert set(result["ablation_sentences_per_s"]) - {"_rounds"} == set(variants(compile=False))
    # the bf16 side runs only where the CPU multiplies bf16 natively; elsewhere it is skipped, with the reason
    assert (result["ours_bf16_sentences_per_s"] is None) == (result["bf16_skipped"] is not None) == (not args.bf16)


def test_token_counts_are_each_sentences_real_tokens_not_its_padding():
    noisy, target = [[101, 7, 102], [101, 102]], [[101, 5, 6, 102], [101, 9, 9, 9, 9, 102]]
    padded = [batches.collate(noisy, target, [0, 1], pad_id=0), batches.collate(noisy, target, [1], pad_id=0)]
    assert batches.token_counts(padded, pad_id=0) == ([3, 2, 2], [4, 6, 6])


def test_bf16_variants_need_a_cpu_with_native_bf16(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert "+bf16_autocast" not in variants(compile=False) and "+torch_compile" not in variants(compile=False)
    assert not training.parse_args([]).bf16 and training.parse_args(["--bf16", "on"]).bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert set(variants(compile=True)) == set(VARIANTS) and training.parse_args([]).bf16
