"""The tsdae-ray command: every subcommand answers --help, KEY=VALUE overrides change the run (read back
from the resolved config.yaml it saves), and a bad override exits 2 naming the key before Ray starts."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from test_nightly import DAYS, FakeStages, _add_day

from jobs import cli
from jobs.config import ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_read_as_yaml_values_and_validated_like_the_file(tmp_path):
    overrides = parse_overrides(["train.lr=1e-4", "scale.num_workers=4", "train.deterministic=true",
                                 "train.max_steps=null", "eval.tasks=[STS16, STSB-test]", "name=a=b"])
    assert overrides == {"train.lr": "1e-4", "scale.num_workers": 4, "train.deterministic": True,
                         "train.max_steps": None, "eval.tasks": ["STS16", "STSB-test"], "name": "a=b"}
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  global_batch_size: 16\nnightly:\n")
    with pytest.raises(ConfigError, match="name"):  # split at the first '=', then validated: not one path name
        load_config(path, overrides)
    overrides["name"] = "a.b-c"
    cfg = load_config(path, {**overrides, "nightly.gate.tolerance": 0.5})  # `nightly:` is null in the file
    assert (cfg.train.lr, cfg.scale.num_workers, cfg.train.deterministic) == (1e-4, 4, True)
    assert cfg.eval.tasks == ["STS16", "STSB-test"] and cfg.nightly.gate.tolerance == 0.5
    for bad, key in ((["train.lr"], "train.lr"), (["=3"], "=3"), (["train.lrr=1e-4"], "train.lrr"),
                     (["scale.num_workers=two"], "scale.num_workers"), (["train.lr.x=1"], "train.lr.x")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(path, parse_overrides(bad))


def test_every_command_answers_help(capsys):
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: tsdae-ray {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    usage = capsys.readouterr().out
    assert all(command in usage for command in cli.COMMANDS)


def test_the_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tsdae-ray": "jobs.cli:main"}


def test_overrides_change_the_run_and_the_resolved_config_is_saved(tmp_path, tiny_bert_dir, monkeypatch):
    """`tsdae-ray run --config … KEY=VALUE …` with the Ray stages replaced by fakes (tests/test_nightly.py):
    the run's config.yaml is the file plus the overrides, and loads back to the config the run used."""
    import jobs.run

    fake = FakeStages(tmp_path, tiny_bert_dir).install(monkeypatch)
    monkeypatch.setattr(jobs.run, "connect_ray", lambda *args: None)
    _add_day(tmp_path / "corpus", DAYS[0], ["a sentence"] * 16)
    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    cfg.update(name="cli", output_dir=str(tmp_path / "runs"), storage_path=str(tmp_path / "ray"))
    cfg["eval"].update(sts_dir=str(ROOT / "data/sts"), tasks=["STS16"])
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    corpus = str(tmp_path / "corpus" / f"date={DAYS[0]}")
    code = cli.main(["run", "--config", str(path), "train.lr=1e-4", "scale.num_workers=4",
                     f"model.name_or_path={tiny_bert_dir}", f"read.uri=[{corpus}]", "--name", "cli-test"])
    assert code == 0
    (out,) = (tmp_path / "runs").glob("cli-test-*")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-4 and saved["scale"]["num_workers"] == 4
    assert saved["train"]["global_batch_size"] == 16 and saved["read"]["uri"] == [corpus]  # the file's, and the list
    assert load_config(out / "config.yaml") == load_config(path, parse_overrides([
        "train.lr=1e-4", "scale.num_workers=4", f"model.name_or_path={tiny_bert_dir}", f"read.uri=[{corpus}]"]))
    assert [c for c in fake.calls if c[0] == "train"] == [("train", tiny_bert_dir, out.name)]


def test_a_bad_override_exits_2_naming_the_key(caplog):
    import jobs.run

    argv = ["-m", "jobs.cli", "run", "--config", "configs/demo.yaml", "train.lrr=1e-4"]
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.lrr" in out.stderr and "command-line overrides" in out.stderr and "Traceback" not in out.stderr
    assert "Started a local Ray instance" not in out.stderr and "=== stage" not in out.stderr
    # `python -m jobs.run` (what `ray job submit` runs) takes the same overrides; a wrong type is named too.
    assert jobs.run.main(["--config", str(ROOT / "configs/demo.yaml"), "scale.num_workers=two"]) == 2
    assert "scale.num_workers" in caplog.text and "'two'" in caplog.text
