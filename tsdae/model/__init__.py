"""The TSDAE model: an encoder with pooling and a decoder that rebuilds the sentence from its vector, the
config that picks them, the export format, and where model references resolve to.

    config       ModelConfig (encoder, pooling, tied or separate decoder)
    autoencoder  TSDAE (one module: encoder + pooling + decoder), tsdae_loss, build_tsdae, weight tying
    pooling      cls / mean / max pooling, used in training, evaluation and export
    export       the encoder/ and decoder/ folders a run produces, and reading a folder's pooling back
    packing      where a batch's real tokens are, computed on the CPU (the step then never waits for the GPU)
    paths        package:, local and URI model references → local folders
    fast/        the training step's fast paths (each opens with what it measured)
"""

from tsdae.model.autoencoder import TSDAE, ModelError, build_tsdae, tie_decoder_to_encoder, tsdae_loss
from tsdae.model.config import POOLINGS, ModelConfig
from tsdae.model.export import export_decoder, export_encoder, model_pooling
from tsdae.model.fast import retain_freed_memory
from tsdae.model.packing import Packing, packing_from_lengths, packing_of
from tsdae.model.paths import check_model_ref, local_model_dir, resolve_model_path
from tsdae.model.pooling import pool

__all__ = [
    "POOLINGS", "TSDAE", "ModelConfig", "ModelError", "Packing", "build_tsdae", "check_model_ref", "export_decoder",
    "export_encoder", "local_model_dir", "model_pooling", "packing_from_lengths", "packing_of", "pool", "resolve_model_path", "retain_freed_memory",
    "tie_decoder_to_encoder", "tsdae_loss",
]
