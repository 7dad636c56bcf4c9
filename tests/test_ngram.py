import random
import time

import numpy as np
import pytest

from dspark.proposers.ngram import NgramProposer, ngram_lookup


def reference_lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Brute force: longest n first, then the latest start whose n-gram ends before the last position."""
    if k <= 0:
        return []
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_repetition_found():
    proposer = NgramProposer(min_n=1, max_n=3)
    history = [1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert proposer.propose_tokens(history, k=3) == [4, 5, 6]


def test_longest_ngram_preferred():
    # The 1-gram [3] last occurred before 9, the 2-gram [2, 3] only before 7.
    history = [2, 3, 7, 8, 3, 9, 2, 3]
    assert NgramProposer(min_n=1, max_n=2).propose_tokens(history, k=2) == [7, 8]
    assert NgramProposer(min_n=1, max_n=1).propose_tokens(history, k=2) == [9, 2]


def test_most_recent_occurrence_preferred():
    history = [5, 6, 1, 5, 6, 2, 5, 6]
    assert NgramProposer(min_n=2, max_n=2).propose_tokens(history, k=1) == [2]


def test_match_may_overlap_the_suffix():
    # [7, 7] ends at index 2, before the last position: the draft is the one token that follows.
    assert NgramProposer(min_n=2, max_n=2).propose_tokens([7, 7, 7], k=4) == [7]


def test_k_caps_the_draft():
    history = [*range(20), 0, 1]
    assert NgramProposer().propose_tokens(history, k=3) == [2, 3, 4]
    assert NgramProposer().propose_tokens(history, k=2) == [2, 3]
    assert NgramProposer().propose_tokens(history, k=0) == []


def test_draft_truncated_by_history_end():
    assert NgramProposer(min_n=1, max_n=2).propose_tokens([4, 9, 4], k=5) == [9, 4]


def test_no_match_and_k_zero():
    proposer = NgramProposer()
    assert proposer.propose_tokens([1, 2, 3, 4], k=4) == []
    assert proposer.propose_tokens([1, 2, 1, 2], k=0) == []
    assert proposer.propose_tokens([], k=4) == []
    assert proposer.propose_tokens([1], k=4) == []


def test_min_n_excludes_short_matches():
    assert NgramProposer(min_n=2, max_n=3).propose_tokens([1, 2, 3, 9, 3], k=2) == []


@pytest.mark.parametrize(("min_n", "max_n"), [(0, 2), (3, 2)])
def test_invalid_config(min_n: int, max_n: int):
    with pytest.raises(ValueError):
        NgramProposer(min_n=min_n, max_n=max_n)


def test_matches_brute_force_on_random_histories():
    rng = random.Random(0)
    for _ in range(3000):
        vocab = rng.randint(1, 5)
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        min_n = rng.randint(1, 4)
        max_n = rng.randint(min_n, 5)
        k = rng.randint(0, 6)
        expected = reference_lookup(tokens, min_n, max_n, k)
        got = NgramProposer(min_n, max_n).propose_tokens(tokens, k)
        assert got == expected, (tokens, min_n, max_n, k)


def test_accepts_numpy_and_is_fast_on_long_histories():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=4000)
    assert ngram_lookup(tokens, 1, 4, 4)[0] == reference_lookup(tokens.tolist(), 1, 4, 4)
    proposer = NgramProposer()
    history = tokens.tolist()
    start = time.perf_counter()
    for _ in range(50):
        proposer.propose_tokens(history, k=8)
    assert (time.perf_counter() - start) / 50 < 0.01  # generous bound; typically ~0.2 ms
