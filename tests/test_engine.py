"""End-to-end engine tests on the default model: losslessness against transformers, batching, stopping.

Greedy speculative decoding must reproduce plain greedy decoding token for token, whatever the drafts,
the batch composition or the prefill chunking; the reference is Hugging Face `generate`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import pytest
import torch

from dspark.assembly import build_engine
from dspark.engine import Engine, EngineConfig, RequestOutput, ResumeState
from dspark.proposers import Draft, DraftRequest, Proposer
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig

EOS = 2  # <|im_end|> of SmolLM2-Instruct
SHORT_ANSWER = "What is 2+2? Answer with a number only."  # greedy: "2 + 2 = 4" then EOS (8 tokens)
PLAIN_LEN = 32  # tokens of the plain greedy references (ignore_eos)


# ---- helpers ----------------------------------------------------------------------------------------------


def make_engine(model, tokenizer, drafter=None, **config) -> Engine:
    """An engine on the shared model; `drafter` is a proposer object, config["proposer"] a built-in name."""
    config.setdefault("max_model_len", 1024)
    config.setdefault("proposer", "none")
    config.setdefault("verification", VerificationConfig(policy="fixed"))  # whole drafts: exact counts
    return build_engine(EngineConfig(**config), model=model, tokenizer=tokenizer, proposer=drafter)


class Run:
    """Everything the engine reported for one request."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def final(self) -> RequestOutput:
        assert self.outputs[-1].finished
        return self.outputs[-1]


def run_requests(
    engine: Engine, prompts: Sequence[Sequence[int] | str], params: Sequence[SamplingParams]
) -> list[Run]:
    """Add every request, step the engine until all finish; results in request order."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    runs = {i: Run() for i in ids}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert not runs[out.request_id].outputs or not runs[out.request_id].outputs[-1].finished
            runs[out.request_id].outputs.append(out)
        steps += 1
        assert steps < 10_000
    assert engine.cache.num_free == engine.cache.num_slots  # every slot released
    for run in runs.values():
        assert sum(o.finished for o in run.outputs) == 1 and run.outputs[-1].finished
        assert run.final.num_output_tokens == len(run.token_ids)
    return [runs[i] for i in ids]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def check_stats_consistent(stats) -> None:
    assert len(stats.drafted_at) == len(stats.accepted_at)
    assert sum(stats.drafted_at) == stats.drafted
    assert sum(stats.accepted_at) == stats.accepted
    assert stats.accepted <= stats.drafted
    for j, (d, a) in enumerate(zip(stats.drafted_at, stats.accepted_at, strict=True)):
        assert 0 <= a <= d
        if j:  # position j is only drafted/accepted when position j - 1 was
            assert d <= stats.drafted_at[j - 1]
            assert a <= stats.accepted_at[j - 1]
    for j, (a, r) in enumerate(zip(stats.accepted_at, stats.reached_at, strict=True)):
        assert a <= r <= stats.drafted_at[j]  # reaching j needs every earlier position accepted
        if j:
            assert r <= stats.accepted_at[j - 1]  # reached j => accepted j - 1
    if stats.drafted_at:  # a step drafts position 0 at most once
        assert stats.drafted_at[0] <= stats.steps


class RandomProposer(Proposer):
    """Drafts uniformly random tokens (or, non-deterministic, tokens sampled from random distributions)."""

    name = "random"
    default_num_speculative_tokens = 4

    def __init__(self, vocab: int, seed: int = 0, deterministic: bool = True, overdraft: int = 0) -> None:
        self.vocab = vocab
        self.deterministic = deterministic
        self.overdraft = overdraft  # > 0: break the protocol by drafting more tokens than allowed
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        drafts = []
        for _, k in zip(requests, max_lens, strict=True):
            n = k + self.overdraft
            if self.deterministic:
                drafts.append(Draft(torch.randint(0, self.vocab, (n,), generator=self.gen).tolist()))
            else:
                probs = torch.softmax(3 * torch.randn(n, self.vocab, generator=self.gen), -1)
                tokens = torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)
                drafts.append(Draft(tokens.tolist(), probs))
        return drafts


class OracleProposer(Proposer):
    """Drafts the known greedy continuation; with `rng`, only a random prefix of it, then wrong tokens.

    `expected_accepted` counts the drafted tokens that greedy verification must accept.
    """

    name = "oracle"
    default_num_speculative_tokens = 4

    def __init__(self, continuations: Sequence[Sequence[int]], vocab: int, rng: random.Random | None = None):
        self.full = [list(c) for c in continuations]
        self.vocab = vocab
        self.rng = rng
        self.expected_accepted = 0

    def propose(self, requests: Sequence[DraftRequest], max_lens: Sequence[int]) -> list[Draft]:
        drafts = []
        for r, k in zip(requests, max_lens, strict=True):
            ids = list(r.token_ids)
            matches = [f for f in self.full if f[: len(ids)] == ids and len(f) > len(ids)]
            true = matches[0][len(ids) : len(ids) + k] if matches else []
            j = len(true) if self.rng is None else self.rng.randint(0, len(true))
            self.expected_accepted += j
            drafts.append(Draft(true[:j] + [(t + 1) % self.vocab for t in true[j:]]))
        return drafts


# ---- references -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_ids(dev_prompts, to_chat_ids) -> list[list[int]]:
    return [to_chat_ids(p) for p in dev_prompts[:12]]


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    """hf_greedy(ids, n): transformers' greedy continuation (batch 1, EOS included), memoized."""
    memo: dict[tuple[int, ...], tuple[int, list[int]]] = {}

    def reference(ids: Sequence[int], n: int) -> list[int]:
        key = tuple(ids)
        if key in memo and memo[key][0] >= n:
            return memo[key][1][:n]
        x = torch.tensor([list(ids)])
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n
            )
        memo[key] = (n, out[0, x.shape[1] :].tolist())
        return memo[key][1]

    return reference


