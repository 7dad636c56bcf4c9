"""The hardware cost profile: how long a step takes, as the scheduler's SPS(B) curve (paper Section 3.2).

A step of n decoding requests feeding B tokens in total costs the drafter's time for n requests plus the
target's forward time for (n, B), plus, when prompt chunks ride along, their prefill time. All three are
measured once per machine, model, thread count and batch limit (seconds), cached as JSON, and
interpolated: linearly in tokens per request, and in log n between the profiled request counts.
Per-request work (ragged attention, KV bookkeeping) makes time depend on n, not only on B, so the decode
table is two-dimensional. The table is timed over PROFILE_CONTEXT cached positions per request; attention
reads every cached key and value, so longer contexts cost more: per 1000 cached positions beyond it, a time
per request (reading its keys and values once) and a time per row, timed at one request
(`profile_context`).

A measurement is checked before the scheduler steers by it (`plausibility`): more tokens per request, more
requests or a longer prompt chunk never cost much less than fewer (beyond timing noise), and a remeasured
profile stays within a factor of two of the plausible profile it replaces. An implausible measurement (a
noisy neighbour, a frequency change mid-run) is measured again, up to `MEASURE_ATTEMPTS` times, and the
most plausible one is kept; a cached file is checked the same way when it is read, and remeasured if it
fails.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, PrivateAttr, ValidationError
from tqdm import tqdm

from dspark.kernels import simd_level, sources_digest
from dspark.models.linear import Linear
from dspark.models.llama import Transformer
from dspark.proposers.base import Proposer
from dspark.runtime import cache_root
from dspark.sampling import SamplingParams, params_tensors, processed_probs
from dspark.verify.rejection import verify

log = logging.getLogger(__name__)

# 1 + draft length; cut at the engine's longest draft. The fractional points are steps where a quarter or half
# of the requests verify one draft token: the first rows past a decode step cost more than the slope between
# whole tokens says (the kernels work on pairs or triples of rows), and that is the shape of a loaded step.
# Every whole count up to 9: the AVX-512 micro-kernel takes rows in pairs, so at one request 3 tokens cost
# what 4 do, 5 what 6 do (8.7, 10.1, 12.3, 12.2, 15.5, 15.9, 18.3, 18.3 ms for 1..8), which interpolating
# between 3 and 5 hid.
TOKENS_PER_REQUEST = (1, 1.25, 1.5, 2, 3, 4, 5, 6, 7, 8, 9, 17)
PROFILE_CONTEXT = 256  # cached positions per request while profiling: a typical chat turn
LONG_CONTEXT = 1280  # and where the cost of context is timed against it (held-out prompts reach ~1,500)
PREFILL_TOKENS = (32, 128, 512)
PROFILE_VERSION = 18  # bump when the step's code path or shapes change what it costs (kernels: their digest)


class CostProfile(BaseModel):
    """Median step times in milliseconds, indexed by running requests and tokens per request."""

    key: str
    requests: list[int]  # profiled numbers of requests, ascending
    tokens_per_request: list[float]  # profiled tokens per request (1 + draft length), ascending
    target_ms: list[list[float]]  # target_ms[i][j]: forward of requests[i] requests x tokens_per_request[j]
    draft_ms: list[float]  # draft_ms[i]: one propose call for requests[i] requests (0 without a drafter)
    # The same for sampled requests (temperature, top-p): a drafter draws them through its filtered
    # distribution, which may cost more than a greedy argmax. Empty: as greedy.
    sampled_draft_ms: list[float] = []
    # What each row of a step adds when a request in it samples: the target's distribution after temperature
    # and top-p over its whole vocabulary, for every row, and the rejection test that reads them; a greedy
    # step reads argmaxes. Per row, so a long sampled verification pays for its rows.
    sampled_row_ms: float = 0.0
    prefill_tokens: list[int] = []  # profiled prompt-chunk lengths, ascending
    prefill_ms: list[float] = []  # prefill_ms[i]: a forward of one prompt chunk of prefill_tokens[i] tokens
    # What 1000 cached positions beyond PROFILE_CONTEXT add to a step: per decoding request (its keys and
    # values read once) and per row it feeds (each row's scores and weighted values). Measured at 256 and
    # 1,536 cached positions on the 2-core Xeon: 1 row 5.2 ms per 1000, 8 rows 11.2 (attention reads fp32
    # keys and values at the memory's bandwidth).
    context_request_ms: float = 0.0
    context_row_ms: float = 0.0
    # _target_curve per request count: a scheduler asks for a few shapes' curves many times a step
    _curves: dict[int, list[float]] = PrivateAttr(default_factory=dict)

    def model_copy(self, *, update: dict | None = None, deep: bool = False) -> CostProfile:
        copy = super().model_copy(update=update, deep=deep)
        copy._curves = {}  # the update may change the table (pydantic shares private values)
        return copy

    def target_seconds(self, num_requests: int, num_tokens: int) -> float:
        curve = self._target_curve(num_requests)
        return _interp_extrapolated(num_tokens / max(num_requests, 1), self.tokens_per_request, curve) / 1000

    def _target_curve(self, num_requests: int) -> list[float]:
        """Forward ms per profiled tokens-per-request at `num_requests` requests. Both interpolations are
        linear in the times, so interpolating across requests first gives what interpolating across tokens
        first would, and a scheduler asking one step's many token counts pays for this once."""
        curve = self._curves.get(num_requests)
        if curve is None:
            columns = zip(*self.target_ms, strict=True)
            curve = self._curves[num_requests] = [self._across_requests(num_requests, c) for c in columns]
        return curve

    def draft_seconds(self, num_requests: int, sampled: bool = False) -> float:
        """One draft call for `num_requests` requests; `sampled`: some of them sample (the call then takes the
        sampled path for all)."""
        curve = self.sampled_draft_ms if sampled and self.sampled_draft_ms else self.draft_ms
        return self._across_requests(num_requests, curve) / 1000 if num_requests else 0.0

    def prefill_seconds(self, num_tokens: int) -> float:
        """What prompt chunks of `num_tokens` tokens add to a step (beyond a one-token forward)."""
        if not num_tokens or not self.prefill_tokens:
            return 0.0
        ms = _interp_extrapolated(num_tokens, self.prefill_tokens, self.prefill_ms)
        return max(ms - self.target_ms[0][0], 0.0) / 1000

    def step_seconds(
        self,
        num_requests: int,
        num_tokens: int,
        drafted: int | None = None,
        prefill_tokens: int = 0,
        sampled: bool = False,
        cached: int | None = None,
    ) -> float:
        """A step's time; the draft call served `drafted` of the requests (None: all of them), `sampled`:
        some of them sample; `cached`: positions cached by the decoding requests in all (None: the profile's
        PROFILE_CONTEXT each)."""
        draft = self.draft_seconds(num_requests if drafted is None else drafted, sampled)
        target = self._with_context(
            1000 * self.target_seconds(num_requests, num_tokens), num_requests, num_tokens, cached
        )
        extra = self.sampling_seconds(num_tokens, sampled) + self.prefill_seconds(prefill_tokens)
        return draft + target / 1000 + extra

    def _with_context(
        self, target_ms: float, num_requests: int, num_tokens: int, cached: int | None
    ) -> float:
        """The forward's ms with the decoding requests' `cached` positions in place of PROFILE_CONTEXT each:
        per request and per row (the rows spread evenly over the requests); at least half the profile's."""
        if cached is None or not num_requests:
            return target_ms
        beyond = cached / num_requests - PROFILE_CONTEXT  # per request past the profile's (< 0: fewer)
        extra = (self.context_request_ms * num_requests + self.context_row_ms * num_tokens) * beyond / 1000
        return max(target_ms + extra, target_ms / 2)

    def sampling_seconds(self, num_tokens: int, sampled: bool) -> float:
        """What the rows of a step add when some request in it samples."""
        return self.sampled_row_ms * num_tokens / 1000 if sampled else 0.0

    def steps_per_second(
        self, num_requests: int, drafted: int | None = None, sampled: bool = False, cached: int | None = None
    ) -> Callable[[int], float]:
        """SPS(B) for the decoding part of a step of `num_requests` decoding requests feeding B tokens,
        `drafted` of them drafted for (`sampled`: some of those sample): what Algorithm 1 trades against tau.
        The time of prompt chunks riding along, paid whatever is drafted, is left out: charged to the step, a
        300 ms chunk made a 30 ms draft call look nearly free (at 32 clients, steps with chunks paid ~3.8 ms
        per accepted draft token, draft calls and verified rows, where a full decoding step costs 2.8 ms per
        token). `cached`: as in `step_seconds`. Asked for many B each step: the parts that do not depend on
        B are computed once."""
        fixed_ms = 1000 * self.draft_seconds(num_requests if drafted is None else drafted, sampled)
        curve, grid = self._target_curve(num_requests), self.tokens_per_request
        requests, row_ms = max(num_requests, 1), self.sampled_row_ms if sampled else 0.0

        def sps(num_tokens: int) -> float:
            target_ms = _interp_extrapolated(num_tokens / requests, grid, curve)
            target_ms = self._with_context(target_ms, num_requests, num_tokens, cached)
            return 1000 / (fixed_ms + row_ms * num_tokens + target_ms)

        return sps

    def _across_requests(self, num_requests: int, values: Sequence[float]) -> float:
        """Interpolate in log(requests); beyond the largest profiled count, scale linearly."""
        counts = self.requests
        if num_requests >= counts[-1]:
            return float(values[-1]) * num_requests / counts[-1]
        return _interp_extrapolated(math.log(max(num_requests, 1)), [math.log(c) for c in counts], values)


