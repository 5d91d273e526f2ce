"""Multi-token prediction (Gloeckle et al., 2024, "Better & Faster Large Language Models via Multi-token
Prediction"): besides the next token, a second head predicts the token after it (t+2) from the student's
last hidden state, and its cross-entropy is added to NTP's with weight `pretrain.mtp_coef`.

As in that paper, the extra head is one transformer block of the student's width on the shared trunk, read
out by the student's own unembedding (its final LayerNorm and tied embeddings); the block trains, resumes
and syncs with the student and is left out of the exported model, which predicts the next token only (the
paper drops or keeps its extra heads for speculative decoding at inference). It is the control that the
CoCoMix paper lacks: an auxiliary loss of similar cost that needs no teacher, no SAE and no extraction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.model.gpt import GPT, Block
from pipelines.training.objectives import Objective

OFFSET = 2  # the head predicts token t+2 from position t


def future_token_loss(logits: torch.Tensor, tokens: torch.Tensor, offset: int) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the token `offset` places ahead; (B, T, V)."""
    labels = F.pad(tokens[:, offset:], (0, offset), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class MultiTokenPrediction(Objective):
    """NTP + `mtp_coef` x the loss of a head that predicts token t+2."""

    name = "mtp"
    val_parts = ("mtp_loss",)

    def heads(self, student: GPT) -> dict[str, nn.Module]:
        block = Block(student.config)
        block.apply(GPT._init_weights)
        for name, param in block.named_parameters():  # the student's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * student.config.n_layer))
        self.block, self.unembed = block, student.head
        return {"mtp": block}

    def auxiliary(self, out, tokens, inputs):
        logits = self.unembed(self.block(out.hidden))
        return {"mtp_loss": (future_token_loss(logits, tokens, OFFSET), self.setting("mtp_coef"))}