@pytest.fixture(scope="module")
def plain_runs(default_model, tokenizer, prompt_ids):
    """The engine's plain greedy outputs (ignore_eos, PLAIN_LEN tokens) for the first 4 prompts."""
    engine = make_engine(default_model, tokenizer, max_batch_size=4)
    runs = run_requests(engine, prompt_ids[:4], [greedy(PLAIN_LEN, ignore_eos=True)] * 4)
    return [r.token_ids for r in runs]


# ---- losslessness ------------------------------------------------------------------------------------------

ENGINE_VARIANTS = {
    "plain": dict(proposer="none"),
    "ngram-g2": dict(proposer="ngram", num_speculative_tokens=2),
    "ngram-g5": dict(proposer="ngram", num_speculative_tokens=5),
    "plain-chunked": dict(proposer="none", max_tokens_per_step=32),
    "ngram-g5-chunked": dict(proposer="ngram", num_speculative_tokens=5, max_tokens_per_step=32),
}


def assert_matches_hf(engine, prompts, max_tokens: Sequence[int], hf_greedy) -> None:
    runs = run_requests(engine, prompts, [greedy(n) for n in max_tokens])
    for i, (p, n, run) in enumerate(zip(prompts, max_tokens, runs, strict=True)):
        ref = hf_greedy(p, max(max_tokens))[:n]
        if EOS in ref:
            ref = ref[: ref.index(EOS) + 1]
        assert run.token_ids == ref, f"prompt {i}: engine {run.token_ids} != transformers {ref}"
        assert run.final.finish_reason == ("stop" if ref[-1] == EOS else "length")
    check_stats_consistent(engine.stats)


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_matches_transformers(default_model, tokenizer, prompt_ids, hf_greedy, variant):
    """6 prompts with different max_tokens through 4 slots: requests join and leave between steps."""
    engine = make_engine(default_model, tokenizer, max_batch_size=4, **ENGINE_VARIANTS[variant])
    assert_matches_hf(engine, prompt_ids[:6], [24, 9, 17, 24, 4, 20], hf_greedy)
    if engine.proposer is None:
        assert engine.stats.drafted == 0 and engine.stats.tau == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("max_batch_size", [1, 4])
