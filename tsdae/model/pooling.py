"""Sentence pooling over token states: the one implementation used in training, evaluation and export."""

from __future__ import annotations

import torch


def pool(hidden_BTH: torch.Tensor, mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states into one vector per sentence.

    hidden_BTH: last hidden states; mask_BT: 1 for real tokens, 0 for padding.
    mode: "cls" (first token, the TSDAE paper's choice), "mean" or "max" over real tokens.
    Returns emb_BH. Matches sentence-transformers' Pooling module for the same mode.
    """
    if mode == "cls":
        return hidden_BTH[:, 0]
    mask_BT1 = mask_BT.unsqueeze(-1).to(hidden_BTH.dtype)
    if mode == "mean":
        return (hidden_BTH * mask_BT1).sum(1) / mask_BT1.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden_BTH.masked_fill(mask_BT1 == 0, torch.finfo(hidden_BTH.dtype).min).amax(1)
    raise ValueError(f"unknown pooling {mode!r}; expected cls, mean or max")
