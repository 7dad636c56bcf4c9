"""Training blocks: anchors sampled in a target response, scored by the drafter in one pass per sequence.

A block anchored at position a feeds the anchor token t_a (plus gamma-1 masks) at positions a..a+gamma-1,
sees the context features of positions < a only, and predicts t_{a+1}..t_{a+gamma}. Position k's
transition/confidence input is the previous *true* token t_{a+k-1} (teacher forcing; at inference it is
the previous draft token, which equals it whenever the prefix survives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.drafters.dspark.model import DSparkDrafter
from dspark.training.data import Sequence
from dspark.training.losses import target_distribution


@dataclass
class BlockBatch:
    anchors: torch.Tensor  # [blocks] anchor positions
    labels: torch.Tensor  # [blocks, gamma] target ids t_{a+k}
    prev_tokens: torch.Tensor  # [blocks, gamma] target ids t_{a+k-1}
    valid: torch.Tensor  # [blocks, gamma] float: the label lies inside the sequence
    target_probs: torch.Tensor  # [blocks, gamma, draft vocab]


@dataclass
class BlockScores:
    logits: torch.Tensor  # [blocks, gamma, draft vocab] base + transition bias
    confidence_logits: torch.Tensor  # [blocks, gamma]
    base_logits: torch.Tensor


def sample_anchors(seq: Sequence, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Up to `count` distinct anchor positions in the response (each has at least one label)."""
    first, last = seq.prompt_len, len(seq.token_ids) - 2
    if last < first:
        return torch.empty(0, dtype=torch.long)
    span = last - first + 1
    picks = torch.randperm(span, generator=generator)[:count]
    return (first + picks).sort().values


def make_blocks(seq: Sequence, anchors: torch.Tensor, drafter: DSparkDrafter) -> BlockBatch:
    gamma, n = drafter.draft_length, len(seq.token_ids)
    label_pos = anchors[:, None] + torch.arange(1, gamma + 1)  # [blocks, gamma]
    valid = label_pos < n
    label_pos = label_pos.clamp_max(n - 1)
    topk_rows = label_pos - seq.prompt_len  # top-k row r: the distribution of token prompt_len + r
    t2d = drafter.target_to_draft.cpu()
    probs = target_distribution(
        t2d[seq.target_topk_ids[topk_rows]],
        seq.target_topk_probs[topk_rows].float(),
        drafter.cfg.draft_vocab,
    )
    return BlockBatch(
        anchors=anchors,
        labels=seq.token_ids[label_pos],
        prev_tokens=seq.token_ids[label_pos - 1],
        valid=valid.float(),
        target_probs=probs,
    )


def block_mask(anchors: torch.Tensor, num_context: int, rows: int) -> torch.Tensor:
    """[blocks*rows, context + blocks*rows] boolean: context before the anchor, and the own block."""
    block_of_row = torch.arange(len(anchors)).repeat_interleave(rows)
    sees_context = torch.arange(num_context)[None, :] < anchors[block_of_row][:, None]
    sees_block = block_of_row[:, None] == block_of_row[None, :]
    return torch.cat((sees_context, sees_block), dim=1)


def score_blocks(drafter: DSparkDrafter, seq: Sequence, batch: BlockBatch) -> BlockScores:
    """Run the drafter over all blocks of one sequence (teacher-forced transition inputs)."""
    device = drafter.fc.weight.device
    num_context = len(seq.features)
    features = drafter.context_features(seq.features.to(device))
    context = drafter.context_keys_values(features, torch.arange(num_context, device=device))
    rows = drafter.cfg.block_size
    mask = block_mask(batch.anchors, num_context, rows).to(device)
    anchors = batch.anchors.to(device)
    ids = seq.token_ids.to(device)[anchors]
    hidden = drafter.backbone(ids, anchors, [context], [len(anchors) * rows], [mask])
    prev = drafter.markov_embedding(batch.prev_tokens.to(device))
    base = drafter.base_logits(hidden)
    return BlockScores(
        logits=base + drafter.transition_bias(prev),
        confidence_logits=drafter.confidence_logit(hidden, prev),
        base_logits=base,
    )