@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_matches_transformers_sweep(
    default_model, tokenizer, prompt_ids, hf_greedy, variant, max_batch_size
):
    engine = make_engine(default_model, tokenizer, max_batch_size=max_batch_size, **ENGINE_VARIANTS[variant])
    assert_matches_hf(engine, prompt_ids, [32] * len(prompt_ids), hf_greedy)


def _engine(model, tokenizer, proposer: str, **config) -> Engine:
    config.setdefault("max_batch_size", 4)
    return make_engine(model, tokenizer, proposer=proposer, num_speculative_tokens=4, **config)


@pytest.mark.parametrize("proposer", ["none", "ngram"])
def test_batch_invariance(default_model, tokenizer, prompt_ids, proposer):
    """A request's greedy output does not depend on what else runs in its batch."""
    params = greedy(24, ignore_eos=True)
    alone = run_requests(_engine(default_model, tokenizer, proposer), prompt_ids[:1], [params])[0]
    together = run_requests(_engine(default_model, tokenizer, proposer), prompt_ids[:4], [params] * 4)
    assert together[0].token_ids == alone.token_ids
    # last in the batch, next to requests with other lengths and other max_tokens
    others = [prompt_ids[5], prompt_ids[4], prompt_ids[3]]
    mixed = [greedy(5), greedy(30, ignore_eos=True), greedy(11)]
    together = run_requests(
        _engine(default_model, tokenizer, proposer), [*others, prompt_ids[0]], [*mixed, params]
    )
    assert together[-1].token_ids == alone.token_ids


# ---- arbitrary proposers stay lossless -----------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [True, False])
def test_random_drafts_do_not_change_greedy_output(
    default_model, tokenizer, prompt_ids, plain_runs, deterministic
):
    vocab = default_model.cfg.vocab_size
    proposer = RandomProposer(vocab, seed=1, deterministic=deterministic)
    engine = make_engine(default_model, tokenizer, proposer, max_batch_size=4, num_speculative_tokens=5)
    runs = run_requests(engine, prompt_ids[:4], [greedy(PLAIN_LEN, ignore_eos=True)] * 4)
    assert [r.token_ids for r in runs] == plain_runs
    stats = engine.stats
    check_stats_consistent(stats)
    assert stats.drafted > 0
    assert stats.accepted <= 0.05 * stats.drafted  # random tokens out of 49k are (almost) never right
    for run in runs:
        spec = run.final.spec
        assert spec.drafted > 0
        assert spec.accepted + spec.steps == len(run.token_ids)


def test_partially_right_drafts_accept_exactly_the_right_prefix(
    default_model, tokenizer, prompt_ids, plain_runs
):
    """Drafts = the true continuation up to a random point, then wrong tokens: exactly that prefix is
    accepted, the KV cache is rolled back past the rest, and the output is unchanged."""
    vocab = default_model.cfg.vocab_size
    full = [p + out for p, out in zip(prompt_ids[:4], plain_runs, strict=True)]
    proposer = OracleProposer(full, vocab, rng=random.Random(0))
    engine = make_engine(default_model, tokenizer, proposer, max_batch_size=3, num_speculative_tokens=6)
    runs = run_requests(engine, prompt_ids[:4], [greedy(PLAIN_LEN, ignore_eos=True)] * 4)
    assert [r.token_ids for r in runs] == plain_runs
    check_stats_consistent(engine.stats)
    assert engine.stats.accepted == proposer.expected_accepted
    assert 0 < engine.stats.accepted < engine.stats.drafted


