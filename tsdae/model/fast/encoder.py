"""A faster training forward of a BERT encoder on padded noisy input, equal to the Hugging Face one at
every real token (fp32, within float rounding; tested).

The noisy sentences of a batch are padded to the longest one, and deletion makes their lengths vary even
when the batch was built from sentences of similar length: on the benchmark corpus 25% of the encoder's
positions are padding. Here the linear layers (query/key/value, attention output, feed-forward: nearly
all of the encoder's FLOPs) run on the real tokens only, packed into one N×H matrix; only the attention
itself, which is cheap, sees the padded B×S layout, with padding keys masked out as Hugging Face masks
them. Padding positions of the returned hidden states are zero; every pooling ignores them. With CLS
pooling the sentence vector is the first token's state alone, so the last layer computes keys and
values for every token and everything else for the first token only.

On CPU the word embeddings are looked up with sparse gradients (here and in tsdae.model.fast.decoder): the
tied vocabulary matrix then gets one dense gradient (the LM head's) plus two sparse row updates, instead
of three dense vocab × hidden gradients that are zero-filled and summed every step (+2% sentences/s).

The weights stay in the Hugging Face modules, read through their public attributes, so tying, DDP,
checkpoints and export see the same model. Anything but a BERT encoder takes the plain call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel


def supports_fast_encoder(encoder: nn.Module) -> bool:
    """True for a Hugging Face BertModel used as a plain bidirectional encoder with absolute positions."""
    config = getattr(encoder, "config", None)
    return (
        isinstance(encoder, BertModel)
        and not getattr(config, "is_decoder", False)
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
    )


def sparse_lookups(device: torch.device) -> bool:
    """Whether word-embedding lookups take sparse gradients: on CPU, where summing the tied matrix's three
    gradients densely costs copies of a vocab × hidden matrix every step (see the module doc). Not on GPUs:
    there the dense sum is one cheap kernel, and DDP's NCCL all-reduce takes dense gradients only."""
    return device.type == "cpu"


def bert_embeddings(embeddings: nn.Module, input_ids: torch.Tensor, sparse_grad: bool | None = None) -> torch.Tensor:
    """BertEmbeddings(input_ids), the word-embedding lookup's gradient sparse where sparse_grad (None: where
    sparse_lookups says, by the ids' device)."""
    words = embeddings.word_embeddings
    sparse = sparse_lookups(input_ids.device) if sparse_grad is None else sparse_grad
    inputs_embeds = F.embedding(input_ids, words.weight, words.padding_idx, sparse=sparse)
    return embeddings(inputs_embeds=inputs_embeds)


def padded_heads(t_NH: torch.Tensor, index_N: torch.Tensor, B: int, S: int, heads: int) -> torch.Tensor:
    """Packed rows t_NH back into the padded batch, split into heads: B×heads×S×D (zero at padding)."""
    H = t_NH.shape[-1]
    return t_NH.new_zeros(B * S, H).index_copy(0, index_N, t_NH).view(B, S, heads, -1).transpose(1, 2)


def packed_self_attention(attention: nn.Module, x_NH: torch.Tensor, index_N: torch.Tensor, B: int, S: int, *,
                          key_mask_B11S: torch.Tensor | None = None, is_causal: bool = False,
                          query_rows: torch.Tensor | None = None) -> torch.Tensor:
    """A BERT self-attention block (attention, then its output dense/dropout/LayerNorm) on packed tokens
    x_NH (index_N: their positions in the flattened B×S batch); only the attention sees the padded layout.

    query_rows: None for every token, or one packed row per sentence (its first token): then only those
    rows are computed past the keys and values, and the result is B×H.
    """
    heads = attention.self
    n = heads.num_attention_heads
    x_QH = x_NH if query_rows is None else x_NH.index_select(0, query_rows)
    q = heads.query(x_QH)
    q_BnQD = padded_heads(q, index_N, B, S, n) if query_rows is None else q.view(B, 1, n, -1).transpose(1, 2)
    ctx_BnQD = F.scaled_dot_product_attention(
        q_BnQD, padded_heads(heads.key(x_NH), index_N, B, S, n), padded_heads(heads.value(x_NH), index_N, B, S, n),
        attn_mask=key_mask_B11S,
        dropout_p=heads.dropout.p if attention.training else 0.0,
        is_causal=is_causal,
        scale=heads.attention_head_size ** -0.5,
    )
    ctx_BQH = ctx_BnQD.transpose(1, 2).flatten(2)
    ctx_QH = ctx_BQH.reshape(B * S, -1).index_select(0, index_N) if query_rows is None else ctx_BQH.reshape(B, -1)
    return attention.output(ctx_QH, x_QH)


def _packed_layer(layer: nn.Module, x_NH: torch.Tensor, index_N: torch.Tensor, B: int, S: int,
                  key_mask_B11S: torch.Tensor, query_rows: torch.Tensor | None = None) -> torch.Tensor:
    """One BERT encoder layer on packed tokens (see packed_self_attention for query_rows)."""
    x_QH = packed_self_attention(layer.attention, x_NH, index_N, B, S, key_mask_B11S=key_mask_B11S,
                                 query_rows=query_rows)
    return layer.output(layer.intermediate(x_QH), x_QH)


def encoder_hidden_states(encoder: nn.Module, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor,
                          *, first_token_only: bool = False, sparse_grad: bool | None = None,
                          token_rows: torch.Tensor | None = None, first_rows: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """The encoder's last hidden states, hidden_BSH: Hugging Face's at real tokens, zero at padding.

    first_token_only: return only each sentence's first-token state, emb_BH (CLS pooling), computing the
    last layer past its keys and values for those tokens alone. Needs every sentence's first position
    real (right padding); otherwise the full last layer runs.
    token_rows, first_rows: where the real tokens are (tsdae.model.packing: noisy_rows, first_rows),
    computed on the CPU; without them they are found here, which makes the host wait for the device.
    sparse_grad: see bert_embeddings.
    """
    x_BSH = bert_embeddings(encoder.embeddings, input_ids_BS, sparse_grad)
    B, S, H = x_BSH.shape
    index_N = attention_mask_BS.reshape(-1).nonzero().squeeze(1) if token_rows is None else token_rows
    x_NH = x_BSH.reshape(B * S, H).index_select(0, index_N)
    key_mask_B11S = attention_mask_BS.bool()[:, None, None, :]
    layers = list(encoder.encoder.layer)
    if first_token_only and first_rows is None and bool(attention_mask_BS[:, 0].all()):
        first_rows = (index_N % S == 0).nonzero().squeeze(1)  # index_N is sorted: one row per sentence
    if not first_token_only:
        first_rows = None
    for layer in layers[:-1] if first_rows is not None else layers:
        x_NH = _packed_layer(layer, x_NH, index_N, B, S, key_mask_B11S)
    if first_rows is not None:
        return _packed_layer(layers[-1], x_NH, index_N, B, S, key_mask_B11S, query_rows=first_rows)
    hidden_BSH = x_NH.new_zeros(B * S, H).index_copy(0, index_N, x_NH).view(B, S, H)
    return hidden_BSH[:, 0] if first_token_only else hidden_BSH
