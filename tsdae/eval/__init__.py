"""STS evaluation: the SentEval/SimCSE protocol on STS12–16, STS-B and SICK-R (and custom sets), the
encoding that feeds it (one process or Ray Data model actors), and the run report with its charts.

    config    EvalConfig, CustomStsConfig, the task names
    sts       the suite's files and custom sets → sentence pairs with gold scores
    protocol  cosine similarity, Spearman ×100, the `all` and `wmean` aggregations (pure)
    encode    SentenceEncoder; evaluate_model_dir (one process)
    actors    the same with the encoding on Ray Data model actors
    run       evaluate_model: the dispatch every job uses (actors, a Ray task, or this process)
    report    report.json / report.md; charts: the PNG charts beside them
"""

from tsdae.eval.actors import evaluate_distributed
from tsdae.eval.charts import write_charts
from tsdae.eval.config import AVERAGE_TASKS, STS_TASKS, CustomStsConfig, EvalConfig
from tsdae.eval.encode import SentenceEncoder, evaluate_model_dir
from tsdae.eval.protocol import evaluate_sts
from tsdae.eval.report import build_report, load_report, render_markdown, write_report
from tsdae.eval.run import evaluate_model
from tsdae.eval.sts import load_suite, load_task, load_tasks, missing_tasks

__all__ = [
    "AVERAGE_TASKS", "STS_TASKS", "CustomStsConfig", "EvalConfig", "SentenceEncoder", "build_report", "evaluate_distributed",
    "evaluate_model", "evaluate_model_dir", "evaluate_sts", "load_report", "load_suite", "load_task", "load_tasks",
    "missing_tasks",
    "render_markdown", "write_charts", "write_report",
]
