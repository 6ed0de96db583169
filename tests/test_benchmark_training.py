"""The training benchmark's batch construction, and its device path on a tiny model (so a GPU-less
machine still runs every line of it that is not CUDA-specific)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import training

CORPUS = Path(__file__).resolve().parents[1] / training.CORPUS


@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/corpus")
def test_pipeline_order_gives_length_aware_batches_of_the_same_rows(packaged_model_dir):
    texts, keys = training.load_sentences(str(CORPUS), 600)
    data = training.corrupt_and_tokenize(texts, keys, packaged_model_dir, 0.6, 0, batch_size=8)
    assert sorted(data["row_key"]) == list(range(600))
    lengths = np.array([len(ids) for ids in data["target_ids"]])

    def padding(batches):
        return 1 - sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    sorted_padding = padding(training.consecutive_batches(600, 8))
    random_padding = padding(training.random_batches(600, 8, np.random.default_rng(0)))
    assert sorted_padding < 0.05 < 0.3 < random_padding


@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/corpus")
def test_device_path_runs_on_cpu_with_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = training.parse_args(["--device", "cpu", "--steps", "4", "--batch-size", "4", "--chunk", "2",
                                "--out", str(tmp_path / "out.json")])
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    result = training.run_device(args, tiny)
    assert result["ours_tokens_per_s"] > 0 and 0 < result["mfu"] < 1


@pytest.mark.model
@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/corpus")
def test_cpu_comparison_runs_each_side_in_its_own_process_from_equal_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = training.parse_args(["--sentences", "32", "--steps", "2", "--chunk", "1", "--eval-sentences", "8",
                                "--ablation-rounds", "1", "--ablation-steps", "2", "--no-stsb",
                                "--out", str(tmp_path / "out.json")])
    result = training.run_cpu(args)
    assert result["initial_loss_ours"] == pytest.approx(result["initial_loss_reference"], abs=1e-4)
    assert result["settings"]["ours_process"].endswith("True")  # our side ran with retain_freed_memory
    assert len(result["speedup_per_chunk"]) == 2
    for key in ("ours_sentences_per_s", "reference_sentences_per_s", "ours_bf16_sentences_per_s", "mfu",
                "peak_gflops", "mask_speedup"):
        assert result[key] > 0
    assert set(result["ablation_sentences_per_s"]) - {"_rounds"} == set(training.ABLATION_VARIANTS) - {"+torch_compile"}


def test_token_counts_are_each_sentences_real_tokens_not_its_padding():
    noisy, target = [[101, 7, 102], [101, 102]], [[101, 5, 6, 102], [101, 9, 9, 9, 9, 102]]
    batches = [training.collate(noisy, target, [0, 1], pad_id=0), training.collate(noisy, target, [1], pad_id=0)]
    assert training.token_counts(batches) == ([3, 2, 2], [4, 6, 6])
