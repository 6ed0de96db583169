"""The corpus stage, on Ray Data (no torch): read and validate parquet, clean, corrupt and tokenize on
CPU actors, order rows for length-aware batches.

    config      ReadConfig (where and what to read), CorruptConfig (noise, tokenization, length windows)
    read        file listing, hive partitions and filters, schema checks, cleaning, keyed rows, counts
    noise       the paper's noise as pure batch functions of (seed, epoch, row key)
    preprocess  CorruptAndTokenize: the tokenizer actor's callable class
    batching    length-aware ordering of token-id rows and the padding it leaves
    dataset     build_train_dataset: the whole training stream; prepared shards written and read back
"""

from pipeline.batching import padding_fraction
from pipeline.config import CorruptConfig, ReadConfig
from pipeline.dataset import build_train_dataset, read_prepared, write_prepared
from pipeline.preprocess import CorruptAndTokenize
from pipeline.read import CorpusError, Partition, corpus_stats, list_partitions, read_corpus, row_keys

__all__ = [
    "CorpusError", "CorruptAndTokenize", "CorruptConfig", "Partition", "ReadConfig", "build_train_dataset", "corpus_stats",
    "list_partitions", "padding_fraction", "read_corpus", "read_prepared", "row_keys", "write_prepared",
]