def _interp_extrapolated(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Linear interpolation, clamped below the first point and continued linearly past the last (np.interp
    would clamp). Plain Python: the grids are a handful of points, asked thousands of times a second."""
    if x <= xs[0] or len(xs) == 1:
        return float(ys[0])
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)  # xs[i - 1] < x <= xs[i], or past the last point
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    return float(ys[i] + slope * (x - xs[i]))


# ---- plausibility ------------------------------------------------------------------------------------------

MAX_DROP = 0.25  # a larger shape may time this much below a smaller one (noise between interleaved runs)
SLACK_MS = 0.2  # and this much in absolute terms (sub-millisecond drafter calls are mostly noise)
MAX_RATIO = 2.0  # a remeasured profile's median time ratio to the one it replaces stays within [1/2, 2]
MEASURE_ATTEMPTS = 3  # measurements of one profile at most, the most plausible kept


@dataclass
class Plausibility:
    """What is implausible in a profile (nothing: `ok`); `score` ranks measurements (0 is plausible)."""

    problems: list[str] = field(default_factory=list)
    score: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def _monotone(self, values: Sequence[float], shapes: Sequence[object], what: str) -> None:
        peak, peak_shape = -math.inf, None
        for value, shape in zip(values, shapes, strict=True):
            if not math.isfinite(value) or value < 0:
                self.problems.append(f"{what}: {value} ms at {shape} is not a duration")
                self.score += 1.0
                continue
            floor = (1 - MAX_DROP) * peak - SLACK_MS
            if value < floor:
                self.problems.append(
                    f"{what}: {value} ms at {shape} is far below {peak} ms at the smaller {peak_shape}"
                )
                self.score += (floor - value) / peak
            if value > peak:
                peak, peak_shape = value, shape


def plausibility(profile: CostProfile, reference: CostProfile | None = None) -> Plausibility:
    """Check that times grow with the work (within noise) and, given the plausible profile a measurement
    replaces, that the machine did not become more than MAX_RATIO times faster or slower."""
    found = Plausibility()
    tokens, counts = profile.tokens_per_request, profile.requests
    shaped = len(profile.target_ms) == len(counts) and all(len(r) == len(tokens) for r in profile.target_ms)
    if (
        not shaped
        or len(profile.draft_ms) != len(counts)
        or len(profile.sampled_draft_ms) not in (0, len(counts))
        or len(profile.prefill_ms) != len(profile.prefill_tokens)
    ):
        return Plausibility([f"tables do not match the profiled shapes ({counts} x {tokens})"], math.inf)
    for n, row in zip(counts, profile.target_ms, strict=True):
        found._monotone(row, [f"{n} requests x {t:g} tokens" for t in tokens], "target forward")
    for j, t in enumerate(tokens):
        shapes = [f"{n} requests x {t:g} tokens" for n in counts]
        found._monotone([row[j] for row in profile.target_ms], shapes, "target forward")
    found._monotone(profile.prefill_ms, [f"a {t}-token chunk" for t in profile.prefill_tokens], "prefill")
    found._monotone(profile.draft_ms, [f"{n} requests" for n in counts], "draft call")
    if profile.sampled_draft_ms:
        found._monotone(profile.sampled_draft_ms, [f"{n} requests" for n in counts], "sampled draft call")
    durations = {
        "sampled rows": profile.sampled_row_ms,
        "context per request": profile.context_request_ms,
        "context per row": profile.context_row_ms,
    }
    for what, ms in durations.items():
        if not (math.isfinite(ms) and ms >= 0):
            found.problems.append(f"{what}: {ms} ms is not a duration")
            found.score += 1.0
    if reference is not None and _same_shapes(profile, reference):
        now = [v for row in profile.target_ms for v in row] + list(profile.prefill_ms)
        before = [v for row in reference.target_ms for v in row] + list(reference.prefill_ms)
        ratios = [a / b for a, b in zip(now, before, strict=True) if a > 0 and b > 0]
        ratio = statistics.median(ratios) if ratios else 1.0
        if not 1 / MAX_RATIO <= ratio <= MAX_RATIO:
            found.problems.append(f"{ratio:.2f}x the times of the profile it replaces")
            found.score += abs(math.log(ratio)) - math.log(MAX_RATIO)
    return found


def _same_shapes(a: CostProfile, b: CostProfile) -> bool:
    def shapes(p: CostProfile) -> tuple:
        return p.requests, p.tokens_per_request, p.prefill_tokens

    return shapes(a) == shapes(b)


@dataclass
class _ProfileRequest:
    """A stand-in running request for timing a proposer (the DraftRequest protocol)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None


def tokens_grid(num_speculative_tokens: int) -> list[float]:
    """Profiled tokens per request: the grid up to 1 + the longest draft, which is always included."""
    return sorted(
        {*(t for t in TOKENS_PER_REQUEST if t < 1 + num_speculative_tokens), 1 + num_speculative_tokens}
    )


def profile_key(
    model: Transformer, max_requests: int, num_speculative_tokens: int, proposer_signature: str
) -> str:
    cfg = model.cfg
    parts = [
        platform.machine(), platform.processor(), str(torch.get_num_threads()), torch.__version__,
        str(next(model.parameters()).device), str(model.embed.dtype), str(model.native is not None),
        f"{cfg.num_layers}x{cfg.hidden_size}x{cfg.intermediate_size}x{cfg.num_heads}x{cfg.vocab_size}",
        str(max_requests), str(num_speculative_tokens), proposer_signature, str(PROFILE_VERSION),
        sources_digest(), simd_level(),
        ",".join(sorted({m.weight_format for m in model.modules() if isinstance(m, Linear)})),
    ]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def request_counts(max_requests: int) -> list[int]:
    counts = [1]
    while counts[-1] * 2 < max_requests:
        counts.append(counts[-1] * 2)
    return sorted({*counts, max_requests})


ROUNDS = 5  # median of 5: at 3, single points of a batch-1 curve moved by +-10% between measurements
# A measurement yields after every timed run, so a server can measure in its idle time and stop at once
# when a request arrives; `ProfileMeasurement.run` drains it in one go.
Timing = Generator[None, None, dict]


def _interleaved_medians(runs: dict, rounds: int = ROUNDS) -> Timing:
    """Median ms of each run over `rounds` interleaved rounds: a slow spell on this shared machine then
    hits every shape alike instead of skewing the few measured during it (the scheduler uses ratios)."""
    times: dict = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            began = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - began) * 1000)
            yield
    return {key: round(statistics.median(t), 3) for key, t in times.items()}


