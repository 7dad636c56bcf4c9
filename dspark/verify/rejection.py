"""Lossless verification of a ragged batch of draft tokens (greedy matching or speculative sampling).

Layout: request i proposed k_i draft tokens and owns k_i + 1 consecutive target rows; target row j scores
draft position j and the last row is the bonus position. Everything is flattened in request order.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from dspark.sampling import row_uniforms, sample_rows


@dataclass
class VerifyResult:
    accepted_counts: list[int]  # accepted draft tokens per request, 0..k_i
    tokens: list[list[int]]  # accepted draft tokens + one correction/bonus token per request


def _uniforms(
    lens: list[int], sampled: list[bool], generators: Sequence[torch.Generator | None], device: torch.device
) -> Tensor:
    """One U(0,1) per draft token; seeded requests draw from their own generator, the rest in one call."""
    total = sum(lens)
    u = torch.empty(total, device=device)
    if any(s and g is None and k for s, g, k in zip(sampled, generators, lens, strict=True)):
        u = torch.rand(total, device=device)
    start = 0
    for k, s, g in zip(lens, sampled, generators, strict=True):
        if s and g is not None and k:
            u[start : start + k] = torch.rand(k, generator=g, device=device)
        start += k
    return u


def _sample_rows(dist: Tensor, sampled: list[bool], generators: Sequence[torch.Generator | None]) -> Tensor:
    """One draw per sampled row (unnormalised weights); greedy rows get -1."""
    out = torch.full((dist.size(0),), -1, dtype=torch.long, device=dist.device)
    rows = [i for i, s in enumerate(sampled) if s]
    if rows:
        idx = torch.tensor(rows, device=dist.device)
        out[idx] = sample_rows(dist[idx], row_uniforms(len(rows), [generators[i] for i in rows], dist.device))
    return out


def _verify_greedy(target_scores: Tensor, draft_tokens: Tensor, k_list: list[int]) -> VerifyResult:
    """All-greedy batch: only argmaxes matter, so raw logits work as well as one-hot probs."""
    argmax = target_scores.argmax(-1).tolist()
    drafts = draft_tokens.tolist()
    counts, tokens = [], []
    row = start = 0
    for k in k_list:
        n = 0
        while n < k and drafts[start + n] == argmax[row + n]:
            n += 1
        counts.append(n)
        tokens.append([*drafts[start : start + n], argmax[row + n]])
        row, start = row + k + 1, start + k
    return VerifyResult(accepted_counts=counts, tokens=tokens)


def verify(
    target_probs: Tensor,
    draft_tokens: Tensor,
    draft_lens: Sequence[int],
    draft_probs: Tensor | None,
    greedy: Sequence[bool],
    generators: Sequence[torch.Generator | None],
) -> VerifyResult:
    """Accept a prefix of each request's draft and append one correction (or bonus) token.

    target_probs: [sum(k_i + 1), V] processed target distributions (one-hot rows for greedy requests);
    an all-greedy batch may pass raw logits, since only their argmax is read.
    draft_tokens: int64 [sum k_i]. draft_probs: [sum k_i, V] distributions the drafts were sampled from,
    or None for deterministic drafts (q is one-hot at the draft token).
    """
    device = target_probs.device
    k_list = [int(k) for k in draft_lens]
    n_req, n_draft = len(k_list), sum(k_list)
    assert draft_tokens.numel() == n_draft and target_probs.size(0) == n_draft + n_req
    assert len(greedy) == n_req and len(generators) == n_req
    sampled = [not g for g in greedy]
    if not any(sampled):
        return _verify_greedy(target_probs, draft_tokens, k_list)

    lens = torch.tensor(k_list, dtype=torch.long, device=device)
    req = torch.repeat_interleave(torch.arange(n_req, device=device), lens)  # request of each draft token
    draft_start = torch.cumsum(lens, 0) - lens
    target_start = draft_start + torch.arange(n_req, device=device)
    draft_idx = torch.arange(n_draft, device=device)
    target_rows = draft_idx + req  # each earlier request adds one bonus row
    pos = draft_idx - draft_start[req]  # position within the request's draft

    # acceptance test for every draft token at once
    p_x = target_probs[target_rows, draft_tokens]
    q_x = 1.0 if draft_probs is None else draft_probs[draft_idx, draft_tokens]
    u = _uniforms(k_list, sampled, generators, device)
    greedy_req = torch.tensor(list(greedy), dtype=torch.bool, device=device)
    greedy_row = greedy_req[req]
    argmax = target_probs.argmax(-1)  # greedy decisions for every row at once
    match = draft_tokens == argmax[target_rows]
    accept = torch.where(greedy_row, match, u * q_x < p_x)  # u < p/q without dividing by q

    # accepted count = position of the first rejection (k_i if none)
    n_acc = lens.clone().scatter_reduce_(0, req, torch.where(accept, lens[req], pos), "amin")
    rejected = n_acc < lens
    extra_rows = target_start + n_acc  # the row scoring the correction or bonus token
    p = target_probs[extra_rows]

    # on rejection sample from norm(max(p - q, 0)), falling back to p if that is all zeros
    if n_draft > 0:
        q_row = (draft_start + n_acc).clamp(max=n_draft - 1)
        if draft_probs is None:
            residual = p.scatter(-1, draft_tokens[q_row][:, None], 0.0)
        else:
            residual = (p - draft_probs[q_row]).clamp_min(0.0)
        residual = torch.where(rejected[:, None] & (residual.sum(-1, keepdim=True) > 0), residual, p)
    else:
        residual = p
    extra = torch.where(greedy_req, argmax[extra_rows], _sample_rows(residual, sampled, generators))

    counts, flat, extra_list = n_acc.tolist(), draft_tokens.tolist(), extra.tolist()
    starts = list(accumulate(k_list, initial=0))[:-1]
    tokens = [[*flat[s : s + n], e] for s, n, e in zip(starts, counts, extra_list, strict=True)]
    return VerifyResult(accepted_counts=counts, tokens=tokens)
