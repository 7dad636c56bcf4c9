"""Side by side: the same closed-loop streaming chat load against OpenAI-compatible servers, one at a time.

    python -m load_tests.openai_side_by_side --endpoint dspark=http://127.0.0.1:8000 \
        --endpoint vllm=http://127.0.0.1:8001 --concurrency 1 8 32 --max-tokens 128 --num-prompts 36 \
        --output results.json --png results.png

    # servers that cannot be up together: one run file each, combined afterwards
    python -m load_tests.openai_side_by_side --endpoint dspark=http://127.0.0.1:8000 --output-run dspark.json
    python -m load_tests.openai_side_by_side --endpoint vllm=http://127.0.0.1:8001 --output-run vllm.json
    python -m load_tests.openai_side_by_side combine dspark.json vllm.json --output out.json --png out.png

    # wait until a server answers GET /health (or /v1/models); 0: up, 1: timed out or its process died
    python -m load_tests.openai_side_by_side wait http://127.0.0.1:8000 --timeout-s 300 --pid PID

Endpoints run one after the other, never at the same time (they would compete for the same cores). At each
concurrency C, C clients take prompts from one shared queue (the first `num_prompts` dev prompts, their first
turn as the user message, in a fixed order) and stream a greedy chat completion for each (temperature 0,
`max_tokens`), one after the other, until every prompt was sent once. Per request: time to first content
token, end-to-end latency, completion tokens (the server's usage with `stream_options.include_usage`, else
the count of content chunks, which undercounts a server that sends several tokens per chunk), the text and
tokens/s (completion tokens / end-to-end latency, as load_tests/grpc_load.py measures per-user speed). Per
run: throughput (all completion tokens / wall time), median per-user tokens/s, TTFT p50/p90 and the texts in
prompt order. Combined: the first endpoint's per-user and throughput ratios over each other one, and per
prompt whether every endpoint produced the same text (greedy decoding of the same model should).

The clients are `openai.AsyncOpenAI` tasks on one event loop rather than threads: C concurrent streams cost
one core's worth of client at most (no thread per user competing with the servers on a small machine, no GIL
hand-offs inside the timings), and a shared iterator is a race-free queue between awaits. Retries are off
(`max_retries=0`) so that a refused request is recorded, not hidden in a longer latency. Only loopback
servers are accepted unless `--allow-remote`: this tool must not hammer other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import openai
from openai.types.chat import ChatCompletionChunk
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from dspark.prompts import load_prompts
from load_tests.grpc_load import is_loopback

# dspark.serving.config.API_KEY_ENV; not imported from there, which would pull in the engine (torch)
API_KEY_ENV = "DSPARK_API_KEY"
NO_KEY = "EMPTY"  # the openai client insists on a key; servers without keys ignore it


# ---- config and reports ----------------------------------------------------------------------------------


class Endpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="label in reports and file names")
    base_url: str = Field(description="the server's OpenAI base URL; '/v1' is appended when missing")
    model: str | None = Field(None, description="model name sent in requests; None: first of GET /v1/models")

    @field_validator("base_url")
    @classmethod
    def _v1(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {url!r} is not an http(s) URL")
        url = url.rstrip("/")
        return url if url.endswith("/v1") else f"{url}/v1"

    @property
    def root(self) -> str:
        """The server's root URL, where /health lives."""
        return self.base_url.removesuffix("/v1")


class SideBySideConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[Endpoint] = Field(min_length=1, description="run in this order; the first: the baseline")
    concurrency: list[PositiveInt] = Field([1, 8, 32], min_length=1)
    max_tokens: int = Field(128, ge=1)
    num_prompts: int | None = Field(36, ge=1, description="the first N dev prompts; None: all of them")
    prompts_file: str | None = Field(None, description="JSONL prompt records; None: data/dev_prompts.jsonl")
    api_key: str = Field(
        default_factory=lambda: os.environ.get(API_KEY_ENV) or NO_KEY,
        min_length=1,
        repr=False,
        exclude=True,  # never written into a report
        description=f"sent as `Authorization: Bearer KEY` to every endpoint; unset: ${API_KEY_ENV} or none",
    )
    warmup_requests: int = Field(1, ge=0, description="unmeasured requests before each concurrency's run")
    include_usage: bool = Field(True, description="ask for usage (stream_options); False: count chunks")
    request_timeout_s: float = Field(600.0, gt=0)
    allow_remote: bool = Field(False, description="accept endpoints that are not loopback addresses")

    @model_validator(mode="after")
    def _check_endpoints(self) -> SideBySideConfig:
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoint names must be unique: {names}")
        for endpoint in self.endpoints:
            host = urlsplit(endpoint.base_url).hostname or ""
            if not self.allow_remote and not is_loopback(host):
                raise ValueError(
                    f"endpoint {endpoint.name}: host {host!r} is not loopback (127.0.0.0/8, ::1, localhost); "
                    "pass allow_remote (--allow-remote) to load a remote server on purpose"
                )
        return self