def profile_target(
    model: Transformer, counts: Sequence[int], grid: Sequence[float]
) -> Generator[None, None, list[list[float]]]:
    """Median forward ms for each (requests, tokens per request), over filler context. A fractional count is
    requests x count rows, the first requests taking one token more; where that is not a whole number of rows
    (1.5 tokens for 1 request) the time is interpolated between the neighbouring counts."""
    max_new = math.ceil(max(grid))
    cache = model.new_cache(max(counts), PROFILE_CONTEXT + max_new)
    slots = [cache.allocate() for _ in range(max(counts))]
    filler = torch.randint(0, model.cfg.vocab_size, (PROFILE_CONTEXT,))
    model(filler, model.layout(slots[:1], [0], [PROFILE_CONTEXT]), cache, torch.tensor([0]))
    for slot in slots[1:]:  # every request shares the first one's context: one prefill, not n
        cache.copy_slot(slots[0], slot)

    def forward(n: int, per_request: float) -> None:
        used = slots[:n]
        rows = round(n * per_request)
        num_new = [rows // n + (i < rows % n) for i in range(n)]
        tokens = torch.randint(0, model.cfg.vocab_size, (rows,))
        layout = model.layout(used, [PROFILE_CONTEXT] * n, num_new)
        model(tokens, layout, cache, torch.arange(rows))  # verification needs every row's logits
        for slot in used:
            cache.rollback(slot, PROFILE_CONTEXT)

    forward(1, 1)  # warm-up
    measured = [[t for t in grid if _whole_rows(n, t)] for n in counts]
    shapes = [(n, t) for n, at in zip(counts, measured, strict=True) for t in at]
    ms = yield from _interleaved_medians({shape: lambda shape=shape: forward(*shape) for shape in shapes})
    return [_fill_between(at, [ms[n, t] for t in at], grid) for n, at in zip(counts, measured, strict=True)]


def _whole_rows(num_requests: int, tokens_per_request: float) -> bool:
    return abs(num_requests * tokens_per_request - round(num_requests * tokens_per_request)) < 1e-9


def _fill_between(measured_at: list[float], measured: list[float], grid: Sequence[float]) -> list[float]:
    """Values on the grid: the measured ones, and linear interpolation between them elsewhere."""
    return [round(_interp_extrapolated(t, measured_at, measured), 3) for t in grid]


def profile_context(model: Transformer, max_tokens: int) -> Generator[None, None, tuple[float, float]]:
    """What 1000 cached positions beyond PROFILE_CONTEXT add to one request's forward: (per request, per
    row), from 1 and `max_tokens` rows at PROFILE_CONTEXT and LONG_CONTEXT cached positions (never below 0:
    noise must not make context look free)."""
    cache = model.new_cache(2, LONG_CONTEXT + max_tokens)
    long, short = cache.allocate(), cache.allocate()
    model(torch.randint(0, model.cfg.vocab_size, (LONG_CONTEXT,)), model.layout([long], [0], [LONG_CONTEXT]),
          cache, torch.tensor([0]))  # fmt: skip
    cache.copy_slot(long, short)
    cache.rollback(short, PROFILE_CONTEXT)  # the same filler, cut short
    slots = {PROFILE_CONTEXT: short, LONG_CONTEXT: long}

    def forward(context: int, rows: int) -> None:
        tokens = torch.randint(0, model.cfg.vocab_size, (rows,))
        model(tokens, model.layout([slots[context]], [context], [rows]), cache, torch.arange(rows))
        cache.rollback(slots[context], context)

    shapes = [(c, t) for c in (PROFILE_CONTEXT, LONG_CONTEXT) for t in (1, max_tokens)]
    ms = yield from _interleaved_medians({shape: lambda shape=shape: forward(*shape) for shape in shapes})
    per_1000 = {t: 1000 * (ms[LONG_CONTEXT, t] - ms[PROFILE_CONTEXT, t]) / (LONG_CONTEXT - PROFILE_CONTEXT)
                for t in (1, max_tokens)}  # fmt: skip
    row = max(per_1000[max_tokens] - per_1000[1], 0.0) / (max_tokens - 1) if max_tokens > 1 else 0.0
    return round(max(per_1000[1] - row, 0.0), 4), round(row, 4)


def profile_prefill(model: Transformer) -> Generator[None, None, list[float]]:
    """Median forward ms of one prompt chunk of each PREFILL_TOKENS length, from an empty slot."""
    cache = model.new_cache(1, max(PREFILL_TOKENS))
    slot = cache.allocate()

    def forward(n: int) -> None:
        model(
            torch.randint(0, model.cfg.vocab_size, (n,)),
            model.layout([slot], [0], [n]),
            cache,
            torch.tensor([n - 1]),
        )
        cache.rollback(slot, 0)

    ms = yield from _interleaved_medians({n: lambda n=n: forward(n) for n in PREFILL_TOKENS})
    return [ms[n] for n in PREFILL_TOKENS]


OBSERVED_ROWS = 2  # committed rows per request and step a conditioned proposer observes while profiled


# What sampled requests are profiled with: a common chat setting (the cost hardly depends on the values).
PROFILE_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9)


