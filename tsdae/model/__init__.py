"""The TSDAE model: an encoder with pooling and a decoder that rebuilds the sentence from its vector, the
config that picks them, the export format, and where model references resolve to.

    config       ModelConfig (encoder, pooling, tied or separate decoder)
    autoencoder  TSDAE (one module: encoder + pooling + decoder), tsdae_loss, build_tsdae, weight tying
    pooling      cls / mean / max pooling, used in training, evaluation and export
    export       the encoder/ and decoder/ folders a run produces, and reading a folder's pooling back
    packing      where a batch's real tokens are, computed on the CPU (the step then never waits for the GPU)
    fast/        the training step's fast paths (each opens with what it measured)

Model references (``package:``, local paths, URIs) become local folders where they are used, through the
node-local cache of ``tsdae.model_cache`` (torch-free, so the corpus stage can use it too).
"""

from tsdae.model.autoencoder import TSDAE, ModelError, build_tsdae, tie_decoder_to_encoder, tsdae_loss
from tsdae.model.config import POOLINGS, ModelConfig
from tsdae.model.export import export_decoder, export_encoder, model_pooling
from tsdae.model.fast import retain_freed_memory
from tsdae.model.packing import Packing, packing_from_lengths, packing_of
from tsdae.model.pooling import pool
from tsdae.model_cache import check_model_ref, fetch_model, resolve_model_path

__all__ = [
    "POOLINGS", "TSDAE", "ModelConfig", "ModelError", "Packing", "build_tsdae", "check_model_ref", "export_decoder",
    "export_encoder", "fetch_model", "model_pooling", "packing_from_lengths", "packing_of", "pool", "resolve_model_path", "retain_freed_memory",
    "tie_decoder_to_encoder", "tsdae_loss",
]