class RequestRecord(BaseModel):
    prompt_index: int
    ok: bool
    ttft_s: float | None = Field(None, description="until the first chunk with content")
    e2e_s: float
    completion_tokens: int = 0
    tokens_from_usage: bool = Field(False, description="False: counted content chunks")
    tokens_per_s: float | None = Field(None, description="completion_tokens / e2e_s")
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None


class RunReport(BaseModel):
    """One endpoint at one concurrency: every prompt sent once."""

    endpoint: str
    model: str
    concurrency: int
    max_tokens: int
    wall_time_s: float
    completed: int
    errors: int
    output_tokens: int = Field(description="completion tokens of the completed requests")
    throughput_tok_s: float = Field(description="output_tokens / wall_time_s")
    per_user_tok_s_median: float | None
    ttft_ms_p50: float | None
    ttft_ms_p90: float | None
    e2e_ms_p50: float | None
    usage_reported: bool = Field(description="every completed request's tokens came from the server's usage")
    requests: list[RequestRecord] = Field(description="in prompt order")

    @property
    def texts(self) -> list[str | None]:
        """The completion of each prompt in prompt order; None where its request failed."""
        return [r.text if r.ok else None for r in self.requests]


class EndpointReport(BaseModel):
    """What `--output-run` writes: one endpoint's runs, enough to be combined with another's later."""

    config: SideBySideConfig = Field(description="with this endpoint alone, its model resolved")
    prompt_ids: list[str]
    runs: list[RunReport]


class Comparison(BaseModel):
    baseline: str
    other: str
    concurrency: int
    per_user_median_ratio: float | None = Field(description="baseline / other, median per-user tokens/s")
    throughput_ratio: float | None = Field(description="baseline / other, total output tokens/s")
    identical_texts: int
    compared_texts: int = Field(description="prompts both completed")
    differing_prompts: list[int]


class TextAgreement(BaseModel):
    concurrency: int
    identical_per_prompt: list[bool] = Field(description="every endpoint completed it with the same text")
    identical: int


class SideBySideReport(BaseModel):
    config: SideBySideConfig
    prompt_ids: list[str]
    runs: dict[str, list[RunReport]] = Field(description="endpoint name -> one run per concurrency")
    comparisons: list[Comparison] = Field(description="the first endpoint over each other one")
    texts_identical: list[TextAgreement] = Field(description="across all endpoints, per concurrency")

    def summary(self) -> str:
        lines = []
        for name, runs in self.runs.items():
            for r in runs:
                user = "n/a" if r.per_user_tok_s_median is None else f"{r.per_user_tok_s_median:.1f}"
                ttft = "n/a" if r.ttft_ms_p50 is None else f"{r.ttft_ms_p50:.0f}/{r.ttft_ms_p90:.0f}"
                lines.append(f"{name:>12} c={r.concurrency:<3} {r.throughput_tok_s:8.1f} tok/s total, "
                             f"{user:>7} tok/s per user, TTFT p50/p90 {ttft} ms, "
                             f"{r.completed} ok, {r.errors} errors")  # fmt: skip
        for c in self.comparisons:
            ratios = f"per-user x{_fmt(c.per_user_median_ratio)}, throughput x{_fmt(c.throughput_ratio)}"
            lines.append(f"{c.baseline}/{c.other} c={c.concurrency}: {ratios}, "
                         f"{c.identical_texts}/{c.compared_texts} texts identical")  # fmt: skip
        return "\n".join(lines)