def profile_proposer(
    proposer: Proposer | None,
    model: Transformer,
    counts: Sequence[int],
    num_speculative_tokens: int,
    params: SamplingParams | None = None,
) -> Generator[None, None, list[float]]:
    """Median ms of one step's proposer work for n requests of filler context (greedy, or sampling with
    `params`): observing the committed rows (conditioned drafters) and one propose call (drafts of the
    longest length)."""
    if proposer is None:
        return [0.0] * len(counts)
    requests = [
        _ProfileRequest(
            f"profile-{i}",
            torch.randint(0, model.cfg.vocab_size, (PROFILE_CONTEXT,)).tolist(),
            params or SamplingParams(),
        )
        for i in range(max(counts))
    ]
    layers = proposer.hidden_layers
    for r in requests:  # conditioned drafters need the target's features of the context
        if layers:
            features = torch.randn(PROFILE_CONTEXT - 1, model.cfg.hidden_size * len(layers))
            proposer.observe(r, features)
    max_len = max(num_speculative_tokens, 1)

    def step(n: int) -> None:
        """What a speculating step costs the proposer: observing the rows the last step committed (two per
        request: the bonus token and one accepted draft), then drafting."""
        for r in requests[:n]:
            if layers:
                proposer.observe(r, torch.randn(OBSERVED_ROWS, model.cfg.hidden_size * len(layers)))
            r.token_ids += torch.randint(0, model.cfg.vocab_size, (OBSERVED_ROWS,)).tolist()
        proposer.propose(requests[:n], [max_len] * n)

    try:
        step(max(counts))  # warm-up; a drafter that observes lazily computes every context here
        ms = yield from _interleaved_medians({n: lambda n=n: step(n) for n in counts})
        return [ms[n] for n in counts]
    finally:
        for r in requests:
            proposer.release(r)


