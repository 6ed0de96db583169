"""The corpus stage: read and validate parquet, corrupt and tokenize on Ray Data, pad for training.

Names are imported on first use (PEP 562), so that a Ray worker that only needs pipeline.noise or
pipeline.read does not pay for torch (1.5 s of import time per worker process, measured).
"""

from importlib import import_module

_EXPORTS = {
    "CorpusError": "pipeline.read",
    "build_train_dataset": "pipeline.dataset",
    "corpus_stats": "pipeline.read",
    "make_collate_fn": "pipeline.batching",
    "read_corpus": "pipeline.read",
    "read_prepared": "pipeline.dataset",
    "write_prepared": "pipeline.dataset",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