def _fmt(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


# ---- one request, one run --------------------------------------------------------------------------------


@dataclass
class _Session:
    """One endpoint's client; `include_usage` turns off for good once the server rejects stream_options."""

    client: openai.AsyncOpenAI
    model: str
    max_tokens: int
    include_usage: bool


async def default_model(client: openai.AsyncOpenAI) -> str:
    models = await client.models.list()
    if not models.data:
        raise ValueError(f"{client.base_url}models lists no model: pass --model NAME=MODEL")
    return models.data[0].id


async def _create(session: _Session, prompt: str) -> openai.AsyncStream[ChatCompletionChunk]:
    """Start the stream (status errors raise here, before the first chunk)."""
    kwargs = {
        "model": session.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": session.max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    if session.include_usage:
        try:
            return await session.client.chat.completions.create(
                **kwargs, stream_options={"include_usage": True}
            )
        except openai.BadRequestError as err:
            if "stream_options" not in str(err):
                raise
            session.include_usage = False  # an older server: count chunks from now on
    return await session.client.chat.completions.create(**kwargs)


async def stream_one(session: _Session, index: int, prompt: str) -> RequestRecord:
    start = time.perf_counter()
    ttft, parts, finish, usage_tokens = None, [], None, None
    try:
        stream = await _create(session, prompt)
        async with stream:  # closes the connection on an error mid-stream too
            async for chunk in stream:
                if chunk.usage is not None:  # vLLM: a last chunk without choices; DSpark: on the final delta
                    usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        if ttft is None:  # the role-only opening chunk carries no token
                            ttft = time.perf_counter() - start
                        parts.append(choice.delta.content)
                    finish = choice.finish_reason or finish
    except Exception as err:  # a failed request is recorded; the run goes on
        e2e = time.perf_counter() - start
        return RequestRecord(prompt_index=index, ok=False, e2e_s=e2e, ttft_s=ttft, text="".join(parts),
                             error=f"{type(err).__name__}: {err}")  # fmt: skip
    e2e = time.perf_counter() - start
    tokens = usage_tokens if usage_tokens is not None else len(parts)
    return RequestRecord(prompt_index=index, ok=True, ttft_s=ttft, e2e_s=e2e, completion_tokens=tokens,
                         tokens_from_usage=usage_tokens is not None, finish_reason=finish,
                         text="".join(parts), tokens_per_s=tokens / e2e if e2e > 0 else None)  # fmt: skip


async def _closed_loop(session: _Session, prompts: list[str], concurrency: int) -> list[RequestRecord]:
    """`concurrency` clients share one queue of prompts; each streams one request after the other."""
    queue = iter(enumerate(prompts))  # next() never interleaves between awaits: each prompt goes out once

    async def client() -> list[RequestRecord]:
        return [await stream_one(session, index, prompt) for index, prompt in queue]

    batches = await asyncio.gather(*(client() for _ in range(min(concurrency, len(prompts)))))
    return sorted((r for batch in batches for r in batch), key=lambda r: r.prompt_index)


def _percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else None


def build_run(
    name: str, session: _Session, concurrency: int, records: list[RequestRecord], wall: float
) -> RunReport:
    ok = [r for r in records if r.ok]
    per_user = [r.tokens_per_s for r in ok if r.tokens_per_s is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    output_tokens = sum(r.completion_tokens for r in ok)
    return RunReport(
        endpoint=name, model=session.model, concurrency=concurrency, max_tokens=session.max_tokens,
        wall_time_s=wall, completed=len(ok), errors=len(records) - len(ok), output_tokens=output_tokens,
        throughput_tok_s=output_tokens / wall if wall > 0 else 0.0,
        per_user_tok_s_median=float(np.median(per_user)) if per_user else None,
        ttft_ms_p50=_percentile_ms(ttft, 50), ttft_ms_p90=_percentile_ms(ttft, 90),
        e2e_ms_p50=_percentile_ms([r.e2e_s for r in ok], 50),
        usage_reported=all(r.tokens_from_usage for r in ok), requests=records,
    )  # fmt: skip


async def run_once(name: str, session: _Session, prompts: list[str], concurrency: int) -> RunReport:
    start = time.perf_counter()
    records = await _closed_loop(session, prompts, concurrency)
    return build_run(name, session, concurrency, records, time.perf_counter() - start)


# ---- endpoints, combining --------------------------------------------------------------------------------


def load_prompt_set(config: SideBySideConfig) -> tuple[list[str], list[str]]:
    """(ids, first user turns) of the prompt set, in the order requests are issued."""
    records = [r for r in load_prompts(config.prompts_file, limit=config.num_prompts) if r.turns]
    if not records:
        raise ValueError("the prompt file has no prompts")
    return [r.id for r in records], [r.turns[0] for r in records]


async def run_endpoint(config: SideBySideConfig, endpoint: Endpoint) -> EndpointReport:
    """Every concurrency against one endpoint, each after `warmup_requests` unmeasured requests."""
    ids, prompts = load_prompt_set(config)
    client = openai.AsyncOpenAI(
        base_url=endpoint.base_url, api_key=config.api_key, max_retries=0, timeout=config.request_timeout_s
    )
    try:
        model = endpoint.model or await default_model(client)
        session = _Session(client, model, config.max_tokens, config.include_usage)
        runs = []
        for concurrency in config.concurrency:
            if config.warmup_requests:
                warm = [prompts[i % len(prompts)] for i in range(config.warmup_requests)]
                await _closed_loop(session, warm, concurrency)
            runs.append(await run_once(endpoint.name, session, prompts, concurrency))
            print(f"{endpoint.name} c={concurrency}: {runs[-1].throughput_tok_s:.1f} tok/s total, "
                  f"{runs[-1].errors} errors", flush=True)  # fmt: skip
    finally:
        await client.close()
    resolved = endpoint.model_copy(update={"model": model})
    return EndpointReport(
        config=config.model_copy(update={"endpoints": [resolved]}), prompt_ids=ids, runs=runs
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare(baseline: RunReport, other: RunReport) -> Comparison:
    both = [(a, b) for a, b in zip(baseline.requests, other.requests, strict=True) if a.ok and b.ok]
    differing = [a.prompt_index for a, b in both if a.text != b.text]
    return Comparison(
        baseline=baseline.endpoint, other=other.endpoint, concurrency=baseline.concurrency,
        per_user_median_ratio=_ratio(baseline.per_user_tok_s_median, other.per_user_tok_s_median),
        throughput_ratio=_ratio(baseline.throughput_tok_s, other.throughput_tok_s),
        identical_texts=len(both) - len(differing), compared_texts=len(both), differing_prompts=differing,
    )  # fmt: skip


def _agreement(concurrency: int, runs: list[RunReport]) -> TextAgreement:
    columns = zip(*(r.texts for r in runs), strict=True)  # same prompts: combine checked
    per_prompt = [None not in texts and len(set(texts)) == 1 for texts in columns]
    return TextAgreement(concurrency=concurrency, identical_per_prompt=per_prompt, identical=sum(per_prompt))


def combine(reports: list[EndpointReport]) -> SideBySideReport:
    """One report from endpoints measured separately: same prompts and max_tokens required; ratios and text
    agreement at the concurrencies every endpoint ran."""
    first = reports[0]
    for report in reports[1:]:
        if report.prompt_ids != first.prompt_ids or report.config.max_tokens != first.config.max_tokens:
            name = report.config.endpoints[0].name
            raise ValueError(f"{name} ran other prompts or max_tokens than {first.config.endpoints[0].name}")
    by_name = {r.config.endpoints[0].name: {run.concurrency: run for run in r.runs} for r in reports}
    common = [c for c in first.config.concurrency if all(c in runs for runs in by_name.values())]
    base, *others = by_name.values()
    endpoints = [e.model_dump() for r in reports for e in r.config.endpoints]
    return SideBySideReport(
        config=SideBySideConfig.model_validate(first.config.model_dump() | {"endpoints": endpoints}),
        prompt_ids=first.prompt_ids,
        runs={name: list(runs.values()) for name, runs in by_name.items()},
        comparisons=[compare(base[c], other[c]) for other in others for c in common],
        texts_identical=[_agreement(c, [runs[c] for runs in by_name.values()]) for c in common],
    )


async def run_side_by_side(config: SideBySideConfig) -> SideBySideReport:
    """Each endpoint in turn (never two at once), then combined."""
    return combine([await run_endpoint(config, endpoint) for endpoint in config.endpoints])


# ---- outputs ---------------------------------------------------------------------------------------------


def plot(report: SideBySideReport, path: str | Path) -> None:
    """Throughput (x) against median per-user tokens/s (y): one line per endpoint, points labelled by C."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, runs in report.runs.items():
        points = [(r.throughput_tok_s, r.per_user_tok_s_median or 0.0, r.concurrency) for r in runs]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for x, y, c in points:
            ax.annotate(f"c={c}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="total output tokens/s", ylabel="tokens/s per user (median)",
           title=f"Greedy streaming chat, max_tokens {report.config.max_tokens}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_model(path: str | Path, model: BaseModel) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(model.model_dump_json(indent=2) + "\n")


def write_outputs(report: SideBySideReport, output: str | None, png: str | None) -> None:
    if output:
        write_model(output, report)
        print(f"wrote {output}")
    if png:
        plot(report, png)
        print(f"wrote {png}")


# ---- waiting for a server --------------------------------------------------------------------------------


def answers(root: str, api_key: str, timeout_s: float = 2.0) -> bool:
    """GET /health answers 200, or (a server without /health) GET /v1/models does."""
    for path in ("/health", "/v1/models"):
        headers = {"Authorization": f"Bearer {api_key}"}  # /health is open; /v1/models may want the key
        request = urllib.request.Request(root.rstrip("/") + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status == 200
        except urllib.error.HTTPError as err:
            if err.code != 404:
                return False  # 503 while the engine starts: not ready yet
        except (OSError, ValueError):
            return False  # nothing listening yet
    return False


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_until_ready(root: str, timeout_s: float, pid: int | None = None, api_key: str = NO_KEY) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if answers(root, api_key):
            return True
        if time.monotonic() >= deadline or not _alive(pid):
            return False
        time.sleep(1.0)


# ---- CLI -------------------------------------------------------------------------------------------------

PROG = "python -m load_tests.openai_side_by_side"


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} {value!r}: expected NAME=VALUE")
        out[name] = rest
    return out


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n")[0],
        epilog=f"also: `{PROG} combine RUN.json [RUN.json ...]`, `{PROG} wait URL` (module docstring)",
    )  # fmt: skip
    parser.add_argument(
        "--endpoint",
        action="append",
        required=True,
        metavar="NAME=URL",
        help="an OpenAI-compatible server (repeat; the first is the baseline of the ratios)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=MODEL",
        help="model name sent to endpoint NAME (default: the first of its GET /v1/models)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=36)
    parser.add_argument("--prompts", default=None, help="JSONL prompt file (default: data/dev_prompts.jsonl)")
    parser.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}, else none")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each concurrency")
    parser.add_argument("--no-usage", action="store_true", help="do not ask for usage; count chunks")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--allow-remote", action="store_true", help="accept non-loopback endpoints")
    parser.add_argument("--output-run", default=None, metavar="PATH",
                        help="also write each endpoint's runs alone (for `combine`); with several endpoints "
                        "PATH must contain {name}")  # fmt: skip
    parser.add_argument("--output", default=None, help="the combined JSON report")
    parser.add_argument("--png", default=None, help="throughput vs per-user tokens/s plot")
    return parser


def _config(args: argparse.Namespace) -> SideBySideConfig:
    urls, models = _pairs(args.endpoint, "--endpoint"), _pairs(args.model, "--model")
    if unknown := set(models) - set(urls):
        raise ValueError(f"--model names unknown endpoints: {sorted(unknown)}")
    endpoints = [{"name": name, "base_url": url, "model": models.get(name)} for name, url in urls.items()]
    fields = {
        "endpoints": endpoints, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "num_prompts": args.num_prompts, "prompts_file": args.prompts, "warmup_requests": args.warmup,
        "include_usage": not args.no_usage, "request_timeout_s": args.request_timeout_s,
        "allow_remote": args.allow_remote,
    }  # fmt: skip
    if args.api_key:
        fields["api_key"] = args.api_key
    return SideBySideConfig.model_validate(fields)


async def _run_all(config: SideBySideConfig, output_run: str | None) -> SideBySideReport:
    reports = []
    for endpoint in config.endpoints:  # one at a time: the servers must not compete for the machine
        reports.append(await run_endpoint(config, endpoint))
        if output_run:
            write_model(output_run.replace("{name}", endpoint.name), reports[-1])
    return combine(reports)


def _run_main(argv: list[str]) -> int:
    parser = _run_parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except (ValidationError, ValueError) as err:
        parser.error(str(err))
    if args.output_run and len(config.endpoints) > 1 and "{name}" not in args.output_run:
        parser.error("--output-run with several endpoints needs {name} in the path")
    errors = (openai.OpenAIError, FileNotFoundError, ValueError)
    return _finish(lambda: asyncio.run(_run_all(config, args.output_run)), errors, args)


def _finish(build, errors: tuple[type[BaseException], ...], args: argparse.Namespace) -> int:
    """Build the report, print its summary and write its files; an expected error exits 2 with its message."""
    try:
        report = build()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary(), flush=True)
    write_outputs(report, args.output, args.png)
    return 0


def _combine_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{PROG} combine", description="combine --output-run files")
    parser.add_argument("runs", nargs="+", help="files --output-run wrote; the first is the baseline")
    parser.add_argument("--output", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)

    def build() -> SideBySideReport:
        return combine([EndpointReport.model_validate_json(Path(p).read_text()) for p in args.runs])

    return _finish(build, (OSError, ValidationError, ValueError), args)


def _wait_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{PROG} wait", description="wait until a server answers")
    parser.add_argument("url", help="the server's root URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--pid", type=int, default=None, help="give up as soon as this process is gone")
    args = parser.parse_args(argv)
    ready = wait_until_ready(args.url, args.timeout_s, args.pid, os.environ.get(API_KEY_ENV) or NO_KEY)
    print(f"{args.url}: {'ready' if ready else 'not answering'}", flush=True)
    return 0 if ready else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"combine": _combine_main, "wait": _wait_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return _run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