SAMPLED_ROWS = 8  # rows of the largest sampled step timed: one request verifying a 7-token draft


def profile_sampled_rows(vocab_size: int) -> Generator[None, None, float]:
    """Median ms per row of a sampled step's verification work over the target's vocabulary: each row's
    distribution (`processed_probs` with PROFILE_SAMPLING) and the rejection test of a draft with its own
    distributions (`verify`); the slope between one row (no draft) and SAMPLED_ROWS. The logits are peaked, as
    a chat model's mostly are: on real answers top-p 0.9 keeps tokens among each row's few hundred largest
    logits, where the filters are decided without a vocabulary sort (dspark/sampling.py). Filler logits
    spread as SmolLM2's do on a chat answer (standard deviation ~4) with a few tokens far ahead cost per row
    what real ones do (0.18 against 0.15 ms for the filter; a wider spread, 0.32)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(SAMPLED_ROWS, vocab_size, generator=gen) * 4
    logits[:, :16] += 15
    draft_probs = torch.softmax(torch.randn(SAMPLED_ROWS - 1, vocab_size, generator=gen) * 4, -1)
    draft_tokens = torch.randint(0, 16, (SAMPLED_ROWS - 1,), generator=gen)
    params = {n: params_tensors([PROFILE_SAMPLING], [n]) for n in (1, SAMPLED_ROWS)}

    def verification(n: int) -> None:
        probs = processed_probs(logits[:n], *params[n])
        drafts = draft_probs[: n - 1] if n > 1 else None
        verify(probs, draft_tokens[: n - 1], [n - 1], drafts, [False], [None])

    verification(SAMPLED_ROWS)  # warm-up: the first call allocates
    ms = yield from _interleaved_medians({n: lambda n=n: verification(n) for n in (1, SAMPLED_ROWS)})
    return round(max(ms[SAMPLED_ROWS] - ms[1], 0.0) / (SAMPLED_ROWS - 1), 4)


def _measure(
    model: Transformer, proposer: Proposer | None, counts: list[int], grid: list[int], length: int, key: str
) -> Generator[None, None, CostProfile]:
    context_request_ms, context_row_ms = yield from profile_context(model, math.ceil(max(grid)))
    return CostProfile(
        key=key,
        requests=counts,
        tokens_per_request=grid,
        target_ms=(yield from profile_target(model, counts, grid)),
        draft_ms=(yield from profile_proposer(proposer, model, counts, length)),
        sampled_draft_ms=(yield from profile_proposer(proposer, model, counts, length, PROFILE_SAMPLING)),
        sampled_row_ms=(yield from profile_sampled_rows(model.cfg.vocab_size)),
        prefill_tokens=list(PREFILL_TOKENS),
        prefill_ms=(yield from profile_prefill(model)),
        context_request_ms=context_request_ms,
        context_row_ms=context_row_ms,
    )


class ProfileMeasurement:
    """Measures a cost profile whole (`run`) or one timed forward at a time (`advance`), and caches it.

    The runs are the engine's own forwards and propose calls on filler requests, so what is timed is what
    a step costs on this machine, with whatever else it is running at the time. An implausible result
    (`plausibility`, against `reference`: the profile it replaces, if any) is measured again, up to
    `attempts` times in all; the most plausible one is kept."""

    def __init__(
        self,
        model: Transformer,
        proposer: Proposer | None,
        max_requests: int,
        num_speculative_tokens: int,
        path: Path | None,
        key: str,
        reference: CostProfile | None = None,
        attempts: int = MEASURE_ATTEMPTS,
        measure: Callable[[], Generator[None, None, CostProfile]] | None = None,
    ) -> None:
        counts, grid = request_counts(max_requests), tokens_grid(num_speculative_tokens)
        self.runs_per_attempt = ROUNDS * (len(counts) * len(grid) + len(PREFILL_TOKENS))
        self.runs_per_attempt += 2 * ROUNDS * len(counts) if proposer is not None else 0  # greedy, sampled
        self.runs_per_attempt += 2 * ROUNDS  # sampled rows: 1 and SAMPLED_ROWS
        self.runs_per_attempt += 4 * ROUNDS  # context: 2 lengths x 2 row counts
        self.total_runs = self.runs_per_attempt
        self.path = path
        self.reference = reference
        self.attempts = attempts
        self.runs_done = 0
        self.profile: CostProfile | None = None
        self.rejected: list[tuple[CostProfile, Plausibility]] = []  # implausible measurements, in order
        self._seconds = 0.0
        self._measure = measure or (
            lambda: _measure(model, proposer, counts, grid, num_speculative_tokens, key)
        )
        self._steps = self._measure()

    def advance(self) -> CostProfile | None:
        """Time one more run; returns the profile (saved to the cache) once the last run is done."""
        began = time.perf_counter()
        try:
            next(self._steps)
            self.runs_done += 1
        except StopIteration as done:
            self._finish_attempt(done.value)
        self._seconds += time.perf_counter() - began
        return self.profile

    def _finish_attempt(self, profile: CostProfile) -> None:
        check = plausibility(profile, self.reference)
        if check.ok:
            self.profile = profile
        else:
            self.rejected.append((profile, check))
            if len(self.rejected) < self.attempts:
                log.warning("implausible cost profile, measuring again (%d/%d): %s",
                            len(self.rejected) + 1, self.attempts, "; ".join(check.problems))  # fmt: skip
                self.total_runs += self.runs_per_attempt
                self._steps = self._measure()
                return
            self.profile, check = min(self.rejected, key=lambda found: found[1].score)
            log.warning("cost profile implausible after %d measurements, keeping the most plausible: %s",
                        self.attempts, "; ".join(check.problems))  # fmt: skip
        self._save()

    def run(self, progress: bool = True) -> CostProfile:
        bar = tqdm(total=self.total_runs, desc="cost profile", unit="run", disable=not progress)
        while self.advance() is None:
            bar.total = self.total_runs
            bar.update(1)
        bar.close()
        return self.profile

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.profile.model_dump(), indent=1))
        log.info("cost profile measured in %.1fs (%s): %s", self._seconds, self.path, _describe(self.profile))


def measure_profile(
    model: Transformer, proposer: Proposer | None, max_requests: int, num_speculative_tokens: int, key: str
) -> CostProfile:
    """Measure a profile now (not cached)."""
    return ProfileMeasurement(model, proposer, max_requests, num_speculative_tokens, None, key).run()


def profile_dir() -> Path:
    return cache_root() / "profiles"


def cached_or_measurement(
    model: Transformer,
    proposer: Proposer | None,
    max_requests: int,
    num_speculative_tokens: int,
    directory: Path | None,
    remeasure: bool = False,
) -> CostProfile | ProfileMeasurement:
    """The cached profile of this machine, model and drafter (in `directory`; None: never cached), or the
    measurement that will produce and cache it: when none is cached, when the cached file is unreadable or
    implausible, or with `remeasure` (the new measurement is then checked against the cached one)."""
    signature = proposer.cost_signature if proposer is not None else "none"
    key = profile_key(model, max_requests, num_speculative_tokens, signature)
    path = directory / f"{key}.json" if directory is not None else None
    cached = _read_cached(path, key)
    if cached is not None and not remeasure:
        log.info("cost profile %s (cached): %s", path, _describe(cached))
        return cached
    return ProfileMeasurement(
        model, proposer, max_requests, num_speculative_tokens, path, key, reference=cached
    )


def _read_cached(path: Path | None, key: str) -> CostProfile | None:
    """A cached profile that validates, belongs to `key` and is plausible; else None (remeasure)."""
    if path is None or not path.exists():
        return None
    try:
        profile = CostProfile.model_validate_json(path.read_text())
    except (ValidationError, OSError, UnicodeDecodeError) as err:
        log.warning("cost profile %s is unreadable, remeasuring: %s", path, err)
        return None
    if profile.key != key:
        log.warning("cost profile %s belongs to another setup (%s), remeasuring", path, profile.key)
        return None
    check = plausibility(profile)
    if not check.ok:
        log.warning("cached cost profile %s is implausible, remeasuring: %s", path, "; ".join(check.problems))
        return None
    return profile


def load_or_measure(
    model: Transformer,
    proposer: Proposer | None,
    max_requests: int,
    num_speculative_tokens: int,
    directory: Path | None,
    remeasure: bool = False,
) -> CostProfile:
    """The cached profile, measured now (with a progress bar) when missing, implausible or `remeasure`d."""
    found = cached_or_measurement(model, proposer, max_requests, num_speculative_tokens, directory, remeasure)
    if isinstance(found, CostProfile):
        return found
    log.info("measuring the cost profile of this machine (%d timed runs, cached for later starts)",
             found.total_runs)  # fmt: skip
    return found.run()


def _describe(profile: CostProfile) -> str:
    single = dict(zip(profile.tokens_per_request, profile.target_ms[0], strict=True))
    return (
        f"target ms, 1 request by tokens {single}; "
        f"{profile.requests[-1]} requests x 1 token {profile.target_ms[-1][0]} ms; "
        f"draft ms by requests {dict(zip(profile.requests, profile.draft_ms, strict=True))} "
        f"(sampled {dict(zip(profile.requests, profile.sampled_draft_ms, strict=False))}); "
        f"sampled rows {profile.sampled_row_ms} ms each; "
        f"per 1000 cached positions {profile.context_request_ms} ms a request, "
        f"{profile.context_row_ms} a row; "
        f"prefill ms by chunk {dict(zip(profile.prefill_tokens, profile.prefill_ms, strict=True))}"
    )