@pytest.mark.parametrize(("gamma", "max_tokens"), [(4, 30), (4, 32), (3, 29)])
def test_oracle_drafts_are_all_accepted(default_model, tokenizer, prompt_ids, plain_runs, gamma, max_tokens):
    vocab = default_model.cfg.vocab_size
    full = [p + out for p, out in zip(prompt_ids[:4], plain_runs, strict=True)]
    proposer = OracleProposer(full, vocab)
    engine = make_engine(default_model, tokenizer, proposer, max_batch_size=4, num_speculative_tokens=gamma)
    runs = run_requests(engine, prompt_ids[:4], [greedy(max_tokens, ignore_eos=True)] * 4)
    assert [r.token_ids for r in runs] == [out[:max_tokens] for out in plain_runs]
    full_steps, rest = divmod(max_tokens, gamma + 1)
    for run in runs:
        spec = run.final.spec
        assert spec.accepted == spec.drafted
        assert spec.steps == full_steps + (rest > 0)
        assert spec.drafted == full_steps * gamma + max(rest - 1, 0)
        assert spec.accepted + spec.steps == max_tokens
        assert spec.conditional_acceptance == [1.0] * gamma
    stats = engine.stats
    check_stats_consistent(stats)
    assert stats.accepted == stats.drafted
    # every step but a request's last drafts gamma tokens and keeps all gamma + 1
    if rest == 0:
        assert stats.tau == gamma + 1
    else:
        assert stats.tau == pytest.approx(max_tokens / (full_steps + 1))
    # per request: gamma drafts on each full step, rest - 1 on the last, shorter one
    assert stats.drafted_at == [4 * (full_steps + (j < rest - 1)) for j in range(gamma)]
    assert stats.accepted_at == stats.drafted_at


def test_overlong_draft_probs_are_truncated_with_the_tokens(
    default_model, tokenizer, prompt_ids, plain_runs, monkeypatch
):
    """A proposer returning more tokens than asked is cut to the limit; its probs must be cut too, or the
    rows handed to rejection sampling no longer line up with the draft tokens."""
    import dspark.engine.engine as engine_module

    seen = []
    real_verify = engine_module.verify

    def spy(target_probs, draft_tokens, draft_lens, draft_probs, greedy_flags, generators):
        seen.append((draft_tokens.numel(), None if draft_probs is None else draft_probs.shape[0]))
        return real_verify(target_probs, draft_tokens, draft_lens, draft_probs, greedy_flags, generators)

    monkeypatch.setattr(engine_module, "verify", spy)
    proposer = RandomProposer(default_model.cfg.vocab_size, seed=2, deterministic=False, overdraft=3)
    engine = make_engine(default_model, tokenizer, proposer, max_batch_size=2, num_speculative_tokens=2)
    runs = run_requests(engine, prompt_ids[:2], [greedy(8, ignore_eos=True)] * 2)
    assert [r.token_ids for r in runs] == [out[:8] for out in plain_runs[:2]]
    assert engine.stats.drafted_at and len(engine.stats.drafted_at) <= 2
    assert all(rows == n for n, rows in seen if rows is not None), seen


# ---- sampling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proposer", ["none", "ngram"])
def test_seeded_sampling_is_reproducible(default_model, tokenizer, prompt_ids, proposer):
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=24, ignore_eos=True) for s in (1, 2, 1)
    ]
    prompts = [prompt_ids[0], prompt_ids[0], prompt_ids[1]]
    engine = _engine(default_model, tokenizer, proposer)
    first = run_requests(engine, prompts, params)
    check_stats_consistent(engine.stats)
    second = run_requests(_engine(default_model, tokenizer, proposer), prompts, params)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert [r.text for r in first] == [r.text for r in second]
    assert all(len(r.token_ids) == 24 for r in first)
    assert first[0].token_ids != first[1].token_ids  # another seed, another sample


# ---- stopping --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_answer(to_chat_ids) -> list[int]:
    return to_chat_ids(SHORT_ANSWER)


@pytest.mark.parametrize("proposer", ["none", "ngram"])
def test_eos_stops_and_ignore_eos_continues(default_model, tokenizer, short_answer, hf_greedy, proposer):
    ref = hf_greedy(short_answer, 16)
    assert EOS in ref, "the reference answer should end early"
    answer = ref[: ref.index(EOS) + 1]
    stopped, ignored = run_requests(
        _engine(default_model, tokenizer, proposer),
        [short_answer, short_answer],
        [greedy(16), greedy(len(answer) + 6, ignore_eos=True)],
    )
    assert stopped.token_ids == answer
    assert stopped.final.finish_reason == "stop"
    assert stopped.text == tokenizer.decode(answer, skip_special_tokens=True)
    assert "<|im_end|>" not in stopped.text
    assert ignored.final.finish_reason == "length"
    assert len(ignored.token_ids) == len(answer) + 6
    assert ignored.token_ids[: len(answer)] == answer


