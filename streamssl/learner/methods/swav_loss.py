"""The swapped-prediction loss of SwAV (Caron et al. 2020, eq. 1-2).

For every assignment view s (``crops_for_assign``, the global views) the codes q_s are computed by Sinkhorn
and predicted from every *other* view t with p_t = softmax(z_t^T C / temperature):

    loss = 1/|A| * sum_{s in A} 1/(V-1) * sum_{t != s} mean_b [ - sum_k q_s[b, k] log p_t[b, k] ]

exactly as the authors' ``swav_loss`` averages it. Codes carry no gradient: they are targets; gradients reach
trunk, head and prototypes only through the predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def swapped_prediction_loss(scores: Tensor, codes: Sequence[Tensor], crops_for_assign: Sequence[int],
                            n_views: int, temperature: float) -> Tensor:
    """SwAV loss from the scores of all views and the codes of the assignment views.

    Args:
        scores: (V*B, K) prototype scores of every view, view-major (rows v*B .. (v+1)*B-1 are view v).
        codes: one (B, K) code tensor per entry of ``crops_for_assign``; detached inside regardless.
        crops_for_assign: indices of the views whose codes are predicted.
        n_views: V, number of views.
        temperature: softmax temperature of the predictions.

    Returns:
        scalar loss (float32).
    """
    if len(codes) != len(crops_for_assign):
        raise ValueError("one code tensor per assignment view is needed")
    batch = scores.shape[0] // n_views
    log_p = torch.log_softmax(scores.float() / temperature, dim=1).view(n_views, batch, -1)  # (V, B, K)
    total = scores.new_zeros((), dtype=torch.float32)
    for s, q in zip(crops_for_assign, codes, strict=True):
        others = [t for t in range(n_views) if t != s]
        q = q.detach().float()  # (B, K)
        # mean over the other views and the batch of the cross-entropy between q_s and p_t
        cross = -(q.unsqueeze(0) * log_p[others]).sum(dim=2)  # (V-1, B)
        total = total + cross.mean()
    return total / len(crops_for_assign)
