"""A faster forward of a BERT TSDAE decoder, numerically equal to the Hugging Face one in fp32.

The decoder's weights stay in the Hugging Face modules (``BertLMHeadModel``): this file only changes
*which* products are computed, through the modules' public attributes, so tying, DDP, checkpoints and
export see the same model. Two facts of TSDAE make work disappear:

1. The cross-attention memory is one vector per sentence. A softmax over one key is exactly 1, so the
   per-token query and key projections do no useful work (they cannot change the output; their gradient
   is zero up to float rounding: build_tsdae freezes them). The context of every token is the sentence's value vector, and the output projection
   of that context is computed once per sentence instead of once per token. Attention dropout still
   drops each (token, head) weight with probability p and scales survivors by 1/(1-p), as Hugging Face's
   attention does: the output projection is split per head (``u_BNH``), so a dropped head costs N·H per
   token instead of H·H.
2. Labels that are padding are ignored by the loss, so the LM head (transform + the hidden×vocab
   projection, about half the decoder's FLOPs) runs only at positions whose label is a real token.

Anything but a BERT causal LM with cross-attention falls back to the plain Hugging Face call
(``supports_fast_decoder`` is False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertLMHeadModel

from tsdae.model.fast.dropout import dropout_multiplier
from tsdae.model.fast.encoder import bert_embeddings, packed_self_attention
from tsdae.model.fast.linear import bucket_rows, layer_on_onednn, linear_of


def supports_fast_decoder(decoder: nn.Module) -> bool:
    """True for a Hugging Face BERT causal LM with cross-attention (the layout this file relies on)."""
    config = getattr(decoder, "config", None)
    return (
        isinstance(decoder, BertLMHeadModel)
        and bool(getattr(config, "is_decoder", False))
        and bool(getattr(config, "add_cross_attention", False))
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
    )


def cross_attention_projections(decoder: nn.Module) -> list[nn.Parameter]:
    """The cross-attention query and key weights and biases, which the fast path never uses.

    They cannot change the output (the softmax over one key is constant; in the plain path their gradient
    is zero up to float rounding, ~1e-12 measured), so freezing them changes no result; DDP needs them frozen, because it waits for a gradient of every
    parameter that requires one.
    """
    params = []
    for layer in decoder.base_model.encoder.layer:
        attention = layer.crossattention.self
        params += [*attention.query.parameters(), *attention.key.parameters()]
    return params


def _self_attention(attention: nn.Module, x_BTH: torch.Tensor, mask_B1TT: torch.Tensor | None) -> torch.Tensor:
    """Causal multi-head self-attention and its output block (dense, dropout, residual LayerNorm).

    mask_B1TT: None for the fused causal path (right padding only: a real token never sees a pad), or a
    boolean mask, True where a query may attend to a key.
    """
    heads = attention.self
    B, T, H = x_BTH.shape
    N = heads.num_attention_heads
    q_BNTD = heads.query(x_BTH).view(B, T, N, -1).transpose(1, 2)
    k_BNTD = heads.key(x_BTH).view(B, T, N, -1).transpose(1, 2)
    v_BNTD = heads.value(x_BTH).view(B, T, N, -1).transpose(1, 2)
    ctx_BNTD = F.scaled_dot_product_attention(
        q_BNTD, k_BNTD, v_BNTD,
        attn_mask=mask_B1TT,
        dropout_p=heads.dropout.p if attention.training else 0.0,
        is_causal=mask_B1TT is None,
        scale=heads.attention_head_size ** -0.5,
    )
    ctx_BTH = ctx_BNTD.transpose(1, 2).reshape(B, T, H)
    return attention.output(ctx_BTH, x_BTH)


def _cross_context_projection(attention: nn.Module, emb_BH: torch.Tensor, T: int) -> torch.Tensor:
    """The projected cross-attention context of every position, proj_BTH (before output dropout/LayerNorm).

    Equal to Hugging Face's BertAttention(is_cross_attention=True) on encoder_hidden_states=emb_BH[:, None]:
    every token's context is the sentence's value vector (times the attention-dropout keep mask).
    """
    heads, out = attention.self, attention.output
    B, H = emb_BH.shape
    v_BH = heads.value(emb_BH)
    p = heads.dropout.p if attention.training else 0.0
    if p == 0.0:
        return out.dense(v_BH)[:, None, :].expand(B, T, H)  # once per sentence, not per token
    keep_BTN = dropout_multiplier(torch.Size([B, T, heads.num_attention_heads]), p, v_BH.dtype, v_BH.device)
    return project_dropped_heads(out.dense, v_BH, keep_BTN)


def _single_key_cross_attention(attention: nn.Module, x_BTH: torch.Tensor, emb_BH: torch.Tensor) -> torch.Tensor:
    """Cross-attention to a memory of one vector per sentence, and its output block."""
    out = attention.output
    return out.LayerNorm(out.dropout(_cross_context_projection(attention, emb_BH, x_BTH.shape[1])) + x_BTH)


def project_dropped_heads(dense: nn.Linear, v_BH: torch.Tensor, keep_BTN: torch.Tensor) -> torch.Tensor:
    """dense(ctx_BTH) where ctx[b, t, head n] = keep_BTN[b, t, n] · v_BH[b, head n], without forming ctx.

    dense(keep ⊙ v) = Σ_n keep_n · (W[:, head n's columns] v_n) + bias: each head is projected once per
    sentence (u_BNH, B·H² FLOPs) and mixed per token (N·H per token instead of H·H).
    """
    B, H = v_BH.shape
    N = keep_BTN.shape[-1]
    u_BNH = torch.einsum("hnd,bnd->bnh", dense.weight.view(-1, N, H // N), v_BH.view(B, N, -1))
    proj_BTH = torch.bmm(keep_BTN, u_BNH)
    return proj_BTH if dense.bias is None else proj_BTH + dense.bias


def decoder_hidden_states(
    decoder: nn.Module,
    emb_BH: torch.Tensor,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor | None = None,
    *,
    single_key_cross_attention: bool = True,
    sparse_grad: bool | None = None,
) -> torch.Tensor:
    """The decoder body's last hidden states, hidden_BTH, for input_ids_BT cross-attending to emb_BH.

    attention_mask_BT: None (causal only; right padding is invisible to real tokens) or 1 for real
    tokens, 0 for padding. single_key_cross_attention=False runs the full query/key/softmax path
    (through the Hugging Face module), for comparison. sparse_grad: see tsdae.model.fast.encoder.bert_embeddings.
    """
    bert = decoder.base_model
    x_BTH = bert_embeddings(bert.embeddings, input_ids_BT, sparse_grad)
    B, T, _ = x_BTH.shape
    mask_B1TT = None
    if attention_mask_BT is not None:
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=x_BTH.device).tril()
        mask_B1TT = causal_TT & attention_mask_BT.bool()[:, None, None, :]
    memory_B1H = emb_BH[:, None, :]
    for layer in bert.encoder.layer:
        x_BTH = _self_attention(layer.attention, x_BTH, mask_B1TT)
        if single_key_cross_attention:
            x_BTH = _single_key_cross_attention(layer.crossattention, x_BTH, emb_BH)
        else:
            x_BTH, _ = layer.crossattention(x_BTH, None, memory_B1H, None)
        x_BTH = layer.output(layer.intermediate(x_BTH), x_BTH)
    return x_BTH


def decoder_label_states(decoder: nn.Module, emb_BH: torch.Tensor, input_ids_BT: torch.Tensor,
                         keep_BT: torch.Tensor | None = None, *, sparse_grad: bool | None = None,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states at the positions keep_BT marks, packed: hidden_NH (row-major order,
    as hidden_BTH[keep_BT]).

    keep_BT: the positions whose label is a real token. With right padding they are a prefix of every row
    (the last real input, [SEP], has a padding label), so under causal attention they depend on nothing
    else: every linear layer runs on those N rows only, and only the attention itself sees the padded
    B×T layout. rows: the same positions as flat indices into B×T (tsdae.model.packing.label_rows),
    computed on the CPU; given, keep_BT is not needed and nothing here waits for the device.
    """
    bert = decoder.base_model
    x_BTH = bert_embeddings(bert.embeddings, input_ids_BT, sparse_grad)
    B, T, H = x_BTH.shape
    index_N = keep_BT.reshape(-1).nonzero().squeeze(1) if rows is None else rows
    x_NH = x_BTH.reshape(B * T, H).index_select(0, index_N)
    for layer in bert.encoder.layer:
        x_NH = packed_self_attention(layer.attention, x_NH, index_N, B, T, is_causal=True)
        out = layer.crossattention.output
        proj_NH = _cross_context_projection(layer.crossattention, emb_BH, T).reshape(B * T, H).index_select(0, index_N)
        x_NH = out.LayerNorm(out.dropout(proj_NH) + x_NH)
        x_NH = layer.output(layer.intermediate(x_NH), x_NH)
    return x_NH


def label_logits(decoder: nn.Module, hidden_NH: torch.Tensor, weight_VH: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head (transform + vocabulary projection) on selected positions: logits_NV.

    weight_VH: the vocabulary matrix to project with, if not the head's own (the same values)."""
    if weight_VH is None:
        return decoder.cls(hidden_NH)
    head = decoder.cls.predictions
    return linear_of(head.decoder)(head.transform(hidden_NH), weight_VH, head.decoder.bias)


def bucket_label_rows(decoder: nn.Module, hidden_NH: torch.Tensor, labels_N: torch.Tensor, ignore_index: int = -100
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden_NH and labels_N padded to tsdae.model.fast.linear's row bucket when the LM head runs on oneDNN.

    Padding rows are zero states with label ignore_index: the loss and every gradient are unchanged, and
    the N×vocab logits and their gradient already have the bucketed row count, so the head's oneDNN
    products need no padded copy of them. Elsewhere both come back as they are.
    """
    n = hidden_NH.shape[0]
    if not layer_on_onednn(decoder.cls.predictions.decoder, hidden_NH):
        return hidden_NH, labels_N
    rows = bucket_rows(n)
    return F.pad(hidden_NH, (0, 0, 0, rows - n)), F.pad(labels_N, (0, rows - n), value=ignore_index)
