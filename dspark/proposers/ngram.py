"""Prompt-lookup (n-gram) drafting: model-free proposals copied from the request's own history.

If the last n tokens already occurred earlier in the prompt or output, the tokens that followed that earlier
occurrence are a cheap guess for what comes next (vLLM's NgramProposer, HF prompt lookup decoding). This
pays off on inputs with repetition: code edits, summaries quoting the source, structured output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dspark.proposers.base import Draft, DraftRequest, Proposer


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> tuple[list[int], int]:
    """Return up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram,
    and that n (0 when nothing matched).

    n is tried from max_n down to min_n; an occurrence must end before the last position, so at least one
    token follows it. Cost is O(len(tokens) * n_matched) vectorized compares: the match mask for n is
    derived from the one for n - 1, and the search stops at the first n with no match at all.
    """
    num = int(tokens.shape[0])
    max_n = min(max_n, num - 1)
    if k <= 0 or max_n < min_n:
        return [], 0
    # match[j] is True iff tokens[j : j + n] == tokens[-n:]; the occurrence ends at j + n - 1 <= num - 2.
    match = tokens[:-1] == tokens[-1]
    best_end, best_n = -1, 0
    for n in range(1, max_n + 1):
        if n > 1:
            # Extending the n-gram one token to the left keeps a start j only if tokens[j] == tokens[-n].
            match = match[1:] & (tokens[: num - n] == tokens[-n])
        hits = np.flatnonzero(match)
        if hits.size == 0:
            break  # no longer n-gram can match either
        if n >= min_n:
            best_end, best_n = int(hits[-1]) + n - 1, n  # the most recent occurrence wins
    if best_end < 0:
        return [], 0
    return tokens[best_end + 1 : best_end + 1 + k].tolist(), best_n


class NgramProposer(Proposer):
    """Stateless prompt-lookup drafter; one instance serves every request."""

    name = "ngram"
    default_num_speculative_tokens = 4  # longer copies rarely survive on chat; code edits may want more

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose_tokens(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Draft up to k tokens from a request's full history (prompt + generated)."""
        return self._match(token_ids, k)[0]

    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        """Each draft is scored by its match length, the acceptance estimator's feature."""
        drafts = []
        for r, k in zip(requests, max_lens, strict=True):
            tokens, n = self._match(r.token_ids, k)
            drafts.append(Draft(tokens, scores=[float(n)] * len(tokens)))
        return drafts

    def _match(self, token_ids: Sequence[int], k: int) -> tuple[list[int], int]:
        if k <= 0 or len(token_ids) < 2:
            return [], 0
        return ngram_lookup(np.asarray(token_ids, dtype=np.int64), self.min_n, self.max_n, k)

    def __repr__(self) -> str:
        return f"NgramProposer(min_n={self.min_n}, max_n={self.max_n})"
