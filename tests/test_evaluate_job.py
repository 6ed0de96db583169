"""jobs.evaluate end to end in this process on a tiny model: report files, labels, custom set, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jobs.evaluate import main

STS_DIR = Path(__file__).resolve().parents[1] / "data" / "sts"


def _small_sts(tmp_path: Path) -> str:
    """An STS folder with the first 40 STS-B dev pairs and two STS12 subsets of 20 pairs each."""
    dev = (STS_DIR / "STSBenchmark" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "STSBenchmark").mkdir(parents=True)
    (tmp_path / "STSBenchmark" / "sts-dev.csv").write_text("\n".join(dev) + "\n", encoding="utf-8")
    folder = tmp_path / "STS12-en-test"
    folder.mkdir()
    for name in ("MSRpar", "MSRvid"):
        for kind in ("input", "gs"):
            lines = (STS_DIR / "STS12-en-test" / f"STS.{kind}.{name}.txt").read_text(encoding="utf-8").splitlines()
            (folder / f"STS.{kind}.{name}.txt").write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    return str(tmp_path)


def test_model_vs_baseline_vs_production_with_custom_set(tiny_bert_dir, tmp_path):
    sts_dir = _small_sts(tmp_path / "sts")
    custom = tmp_path / "mine.csv"
    custom.write_text("sentence1,sentence2,score\na cat sits,a cat sat,4.5\na dog,the sky,0.5\nx,,2\n"
                      "one more,another one,2.5\n")
    out = tmp_path / "out"

    rc = main(["--model", tiny_bert_dir, "--baseline", tiny_bert_dir, "--production", tiny_bert_dir,
               "--pooling", "mean", "--sts-dir", sts_dir, "--tasks", "STS12", "STSB-dev",
               "--custom", f"mine={custom}", "--out", str(out)])

    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "sts_tasks.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 2
    assert report["meta"]["labels"] == {"before": "baseline", "after": "model", "production": "production"}
    assert list(report["after"]["tasks"]) == ["STS12", "STSB-dev", "mine"]
    assert report["after"]["tasks"]["STS12"]["n_pairs"] == 40
    assert report["after"]["bad_rows"]["mine"]["examples"] == [{"row": 2, "reason": "empty sentence2"}]
    assert report["delta"]["tasks"]["STSB-dev"]["all"] == 0.0  # same model on both sides
    assert report["delta_production"]["tasks"]["mine"]["all"] == 0.0
    md = (out / "report.md").read_text()
    assert "| task | baseline | model | delta | production | vs production |" in md
    assert "mine: 1 of 4 rows skipped" in md


def test_exit_codes(tiny_bert_dir, tmp_path):
    sts_dir = _small_sts(tmp_path / "sts")
    assert main(["--model", tiny_bert_dir, "--custom", "no-equals-sign", "--out", str(tmp_path / "a")]) == 2
    assert main(["--model", tiny_bert_dir, "--tasks", "STS99", "--out", str(tmp_path / "b")]) == 2
    # a model that does not exist is a bad argument, refused before anything is evaluated
    assert main(["--model", str(tmp_path / "missing"), "--sts-dir", sts_dir, "--tasks", "STSB-dev",
                 "--out", str(tmp_path / "c")]) == 2
    broken = tmp_path / "broken"  # a model folder whose weights are missing: the evaluation itself fails
    broken.mkdir()
    shutil.copy(Path(tiny_bert_dir) / "config.json", broken / "config.json")
    assert main(["--model", str(broken), "--sts-dir", sts_dir, "--tasks", "STSB-dev", "--out", str(tmp_path / "e")]) == 5
    assert main(["--model", tiny_bert_dir, "--sts-dir", sts_dir, "--tasks", "STSB-dev",
                 "--out", str(tmp_path / "d")]) == 0  # evaluation only: one model, no deltas
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["after"] is None and report["before"]["pooling"] == "cls"
