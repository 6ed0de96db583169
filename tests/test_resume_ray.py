"""Distributed training is exact: 1 vs 2 workers, kill-and-resume, and a resize on restart all train
the same weights as one uninterrupted run (deterministic mode, CPU, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import CorruptConfig, ReadConfig
from tsdae.model import ModelConfig
from tsdae.train import ScaleConfig, TrainConfig

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:60]
    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=20)
    return str(path)


@pytest.fixture(scope="module")
def run(ray_local, tiny_bert_no_dropout_dir, corpus, tmp_path_factory):
    """Train; returns (state dict of the final model, summary) for one configuration."""
    from pipeline import build_train_dataset
    from tsdae.train import build_trainer, train_loop_per_worker
    from tsdae.train.faults import CrashOnce

    storage = tmp_path_factory.mktemp("ray")

    def _run(name: str, workers: int, max_steps: int = STEPS, crash_at_step=None, max_failures=0):
        dataset = build_train_dataset(ReadConfig(uri=corpus), CorruptConfig(max_length=32),
                                      tiny_bert_no_dropout_dir, epochs=1, num_actors=1, cpus_per_actor=0.5)
        # fp32: these tests compare weights across worker counts to float tolerance.
        train = TrainConfig(global_batch_size=8, max_steps=max_steps, lr=1e-3, report_every=1,
                            checkpoint_every=2, deterministic=True, precision="fp32")
        trainer = build_trainer(
            dataset, model=ModelConfig(name_or_path=tiny_bert_no_dropout_dir), train=train,
            scale=ScaleConfig(num_workers=workers, cpus_per_worker=0.5, max_failures=max_failures),
            max_seq_length=32, rows=60, name=name, storage_path=str(storage),
            loop=train_loop_per_worker if crash_at_step is None else CrashOnce(crash_at_step),
        )
        result = trainer.fit()
        assert result.error is None
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
            summary = json.loads((Path(d) / "summary.json").read_text())
        return state, summary

    return _run


@pytest.fixture(scope="module")
def uninterrupted(run):
    return run("uninterrupted", workers=2)


def _assert_same_weights(a: dict, b: dict, exact: bool):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_replicas_identical_and_all_steps_run(uninterrupted):
    state, summary = uninterrupted
    assert summary["replicas_identical"] and summary["steps"] == STEPS
    assert summary["rows_trained_per_rank"] == [STEPS * 4, STEPS * 4]


def test_one_worker_full_batch_equals_two_workers_half_batch(run, uninterrupted):
    state, summary = run("one-worker", workers=1)
    assert summary["micro_batch_size"] == 8 and summary["rows_trained_per_rank"] == [STEPS * 8]
    _assert_same_weights(state["model"], uninterrupted[0]["model"], exact=False)


def test_killed_worker_resumes_from_checkpoint_to_the_same_weights(run, uninterrupted):
    state, summary = run("killed", workers=2, crash_at_step=3, max_failures=1)
    assert summary["resumed_from_step"] == 2  # the last checkpoint before the crash at step 3
    assert summary["steps"] == STEPS
    _assert_same_weights(state["model"], uninterrupted[0]["model"], exact=True)


def test_restart_with_fewer_workers_keeps_global_batch_and_position(run, uninterrupted):
    run("resized", workers=2, max_steps=3)
    state, summary = run("resized", workers=1)  # same name: Ray Train resumes the run
    assert summary["resumed_from_step"] == 3 and summary["world_size"] == 1
    assert summary["rows_trained_per_rank"] == [(STEPS - 3) * 8]
    _assert_same_weights(state["model"], uninterrupted[0]["model"], exact=False)
