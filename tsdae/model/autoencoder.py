"""The TSDAE model: an encoder with pooling, and a decoder that rebuilds the sentence from its vector.

Wang, Reimers & Gurevych (2021), "TSDAE: Using Transformer-based Sequential Denoising Auto-Encoder for
Unsupervised Sentence Embedding Learning", https://arxiv.org/abs/2104.06979
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from tsdae.model.config import ModelConfig
from tsdae.model.fast.dropout import use_fast_dropout
from tsdae.model.fast.encoder import encoder_hidden_states, supports_fast_encoder
from tsdae.model.fast.decoder import (
    bucket_label_rows,
    cross_attention_projections,
    decoder_hidden_states,
    decoder_label_states,
    label_logits,
    supports_fast_decoder,
)
from tsdae.model.fast.linear import use_fast_linear
from tsdae.model.packing import Packing
from tsdae.model_cache import fetch_model
from tsdae.model.pooling import pool


class ModelError(ValueError):
    """A model that cannot be used for TSDAE; the message names the model."""


def tsdae_loss(
    decoder: nn.Module,
    emb_BH: torch.Tensor,
    target_ids_BT: torch.Tensor,
    pad_id: int,
    decoder_attention_mask_BT: torch.Tensor | None = None,
    *,
    fast: bool = True,
    output_weight: torch.Tensor | None = None,
    label_rows: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruction loss: the decoder predicts target token t+1 from tokens <= t and the sentence vector.

    target_ids_BT: the original sentence with special tokens, padded on the RIGHT with pad_id.
    emb_BH: one vector per sentence; the decoder cross-attends to it as a length-1 memory.
    Decoder input = target without its last position; labels = target shifted by one; padding labels are
    ignored. No decoder attention mask by default: with right padding and causal self-attention a real
    token never sees a pad, so the loss is identical with or without one (tested), and skipping the mask
    keeps attention on its fused causal path. Returns the mean cross-entropy over non-pad labels.
    fast: for a BERT decoder, run tsdae.model.fast.decoder (same loss within float rounding, tested): no
    per-token cross-attention query/key work, and the LM head only at non-pad labels. Other decoders,
    and fast=False, take the plain Hugging Face call (the reference's computation).
    output_weight: the fast path's vocabulary matrix, if not the decoder's own (TSDAE.forward passes it
    through gradient_last).
    label_rows, labels: where the real labels are and what they are (tsdae.model.packing), computed on the
    CPU; without them the fast path finds them here, which makes the host wait for the device.
    """
    input_ids_BT = target_ids_BT[:, :-1]
    labels_BT = target_ids_BT[:, 1:]
    mask = None if decoder_attention_mask_BT is None else decoder_attention_mask_BT[:, :-1]
    if fast and supports_fast_decoder(decoder):
        if label_rows is None or labels is None:
            keep_BT = labels_BT != pad_id
            label_rows, labels = keep_BT.reshape(-1).nonzero().squeeze(1), labels_BT[keep_BT]
        if mask is None:
            hidden_NH = decoder_label_states(decoder, emb_BH, input_ids_BT, rows=label_rows)
        else:
            hidden_NH = decoder_hidden_states(decoder, emb_BH, input_ids_BT, mask).flatten(0, 1)[label_rows]
        hidden_NH, labels_N = bucket_label_rows(decoder, hidden_NH, labels)
        logits_NV = label_logits(decoder, hidden_NH, output_weight)
        return F.cross_entropy(logits_NV.float(), labels_N)  # bucket rows: label -100, ignored
    logits_BTV = decoder(
        input_ids=input_ids_BT,
        attention_mask=mask,
        encoder_hidden_states=emb_BH[:, None, :],
        use_cache=False,
    ).logits
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=pad_id)


