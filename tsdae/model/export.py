"""The export format of a trained model, written and read in one place.

``encoder/`` is a folder that both sentence-transformers and plain transformers load, with our own
record of how it pools (``tsdae.json``); ``decoder/`` beside it is the causal LM that reconstructs a
sentence from its vector (the reference implementation never saves it). ``model_pooling`` reads the
pooling back from this format, or from any sentence-transformers folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec

from tsdae.model.autoencoder import TSDAE
from tsdae.model.config import POOLINGS

# Our poolings and the sentence-transformers Pooling flag that stands for each: written by export_encoder,
# read back by model_pooling.
ST_POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
# sentence-transformers modules that leave the cosine of two embeddings as our encoder computes it.
COSINE_SAFE_MODULES = {"Transformer", "Pooling", "Normalize"}
TSDAE_META = "tsdae.json"


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
    pooling.update({flag: mode == model.pooling for mode, flag in ST_POOLING_FLAGS.items()})
    _write_json(path / "1_Pooling" / "config.json", pooling)
    _write_json(path / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
    _write_json(path / TSDAE_META, {"pooling": model.pooling, "max_seq_length": max_seq_length})
    return path


def export_decoder(model: TSDAE, tokenizer, path: str | Path) -> Path:
    """Write the decoder (a causal LM with cross-attention) with its tokenizer, loadable with
    ``AutoModelForCausalLM.from_pretrained``. With tied weights its body is a copy of the encoder's."""
    path = Path(path)
    model.decoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _read_json(fs, path: str):
    with fs.open(path, "r") as f:
        return json.load(f)


def model_pooling(model_dir: str, pooling: str = "auto") -> str:
    """The pooling to embed with a model folder (local path or fsspec URI).

    An explicit "cls"/"mean"/"max" wins. "auto" reads ``tsdae.json`` (our export), else the
    sentence-transformers ``modules.json`` + Pooling config, else falls back to "cls" (a bare Hugging Face
    encoder; the TSDAE paper's pooling). A sentence-transformers pipeline with modules that change the
    cosine (Dense, …) or a pooling we do not implement raises ValueError rather than give wrong numbers.
    """
    if pooling != "auto":
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'auto' or one of {POOLINGS}, got {pooling!r}")
        return pooling
    fs, root = fsspec.core.url_to_fs(model_dir)
    join = lambda *parts: "/".join([root.rstrip("/"), *parts])  # noqa: E731
    if fs.exists(join(TSDAE_META)):
        return _read_json(fs, join(TSDAE_META))["pooling"]
    if not fs.exists(join("modules.json")):
        return "cls"
    modules = _read_json(fs, join("modules.json"))
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    unsupported = sorted(set(kinds) - COSINE_SAFE_MODULES)
    if unsupported:
        raise ValueError(f"{model_dir}: sentence-transformers modules {unsupported} are not supported "
                         f"(only {sorted(COSINE_SAFE_MODULES)})")
    if "Pooling" not in kinds:
        return "cls"
    config = _read_json(fs, join(kinds["Pooling"]["path"], "config.json"))
    flags = {flag: mode for mode, flag in ST_POOLING_FLAGS.items()}
    modes = [mode for flag, mode in flags.items() if config.get(flag)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in flags]
    if len(modes) != 1 or others:
        raise ValueError(f"{model_dir}: pooling {modes + others} is not one of {POOLINGS}")
    return modes[0]
