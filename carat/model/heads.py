"""CARAT's heads on top of the encoders (Peng et al., AAAI 2024, sections "Label-specific representation",
"Reconstruction" and "Aggregation"): label attention, latent projections, cross-modal reconstruction, per-label
classifiers and the aggregation head. Initialisation follows the reference: xavier-uniform weights (PyTorch's
default bias init) for the heads, kaiming-uniform for the classifier weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LabelAttention(nn.Module):
    """Label-specific attention (the reference's ``MLAttention``): one attention distribution per label.

    forward(hidden [B, L, d], mask [B, L] bool) -> Z [B, C, d] with Z[:, c] = softmax_L(h W_c) @ h, padded
    steps excluded (their score is the dtype's most negative finite number, never -inf, so no NaN).
    """

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.scores = nn.Linear(hidden_size, num_classes, bias=False)
        nn.init.xavier_uniform_(self.scores.weight)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.scores(hidden).transpose(1, 2)  # [B, C, L]
        scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        return weights @ hidden


class ProjectionMLP(nn.Module):
    """Linear(in, mid), ReLU, Linear(mid, out) (the reference's ``MLLinear([in, mid], out)``).

    Used for proj_m (d -> d/2 -> z), de_proj_m (z -> d/2 -> d) and the aggregation head (C*d -> d -> C).
    """

    def __init__(self, in_size: int, mid_size: int, out_size: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_size, mid_size)
        self.output = nn.Linear(mid_size, out_size)
        nn.init.xavier_uniform_(self.hidden.weight)
        nn.init.xavier_uniform_(self.output.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(x)))


class CrossModalReconstruction(nn.Module):
    """tv2a, ta2v, va2t: each modality rebuilt from the other two plus a stand-in for itself (Linear(3d, d)).

    forward(t_in, v_in, a_in, t_self, v_self, a_self) -> (T', V', A') where
    A' = tv2a([t_in; v_in; a_self]), V' = ta2v([t_in; v_self; a_in]), T' = va2t([t_self; v_in; a_in]).
    First round: *_in = r_m, *_self = P_m (prototype decode). Second round: *_in = *_self = the first round.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.tv2a = nn.Linear(3 * hidden_size, hidden_size)
        self.ta2v = nn.Linear(3 * hidden_size, hidden_size)
        self.va2t = nn.Linear(3 * hidden_size, hidden_size)
        for layer in (self.tv2a, self.ta2v, self.va2t):
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, t_in: torch.Tensor, v_in: torch.Tensor, a_in: torch.Tensor, t_self: torch.Tensor,
                v_self: torch.Tensor, a_self: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        audio = self.tv2a(torch.cat([t_in, v_in, a_self], dim=-1))
        visual = self.ta2v(torch.cat([t_in, v_self, a_in], dim=-1))
        text = self.va2t(torch.cat([t_self, v_in, a_in], dim=-1))
        return text, visual, audio


class LabelClassifiers(nn.Module):
    """Per-modality, per-label linear classifiers w_m [C, d] shared by every stage (no bias).

    forward(x [B, 3, C, d] in text, visual, audio order) -> logits [B, 3, C], logit[b, m, c] = <x[b,m,c], w_m[c]>.
    """

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.text_weight = nn.Parameter(torch.empty(num_classes, hidden_size))
        self.visual_weight = nn.Parameter(torch.empty(num_classes, hidden_size))
        self.audio_weight = nn.Parameter(torch.empty(num_classes, hidden_size))
        for weight in (self.text_weight, self.visual_weight, self.audio_weight):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.stack([self.text_weight, self.visual_weight, self.audio_weight])
        return torch.einsum("bmcd,mcd->bmc", x, weights.to(x.dtype))
