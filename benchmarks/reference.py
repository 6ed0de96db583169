"""The reference implementation: sentence-transformers' DenoisingAutoEncoderLoss, built on the same base
model with our initial weights, and fed our batches."""

from __future__ import annotations

import torch
from sentence_transformers import SentenceTransformer

try:  # sentence-transformers 6
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
except ImportError:  # earlier releases (what a GPU image may bring)
    from sentence_transformers.losses import DenoisingAutoEncoderLoss
    from sentence_transformers.models import Pooling, Transformer

from benchmarks.batches import target_mask
from tsdae.train import Batch


def build_reference(model_path: str, ours, device: str = "cpu") -> torch.nn.Module:
    """DenoisingAutoEncoderLoss (decoder tied to the encoder, CLS pooling, max_seq_length 128) whose
    decoder-only weights (the cross-attention) are ours, so both start from equal weights."""
    st = SentenceTransformer(
        modules=[Transformer(model_path, max_seq_length=128),
                 Pooling(ours.encoder.config.hidden_size, pooling_mode="cls")],
        device=device,
    )
    loss = DenoisingAutoEncoderLoss(st, tie_encoder_decoder=True)
    loss.decoder.load_state_dict(ours.decoder.state_dict())  # tied body = encoder, and the same cross-attention
    loss.decoder.config.pad_token_id = ours.pad_id
    return loss.to(device)


def reference_loss(loss_module, batch: Batch, pad_id: int) -> torch.Tensor:
    """The reference's loss of a batch: its features are (noisy input, target), each with its mask."""
    features = [{"input_ids": batch.noisy_ids, "attention_mask": batch.noisy_mask},
                {"input_ids": batch.target_ids, "attention_mask": target_mask(batch, pad_id)}]
    return loss_module(features, labels=None)