@pytest.mark.parametrize("proposer", ["none", "ngram", "oracle"])
@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_is_exact(default_model, tokenizer, prompt_ids, plain_runs, proposer, max_tokens):
    vocab = default_model.cfg.vocab_size
    full = [p + out for p, out in zip(prompt_ids[:2], plain_runs[:2], strict=True)]
    if proposer == "oracle":
        engine = make_engine(
            default_model, tokenizer, OracleProposer(full, vocab), max_batch_size=2, num_speculative_tokens=4
        )
    else:
        engine = _engine(default_model, tokenizer, proposer)
    runs = run_requests(engine, prompt_ids[:2], [greedy(max_tokens, ignore_eos=True)] * 2)
    for run, out in zip(runs, plain_runs[:2], strict=True):
        assert run.token_ids == out[:max_tokens]
        assert run.final.finish_reason == "length"
        assert run.final.num_output_tokens == max_tokens


@pytest.mark.parametrize("proposer", ["none", "oracle"])
def test_max_model_len_caps_the_output(default_model, tokenizer, prompt_ids, plain_runs, proposer):
    prompt = prompt_ids[0]
    vocab = default_model.cfg.vocab_size
    oracle = OracleProposer([prompt + plain_runs[0]], vocab) if proposer == "oracle" else None
    engine = make_engine(
        default_model, tokenizer, oracle, max_model_len=len(prompt) + 7, num_speculative_tokens=4
    )
    (run,) = run_requests(engine, [prompt], [greedy(100, ignore_eos=True)])
    assert run.final.finish_reason == "length"
    assert run.token_ids == plain_runs[0][:7]


@pytest.mark.parametrize("proposer", ["none", "ngram"])
def test_stop_strings_cut_the_text(default_model, tokenizer, prompt_ids, plain_runs, proposer):
    full_text = tokenizer.decode(plain_runs[0], skip_special_tokens=True)
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 4]
    cut = full_text.find(stop)
    assert cut > 0
    (run, other) = run_requests(
        _engine(default_model, tokenizer, proposer),
        [prompt_ids[0], prompt_ids[0]],
        [
            greedy(PLAIN_LEN, ignore_eos=True, stop=["never appears", stop]),
            greedy(PLAIN_LEN, ignore_eos=True, stop=["§§"]),
        ],
    )
    assert run.text == full_text[:cut]
    assert run.final.finish_reason == "stop"
    ids = run.token_ids
    assert ids == plain_runs[0][: len(ids)]
    assert stop in tokenizer.decode(ids, skip_special_tokens=True)
    if proposer == "none":  # one token per step: generation ends with the token completing the stop
        assert stop not in tokenizer.decode(ids[:-1], skip_special_tokens=True)
    # a stop string that never appears changes nothing
    assert other.token_ids == plain_runs[0]
    assert other.text == full_text
    assert other.final.finish_reason == "length"


def test_abort_frees_the_slot(default_model, tokenizer, prompt_ids, plain_runs):
    engine = make_engine(default_model, tokenizer, max_batch_size=2)
    params = greedy(PLAIN_LEN, ignore_eos=True)
    a, b, c = (engine.add_request(p, params) for p in prompt_ids[:3])
    engine.step()
    engine.step()
    assert engine.cache.num_free == 0 and engine.num_running == 2 and len(engine.waiting) == 1

    out = engine.abort(a)
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert out.request_id == a and out.num_output_tokens == 2
    assert engine.cache.num_free == 1 and engine.num_running == 1
    assert engine.abort(a) is None  # already gone
    assert engine.abort("no-such-request") is None

    waiting = engine.abort(c)  # never admitted
    assert waiting is not None and waiting.finish_reason == "abort" and waiting.num_output_tokens == 0
    assert engine.cache.num_free == 1 and not engine.waiting

    outputs = list(engine.run_until_done())
    assert {o.request_id for o in outputs} == {b}
    assert [t for o in outputs for t in o.token_ids] == plain_runs[1][2:]  # b continues unharmed
    assert engine.cache.num_free == 2


