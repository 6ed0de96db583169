"""benchmarks.compile_step: its two cases, and one eager/compiled comparison on a tiny model (the
compiled step must compute the eager step's loss)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import compile_step
from benchmarks.batches import collate
from benchmarks.steps import make_optimizer


def _batches(lengths: list[int]) -> list:
    ids = [[101] + [1000 + i] * n + [102] for i, n in enumerate(lengths)]
    return [collate(ids, ids, [i], pad_id=0) for i in range(len(lengths))]


def test_fixed_case_repeats_the_median_batch_and_varying_samples_distinct_batches_in_order():
    batches = _batches([5, 1, 9, 3, 7])
    cases = compile_step.cases(batches, steps=3, seed=0)
    assert len(cases["fixed"]) == 3 and all(b is batches[0] for b in cases["fixed"])  # the median length, 5
    picked = [next(i for i, x in enumerate(batches) if x is b) for b in cases["varying"]]
    assert len(set(picked)) == 3 and picked == sorted(picked)
    assert len(compile_step.cases(batches, steps=9, seed=0)["varying"]) == 5


def test_compiled_step_computes_the_eager_loss(tiny_bert_no_dropout_dir):
    from tsdae.model import ModelConfig, build_tsdae

    torch.manual_seed(0)
    model, _ = build_tsdae(ModelConfig(name_or_path=tiny_bert_no_dropout_dir, pooling="cls"))
    model.train()
    batches = [collate([[101, 7592, 2088, 102]] * 2, [[101, 7592, 2088, 999, 102]] * 2, [0, 1], pad_id=0)] * 2
    optimizer = make_optimizer(model.parameters(), 1e-4, fused=True)
    # aot_eager: Dynamo's capture of our step and AOTAutograd's backward, without Inductor's C++ code
    # generation (PyTorch's own, and most of this test's time: 59 s against 16 s with a cold compile cache).
    out = compile_step.compare(model, optimizer, batches, rounds=2,
                               compile_kwargs={"dynamic": False, "backend": "aot_eager"}, flops=1e9, peak=1e12)
    assert out["compiled_eval_loss"] == pytest.approx(out["eager_eval_loss"], abs=1e-5)
    assert len(out["eager_rounds_ms"]) == len(out["compiled_rounds_ms"]) == 2
    assert out["eager_ms_per_step"] > 0 and out["compiled_over_eager"] > 0 and 0 < out["eager_mfu"] < 1


def test_an_unknown_case_is_refused_by_name(capsys):
    assert compile_step.parse_args(["--cases", "varying"]).cases == ["varying"]
    with pytest.raises(SystemExit):
        compile_step.parse_args(["--cases", "fixed,dynamic"])
    assert "unknown case 'dynamic'" in capsys.readouterr().err
