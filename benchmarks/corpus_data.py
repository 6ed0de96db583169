"""Write an N-row, M-file parquet corpus by resampling the real sentences of a seed corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_SOURCE = "../shared/data/corpus/sentences.parquet"  # relative to the repository root


def generate_corpus(source: str | Path, out_dir: str | Path, rows: int, files: int, *, seed: int = 0,
                    text_column: str = "text") -> list[Path]:
    """Resample (with replacement) `rows` sentences of source's text column into `files` parquet files
    ``part-00000.parquet`` … under out_dir, with a ``source`` column naming the file index. Real text,
    real length distribution; nothing invented. Returns the paths."""
    texts = pq.read_table(source, columns=[text_column]).column(text_column).combine_chunks()
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(np.diff(np.linspace(0, rows, files + 1).astype(np.int64))):
        index = pa.array(rng.integers(0, len(texts), size=int(n)))
        path = out_dir / f"part-{i:05d}.parquet"
        pq.write_table(pa.table({"text": texts.take(index), "source": pa.repeat(str(i), int(n))}), path,
                       row_group_size=16_384)
        paths.append(path)
    return paths
