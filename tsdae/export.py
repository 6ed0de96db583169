"""Export the trained model: the encoder as a directory that both sentence-transformers and plain
transformers load, and the decoder beside it (the reference implementation never saves it)."""

from __future__ import annotations

import json
from pathlib import Path

from tsdae.model import TSDAE

_POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_encoder(model: TSDAE, tokenizer, path: str | Path, max_seq_length: int) -> Path:
    """Write the encoder to path: Hugging Face weights, config and tokenizer at the top level (so
    ``AutoModel.from_pretrained(path)`` works) plus the sentence-transformers module files (so
    ``SentenceTransformer(path)`` gives the same embeddings as ``model.embed``, pooling included)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    hidden = model.encoder.config.hidden_size
    _write_json(path / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ])
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    (path / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": hidden, "pooling_mode_mean_sqrt_len_tokens": False}
    pooling.update({flag: mode == model.pooling for mode, flag in _POOLING_FLAGS.items()})
    _write_json(path / "1_Pooling" / "config.json", pooling)
    _write_json(path / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
    _write_json(path / "tsdae.json", {"pooling": model.pooling, "max_seq_length": max_seq_length})
    return path


def export_decoder(model: TSDAE, tokenizer, path: str | Path) -> Path:
    """Write the decoder (a causal LM with cross-attention) with its tokenizer, loadable with
    ``AutoModelForCausalLM.from_pretrained``. With tied weights its body is a copy of the encoder's."""
    path = Path(path)
    model.decoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_pooling(path: str | Path, default: str = "cls") -> str:
    """The pooling an exported encoder was trained with (``tsdae.json``), else default."""
    meta = Path(path) / "tsdae.json"
    return json.loads(meta.read_text())["pooling"] if meta.exists() else default