class _GradientLast(torch.autograd.Function):
    """The identity, as a marker: its backward runs after everything created after it in the forward.

    Autograd runs the ready backward nodes latest-created first, so applied to the tied vocabulary matrix
    at the start of the forward, the LM head's dense gradient reaches the matrix after the two sparse
    word-embedding lookups' (tsdae.model.fast.encoder). Autograd adds a sparse gradient to a dense one out of
    place, copying the 47 MB matrix: in the natural order (dense first) that happens twice per step; in
    this order the two sparse gradients are summed sparsely first and only the last addition can copy
    (profiled: copy + add 21 → 7 ms per step; +1.9% sentences/s). That last one is in place too when the
    head's gradient is a fresh tensor, as tsdae.model.fast.linear's oneDNN path returns it (F.linear's is a view, so
    autograd copies). The sum is the same.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def gradient_last(x: torch.Tensor) -> torch.Tensor:
    """x, through _GradientLast: call it before the rest of the forward."""
    return _GradientLast.apply(x)


class TSDAE(nn.Module):
    """Encoder + pooling + decoder in one module, so one DDP wrapper synchronises all of their gradients.

    forward(noisy_input_ids_BS, noisy_attention_mask_BS, target_ids_BT) -> scalar loss.
    fast: train through tsdae.model.fast.encoder / tsdae.model.fast.decoder where the model is BERT (same loss within
    float rounding, tested); False: the plain Hugging Face calls (the reference's computation).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, pooling: str, pad_id: int, fast: bool = True):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.pooling = pooling
        self.pad_id = pad_id
        self.fast = fast

    def embed(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor,
              packing: Packing | None = None) -> torch.Tensor:
        """emb_BH of right-padded noisy input; packing (tsdae.model.packing) spares the fast path a sync."""
        if self.fast and supports_fast_encoder(self.encoder):
            rows = {} if packing is None else {"token_rows": packing.noisy_rows, "first_rows": packing.first_rows}
            if self.pooling == "cls":  # only the first token's last-layer state is needed
                return encoder_hidden_states(self.encoder, input_ids_BS, attention_mask_BS, first_token_only=True,
                                             **rows)
            hidden_BSH = encoder_hidden_states(self.encoder, input_ids_BS, attention_mask_BS, **rows)
        else:
            hidden_BSH = self.encoder(input_ids=input_ids_BS, attention_mask=attention_mask_BS).last_hidden_state
        return pool(hidden_BSH, attention_mask_BS, self.pooling)

    def forward(self, noisy_input_ids, noisy_attention_mask, target_ids, packing: Packing | None = None):
        """The mean reconstruction loss of a batch. packing: where its real tokens are, computed on the CPU
        (tsdae.train.batch); without it the fast paths find them on the device (a host sync each)."""
        output_weight = None
        if self.fast and supports_fast_decoder(self.decoder):
            output_weight = gradient_last(self.decoder.get_output_embeddings().weight)
        emb_BH = self.embed(noisy_input_ids, noisy_attention_mask, packing)
        labels = {} if packing is None else {"label_rows": packing.label_rows, "labels": packing.labels}
        return tsdae_loss(self.decoder, emb_BH, target_ids, self.pad_id, fast=self.fast, output_weight=output_weight,
                          **labels)


def tie_decoder_to_encoder(encoder: nn.Module, decoder: nn.Module) -> int:
    """Make the decoder's body share the encoder's parameters, by module path, through public attributes.

    Every parameter of ``decoder.base_model`` whose module path and name also exist in the encoder is
    replaced by the encoder's Parameter object (the encoder stays the owner, so exporting it needs no
    untying). Decoder-only parameters (cross-attention, LM head transform) stay the decoder's own. The
    LM head's output matrix is re-pointed at the shared word embeddings when the config ties them.
    Returns the number of tied parameters.
    """
    encoder_modules = dict(encoder.named_modules())
    tied = 0
    for module_name, module in decoder.base_model.named_modules():
        source = encoder_modules.get(module_name)
        if source is None:
            continue
        for attr, param in list(module.named_parameters(recurse=False)):
            shared = getattr(source, attr, None)
            if isinstance(shared, nn.Parameter) and shared.shape == param.shape:
                setattr(module, attr, shared)
                tied += 1
    if getattr(decoder.config, "tie_word_embeddings", False):
        decoder.get_output_embeddings().weight = decoder.get_input_embeddings().weight
    return tied


def _load_decoder(path: str, name: str) -> nn.Module:
    config = AutoConfig.from_pretrained(path)
    config.is_decoder = True
    config.add_cross_attention = True
    try:
        return AutoModelForCausalLM.from_pretrained(path, config=config)
    except ValueError as e:
        raise ModelError(
            f"model {name!r} ({config.model_type}) has no causal-LM class in transformers, so it cannot be "
            f"a TSDAE decoder; use an architecture with a causal-LM head and cross-attention "
            f"(e.g. BERT, RoBERTa, ELECTRA) or set model.decoder_name_or_path"
        ) from e


def _check_decoder_reads_memory(decoder: nn.Module, hidden_size: int, name: str) -> None:
    """Fail fast if the decoder silently ignores encoder_hidden_states (some causal LMs do)."""
    ids = torch.tensor([[decoder.config.pad_token_id or 0, 1]])
    memory = torch.randn(2, 1, hidden_size, generator=torch.Generator().manual_seed(0))
    was_training = decoder.training
    decoder.eval()
    with torch.no_grad():
        a = decoder(input_ids=ids, encoder_hidden_states=memory[:1], use_cache=False).logits
        b = decoder(input_ids=ids, encoder_hidden_states=memory[1:], use_cache=False).logits
    decoder.train(was_training)
    if torch.allclose(a, b):
        raise ModelError(
            f"decoder {name!r} ignores encoder_hidden_states: it has no cross-attention, so it cannot "
            f"reconstruct a sentence from its vector"
        )


def build_tsdae(cfg: ModelConfig) -> tuple[TSDAE, "AutoTokenizer"]:
    """Load the encoder, its tokenizer and a cross-attending decoder (tied to the encoder by default).
    The references are fetched here, by the process that builds the model (``tsdae.model_cache``)."""
    encoder_path = fetch_model(cfg.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    if tokenizer.pad_token_id is None:
        raise ModelError(f"model {cfg.name_or_path!r}: its tokenizer has no pad token")
    encoder = AutoModel.from_pretrained(encoder_path)
    # A pooler head (BERT's) is not used by any of our poolings; frozen, it is kept in the export but
    # gets no gradient and DDP does not wait for one.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler.requires_grad_(False)

    decoder_name = cfg.name_or_path if cfg.tie_decoder else cfg.decoder_name_or_path
    if decoder_name is None:
        raise ModelError("model.tie_decoder is false but model.decoder_name_or_path is not set")
    decoder_path = encoder_path if cfg.tie_decoder else fetch_model(decoder_name)
    if not cfg.tie_decoder:
        decoder_vocab = AutoTokenizer.from_pretrained(decoder_path).get_vocab()
        if decoder_vocab != tokenizer.get_vocab():
            raise ModelError(
                f"decoder {decoder_name!r} and encoder {cfg.name_or_path!r} have different vocabularies; "
                f"TSDAE's decoder must read the encoder's token ids"
            )
    decoder = _load_decoder(decoder_path, decoder_name)
    if decoder.config.hidden_size != encoder.config.hidden_size:
        raise ModelError(
            f"decoder {decoder_name!r} hidden size {decoder.config.hidden_size} != encoder "
            f"{cfg.name_or_path!r} hidden size {encoder.config.hidden_size}"
        )
    _check_decoder_reads_memory(decoder, encoder.config.hidden_size, decoder_name)
    if cfg.tie_decoder:
        if tie_decoder_to_encoder(encoder, decoder) == 0:
            raise ModelError(f"model {cfg.name_or_path!r}: no decoder weight could be tied to the encoder")
    if supports_fast_decoder(decoder):
        # The cross-attention query/key act on a softmax over one key: zero gradient, unused by the fast
        # path. Frozen, they get no optimizer state and DDP waits for no gradient of theirs.
        for param in cross_attention_projections(decoder):
            param.requires_grad_(False)
    model = TSDAE(encoder, decoder, cfg.pooling, tokenizer.pad_token_id)
    use_fast_dropout(model)  # cheaper CPU masks, same p (tsdae.model.fast.dropout); nn.Dropout elsewhere
    use_fast_linear(model)  # fp32 CPU products on oneDNN (tsdae.model.fast.linear); nn.Linear elsewhere
    return model, tokenizer
