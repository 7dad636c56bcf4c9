"""The DSpark training objective (paper Sec. 3.3): cross-entropy, total variation and confidence BCE.

All terms are weighted per block position by w_k = exp(-(k-1)/gamma): early positions matter more under
prefix verification. The target distribution is known through its top-k probabilities; the target mass
outside them (or outside the draft vocabulary) counts as unreachable for the drafter in the TV distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    confidence: float = 1.0


def position_weights(gamma: int, decay: float | None = None) -> torch.Tensor:
    """w_k = exp(-(k-1)/decay) for k = 1..gamma; the decay defaults to gamma (DeepSpec uses 4 at gamma 7)."""
    return torch.exp(-torch.arange(gamma, dtype=torch.float32) / (decay or gamma))


def target_distribution(topk_ids: torch.Tensor, topk_probs: torch.Tensor, vocab: int) -> torch.Tensor:
    """Dense [.., vocab] target probabilities from top-k draft ids (id == vocab: outside, dropped)."""
    dense = torch.zeros(*topk_ids.shape[:-1], vocab + 1, dtype=topk_probs.dtype, device=topk_probs.device)
    return dense.scatter_add_(-1, topk_ids, topk_probs)[..., :vocab]


def total_variation(draft_log_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """0.5 * ||p_d - p_t||_1 with target mass missing from `target_probs` counted in full."""
    missing = (1 - target_probs.sum(-1)).clamp_min(0)
    return 0.5 * ((draft_log_probs.exp() - target_probs).abs().sum(-1) + missing)


def drafter_loss(
    logits: torch.Tensor,
    confidence_logits: torch.Tensor,
    labels: torch.Tensor,
    target_probs: torch.Tensor,
    valid: torch.Tensor,
    weights: LossWeights = LossWeights(),  # noqa: B008 - frozen defaults
    decay: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """logits [blocks, gamma, V]; confidence_logits, labels (draft ids, V = outside), valid: [blocks, gamma];
    target_probs [blocks, gamma, V]. Returns the loss and its parts (floats, for logging)."""
    vocab = logits.shape[-1]
    w = position_weights(logits.shape[1], decay).to(logits.device) * valid
    norm = valid.shape[0]
    log_q = torch.log_softmax(logits.float(), dim=-1)
    in_vocab = labels < vocab
    ce = -log_q.gather(-1, labels.clamp_max(vocab - 1)[..., None]).squeeze(-1) * in_vocab
    tv = total_variation(log_q, target_probs.float())
    conf = F.binary_cross_entropy_with_logits(confidence_logits.float(), (1 - tv).detach(), reduction="none")
    parts = {"ce": (w * ce).sum() / norm, "tv": (w * tv).sum() / norm, "confidence": (w * conf).sum() / norm}
    loss = weights.ce * parts["ce"] + weights.tv * parts["tv"] + weights.confidence * parts["confidence"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}
