"""Load the STS evaluation suite (SentEval / SimCSE layout) from local files.

Layout under ``sts_dir`` (see the data README):
  STS12-en-test … STS16-en-test/  STS.input.<subset>.txt (sentence1 TAB sentence2)
                                  STS.gs.<subset>.txt     (gold score a line; empty line = unscored pair)
  STSBenchmark/sts-{dev,test}.csv genre, file, year, id, score, sentence1, sentence2[, extra fields…]
  SICK/SICK_test_annotated.txt    header; pair_ID, sentence_A, sentence_B, relatedness_score, …

Sentences are kept exactly as the files have them (no quoting rules: STS-B sentences contain ``"``).
Malformed lines raise ``ValueError`` naming the file and the 1-based line number.

Custom sets (``load_custom``): a parquet, CSV or TSV file at any fsspec URI with a sentence1, sentence2
and score column (names configurable). A row with a missing or non-numeric score or an empty sentence
is never silently dropped: it is skipped and listed (``on_bad_rows: report``) or refuses the file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tsdae.eval.config import STS_TASKS, CustomStsConfig, EvalConfig
from tsdae.model_cache import fetch_model, is_remote

MAX_BAD_ROW_EXAMPLES = 20

_YEAR_FOLDERS = {f"STS1{i}": f"STS1{i}-en-test" for i in range(2, 7)}
_STSB_FILES = {"STSB-test": "sts-test.csv", "STSB-dev": "sts-dev.csv"}
_SICK_FILE = ("SICK", "SICK_test_annotated.txt")


@dataclass(frozen=True)
class StsSubset:
    """One scored set of sentence pairs: sentences1[i] and sentences2[i] have gold score scores[i]."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray  # (N,) float64

    def __len__(self) -> int:
        return len(self.scores)


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without their line ends (CRLF and LF alike); a final newline adds no
    empty line. Raises FileNotFoundError naming the path."""
    if not path.is_file():
        raise FileNotFoundError(f"STS file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n") if text else []


def _score(value: str, path: Path, lineno: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: score {value!r} is not a number") from None


def _fields(line: str, path: Path, lineno: int, min_fields: int, max_fields: int | None = None) -> list[str]:
    fields = line.split("\t")
    if len(fields) < min_fields or (max_fields is not None and len(fields) > max_fields):
        expected = str(min_fields) if max_fields == min_fields else f"at least {min_fields}"
        raise ValueError(f"{path}:{lineno}: expected {expected} tab-separated fields, got {len(fields)}")
    return fields


def load_year_subset(folder: Path, subset: str) -> StsSubset:
    """One SemEval subset: ``STS.input.<subset>.txt`` paired line by line with ``STS.gs.<subset>.txt``.
    Pairs whose gold line is empty are dropped (SentEval does the same)."""
    input_path = folder / f"STS.input.{subset}.txt"
    gold_path = folder / f"STS.gs.{subset}.txt"
    inputs, golds = _read_lines(input_path), _read_lines(gold_path)
    if len(inputs) != len(golds):
        raise ValueError(f"{input_path} has {len(inputs)} lines but {gold_path} has {len(golds)}")
    s1, s2, scores = [], [], []
    for lineno, (line, gold) in enumerate(zip(inputs, golds), start=1):
        a, b = _fields(line, input_path, lineno, 2, 2)
        if not gold.strip():
            continue
        s1.append(a)
        s2.append(b)
        scores.append(_score(gold.strip(), gold_path, lineno))
    return StsSubset(subset, s1, s2, np.asarray(scores, dtype=np.float64))


def _subset_names(folder: Path) -> list[str]:
    prefix, suffix = "STS.input.", ".txt"
    names = sorted(p.name[len(prefix):-len(suffix)] for p in folder.glob(f"{prefix}*{suffix}"))
    if not names:
        raise FileNotFoundError(f"no STS.input.*.txt files in {folder}")
    return names


def load_stsb(path: Path, name: str) -> StsSubset:
    """STS-B: tab-separated, score/sentence1/sentence2 in columns 4/5/6 (0-based); extra trailing fields
    (source tags on some lines) are ignored."""
    s1, s2, scores = [], [], []
    for lineno, line in enumerate(_read_lines(path), start=1):
        fields = _fields(line, path, lineno, 7)
        scores.append(_score(fields[4], path, lineno))
        s1.append(fields[5])
        s2.append(fields[6])
    return StsSubset(name, s1, s2, np.asarray(scores, dtype=np.float64))


def load_sick(path: Path, name: str) -> StsSubset:
    """SICK: a header line, then pair_ID, sentence_A, sentence_B, relatedness_score, … tab-separated."""
    lines = _read_lines(path)
    if not lines:
        raise ValueError(f"{path}: empty file (expected a header line)")
    header = lines[0].split("\t")
    try:
        ia, ib, iscore = (header.index(c) for c in ("sentence_A", "sentence_B", "relatedness_score"))
    except ValueError:
        raise ValueError(f"{path}:1: header must name sentence_A, sentence_B and relatedness_score") from None
    s1, s2, scores = [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = _fields(line, path, lineno, len(header), len(header))
        scores.append(_score(fields[iscore], path, lineno))
        s1.append(fields[ia])
        s2.append(fields[ib])
    return StsSubset(name, s1, s2, np.asarray(scores, dtype=np.float64))


def task_path(sts_dir: str, task: str) -> Path:
    """The folder (STS12–16) or file (STS-B, SICK-R) a task of STS_TASKS is read from."""
    root = Path(sts_dir)
    if task in _YEAR_FOLDERS:
        return root / _YEAR_FOLDERS[task]
    if task in _STSB_FILES:
        return root / "STSBenchmark" / _STSB_FILES[task]
    if task == "SICK-R":
        return root.joinpath(*_SICK_FILE)
    raise ValueError(f"unknown STS task {task!r}; known: {list(STS_TASKS)}")


def missing_tasks(sts_dir: str, tasks: list[str]) -> list[str]:
    """The tasks whose data is not under sts_dir, a local folder or any fsspec URI (checked before a job
    starts anything)."""
    if not is_remote(sts_dir):
        return [task for task in tasks if not task_path(sts_dir.removeprefix("file://"), task).exists()]
    fs, root = fsspec.core.url_to_fs(sts_dir)
    return [task for task in tasks if not fs.exists(f"{root.rstrip('/')}/{task_path('', task).as_posix()}")]


def load_task(sts_dir: str, task: str) -> list[StsSubset]:
    """The subsets of one task of STS_TASKS: STS12–16 give one subset per input file (sorted by name),
    STSB-test, STSB-dev and SICK-R one subset each (named after the task)."""
    path = task_path(sts_dir, task)
    if task in _YEAR_FOLDERS:
        if not path.is_dir():
            raise FileNotFoundError(f"STS folder not found for {task}: {path}")
        return [load_year_subset(path, subset) for subset in _subset_names(path)]
    if task in _STSB_FILES:
        return [load_stsb(path, task)]
    return [load_sick(path, task)]


def load_tasks(sts_dir: str, tasks: list[str]) -> dict[str, list[StsSubset]]:
    """``{task: load_task(sts_dir, task)}`` for each task, in the given order. sts_dir may be a URI: the
    folder is then fetched into this node's cache first (``tsdae.model_cache``, checked and shared by the
    processes of a node), where the evaluation runs."""
    local = fetch_model(sts_dir)
    return {task: load_task(local, task) for task in tasks}


def _custom_format(cfg: CustomStsConfig) -> str:
    if cfg.format:
        return cfg.format
    name = cfg.uri.rsplit("/", 1)[-1].lower()
    for suffix, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"), (".tsv", "tsv"),
                        (".txt", "tsv")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"custom STS set {cfg.name!r}: cannot tell the format of {cfg.uri!r}; set format")


def _read_columns(cfg: CustomStsConfig) -> dict[str, list]:
    """The three configured columns as Python lists (CSV/TSV cells as strings, "" for an empty cell)."""
    columns = [cfg.sentence1_column, cfg.sentence2_column, cfg.score_column]
    fmt = _custom_format(cfg)
    with fsspec.open(cfg.uri, "rb") as f:
        if fmt == "parquet":
            table = pq.read_table(f)
            available = table.column_names
            data = {c: table.column(c).to_pylist() for c in columns if c in available}
        else:
            # Every cell a string and no NA guessing, so that we, not pandas, decide what is bad. TSV has
            # no quoting (STS files put bare `"` inside sentences); CSV follows RFC 4180.
            frame = pd.read_csv(f, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False,
                                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
            available = list(frame.columns)
            data = {c: frame[c].tolist() for c in columns if c in available}
    missing = [c for c in columns if c not in data]
    if missing:
        raise ValueError(f"custom STS set {cfg.name!r} ({cfg.uri}): no column(s) {missing}; has {available}")
    return data


def _bad_reason(s1, s2, score) -> str | tuple[str, float]:
    """Why a row is unusable, or ("", score) for a good one."""
    for label, sentence in (("sentence1", s1), ("sentence2", s2)):
        if sentence is None or not isinstance(sentence, str) or not sentence.strip():
            return f"empty {label}"
    if score is None or (isinstance(score, str) and not score.strip()):
        return "missing score"
    try:
        value = float(score)
    except (TypeError, ValueError):
        return f"score {score!r} is not a number"
    if not math.isfinite(value):
        return "missing score" if math.isnan(value) else f"score {score!r} is not finite"
    return "", value


def load_custom(cfg: CustomStsConfig) -> tuple[StsSubset, dict]:
    """A custom STS set as one subset named ``cfg.name``, and its bad rows.

    Returns (subset, {"n_rows", "n_bad", "examples": [{"row", "reason"}, …]}); rows are 0-based data
    rows (a CSV/TSV header is not counted), at most MAX_BAD_ROW_EXAMPLES examples. Raises ValueError
    for a missing column, and for any bad row when ``cfg.on_bad_rows == "error"``.
    """
    data = _read_columns(cfg)
    s1, s2, scores, bad = [], [], [], []
    rows = zip(data[cfg.sentence1_column], data[cfg.sentence2_column], data[cfg.score_column])
    n_rows = 0
    for row, (a, b, score) in enumerate(rows):
        n_rows += 1
        verdict = _bad_reason(a, b, score)
        if isinstance(verdict, str):
            bad.append({"row": row, "reason": verdict})
            continue
        s1.append(a)
        s2.append(b)
        scores.append(verdict[1])
    if bad and cfg.on_bad_rows == "error":
        shown = "; ".join(f"row {e['row']}: {e['reason']}" for e in bad[:5])
        raise ValueError(f"custom STS set {cfg.name!r} ({cfg.uri}): {len(bad)} bad row(s): {shown}")
    issues = {"n_rows": n_rows, "n_bad": len(bad), "examples": bad[:MAX_BAD_ROW_EXAMPLES]}
    return StsSubset(cfg.name, s1, s2, np.asarray(scores, dtype=np.float64)), issues


def load_suite(cfg: EvalConfig, tasks: list[str] | None = None) -> tuple[dict[str, list[StsSubset]], dict]:
    """The standard tasks (``tasks``, default cfg.tasks) then cfg.custom_sets, each custom set a task of
    one subset. Returns (subsets_by_task, bad_rows_by_task) where the second maps each custom set with
    bad rows to ``load_custom``'s report."""
    subsets_by_task = load_tasks(cfg.sts_dir, list(cfg.tasks if tasks is None else tasks))
    bad_rows = {}
    for custom in cfg.custom_sets:
        subset, issues = load_custom(custom)
        subsets_by_task[custom.name] = [subset]
        if issues["n_bad"]:
            bad_rows[custom.name] = issues
    return subsets_by_task, bad_rows