def test_aborted_slot_is_reused_cleanly(default_model, tokenizer, prompt_ids, plain_runs):
    engine = _engine(default_model, tokenizer, "ngram", max_batch_size=1)
    first = engine.add_request(prompt_ids[2], greedy(30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    engine.abort(first)
    assert engine.cache.num_free == 1
    (run,) = run_requests(engine, [prompt_ids[0]], [greedy(PLAIN_LEN, ignore_eos=True)])
    assert run.token_ids == plain_runs[0]


@pytest.mark.parametrize(
    ("prompt", "config"),
    [
        ([], {}),
        ("", {}),
        ([5] * 64, {"max_model_len": 64}),  # no room left for a generated token
        ([5] * 100, {"max_model_len": 64}),
        ([5, 49152, 7], {}),  # out of vocab
        ([5, -1], {}),
    ],
)
def test_invalid_prompts_are_rejected(default_model, tokenizer, prompt, config):
    engine = make_engine(default_model, tokenizer, **config)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(prompt, greedy(4))
    assert not engine.has_unfinished()


# ---- streaming -----------------------------------------------------------------------------------------


STREAM_PROMPTS = [
    "Write three emojis and greet me in Chinese.",
    "Translate 'good morning' to Japanese and add an emoji.",
    SHORT_ANSWER,
]


@pytest.mark.parametrize("proposer", ["none", "ngram"])
def test_streamed_text_equals_full_decode(default_model, tokenizer, to_chat_ids, prompt_ids, proposer):
    prompts = [to_chat_ids(p) for p in STREAM_PROMPTS] + prompt_ids[:1]
    runs = run_requests(_engine(default_model, tokenizer, proposer), prompts, [greedy(40)] * len(prompts))
    for run in runs:
        assert run.text == tokenizer.decode(run.token_ids, skip_special_tokens=True)
        assert all(not o.finished for o in run.outputs[:-1])
        assert [o.num_output_tokens for o in run.outputs] == list(
            itertools.accumulate(len(o.token_ids) for o in run.outputs)
        )
    assert any(ord(ch) > 0x2000 for run in runs for ch in run.text)  # some multi-byte output was streamed


def test_stream_and_generate_agree(default_model, tokenizer, prompt_ids):
    engine = _engine(default_model, tokenizer, "ngram")
    streamed = list(engine.stream(prompt_ids[1], greedy(12)))
    assert streamed[-1].finished and all(not o.finished for o in streamed[:-1])
    (completion,) = engine.generate([prompt_ids[1]], greedy(12))
    assert completion.token_ids == [t for o in streamed for t in o.token_ids]
    assert completion.text == "".join(o.text for o in streamed)
    assert completion.finish_reason == streamed[-1].finish_reason
    assert completion.spec == streamed[-1].spec


# ---- statistics --------------------------------------------------------------------------------------------


def test_stats_plain_decoding(default_model, tokenizer, prompt_ids):
    engine = make_engine(default_model, tokenizer, max_batch_size=3)
    runs = run_requests(engine, prompt_ids[:3], [greedy(n, ignore_eos=True) for n in (5, 9, 3)])
    stats = engine.stats
    assert stats.tau == 1.0
    assert stats.drafted == stats.accepted == 0 and stats.drafted_at == []
    assert stats.steps == 5 + 9 + 3  # one verification step per token
    for run, n in zip(runs, (5, 9, 3), strict=True):
        assert run.final.spec.tau == 1.0 and run.final.spec.steps == n


def test_stats_ngram_consistent(default_model, tokenizer, prompt_ids):
    engine = _engine(default_model, tokenizer, "ngram")
    runs = run_requests(engine, prompt_ids[:4], [greedy(30, ignore_eos=True)] * 4)
    stats = engine.stats
    check_stats_consistent(stats)
    assert stats.drafted > 0
    assert stats.tau == pytest.approx((stats.accepted + stats.steps) / stats.steps)
    assert stats.steps == sum(r.final.spec.steps for r in runs)
    assert stats.drafted == sum(r.final.spec.drafted for r in runs)
    assert stats.accepted == sum(r.final.spec.accepted for r in runs)
    for run in runs:  # every emitted token is an accepted draft or a step's correction/bonus token
        assert run.final.spec.accepted + run.final.spec.steps == 30
    assert math.isclose(stats.acceptance_rate, stats.accepted / stats.drafted)


def test_conditional_acceptance_conditions_on_the_accepted_prefix():
    from dspark.engine.stats import SpecStats

    stats = SpecStats()
    stats.record(drafted=3, accepted=1)  # position 0 accepted, 1 rejected, 2 never reached
    stats.record(drafted=3, accepted=3)
    assert stats.conditional_acceptance() == [1.0, 0.5, 1.0]
    assert stats.prefix_survival() == [1.0, 0.5, 0.5]
    assert SpecStats.from_summary(stats.summary()) == stats


# ---- resuming after a fault ------------------------------------------------------------------------------


def _resume(engine: Engine, prompt, params: SamplingParams, sent: Run, cut: int) -> Run:
    """Resume `sent` after its first `cut` outputs reached the client: re-prefill, continue streaming."""
    outputs = sent.outputs[:cut]
    resume = ResumeState(
        output_ids=[t for o in outputs for t in o.token_ids], text_chars=sum(len(o.text) for o in outputs)
    )
    request_id = engine.add_request(prompt, params, resume=resume)
    run = Run()
    run.outputs = list(outputs)  # what the client holds, then what the resumed request streams
    for out in engine.run_until_done():
        assert out.request_id == request_id
        run.outputs.append(out)
    return run


@pytest.mark.parametrize(
    "params",
    [
        greedy(40, stop=["\n\n\n"]),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=40),  # seeded: reproducible
    ],
    ids=["greedy", "seeded-sampled"],
)
@pytest.mark.parametrize("proposer", ["none", "ngram"])
def test_a_resumed_request_continues_without_gap_or_repeat(
    default_model, tokenizer, prompt_ids, params, proposer
):
    """Tokens and text of an interrupted request, resumed by re-prefilling what was streamed, equal those of
    an uninterrupted run: nothing missing, nothing repeated, the finish reason and usage unchanged."""
    engine = make_engine(default_model, tokenizer, max_batch_size=2, proposer=proposer)
    prompt = prompt_ids[3]
    (whole,) = run_requests(engine, [prompt], [params])
    assert len(whole.outputs) > 4
    for cut in (1, len(whole.outputs) // 2, len(whole.outputs) - 1):
        resumed = _resume(engine, prompt, params, whole, cut)
        assert resumed.token_ids == whole.token_ids
        assert resumed.text == whole.text
        assert resumed.final.finish_reason == whole.final.finish_reason
        assert resumed.final.num_output_tokens == whole.final.num_output_tokens


def test_resume_releases_text_held_back_before_the_fault(default_model, tokenizer):
    """Text the first replica held back (a stop string's possible start) comes with the resumed stream."""
    engine = make_engine(default_model, tokenizer, max_batch_size=1)
    prompt = "Count: one, two, three, four, five, six, seven, eight"
    params = greedy(24, stop=[", nine, ten, eleven, twelve, thirteen!"], ignore_eos=True)
    (whole,) = run_requests(engine, [prompt], [params])
    held = [i for i, o in enumerate(whole.outputs) if o.token_ids and not o.text]
    if not held:
        pytest.skip("this output never held text back")
    resumed = _resume(engine, prompt, params, whole, held[0] + 1)
    assert resumed.token_ids == whole.token_ids and resumed.text == whole.text
