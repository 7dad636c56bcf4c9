"""A stream whose engine dies resumes on another engine: the client's tokens and text equal an
uninterrupted run's, client errors are not retried, and a request nobody can take ends as Unavailable."""

from __future__ import annotations

import asyncio

import pytest

from dspark.assembly import build_engine
from dspark.engine import Engine, EngineConfig, RequestOutput, ResumeState
from dspark.errors import InvalidRequestError, UnavailableError
from dspark.sampling import SamplingParams
from dspark.scheduling import VerificationConfig
from dspark.serving.resume import ResumeConfig, resumable

PARAMS = SamplingParams(max_tokens=32, ignore_eos=True)


class ReplicaDied(RuntimeError):
    pass


def is_fault(err: BaseException) -> bool:
    return isinstance(err, ReplicaDied)


@pytest.fixture(scope="module")
def engines(default_model, tokenizer) -> list[Engine]:
    config = EngineConfig(proposer="ngram", max_batch_size=1, verification=VerificationConfig(policy="fixed"))
    return [build_engine(config, model=default_model, tokenizer=tokenizer) for _ in range(2)]


def starter(engines: list[Engine], prompt: str, fail_after: list[int | None]):
    """Stream i runs on engines[i % 2] and dies after fail_after[i] outputs (None: runs to the end)."""
    calls: list[ResumeState | None] = []

    def start(resume: ResumeState | None):
        attempt = len(calls)
        calls.append(resume)
        engine = engines[attempt % len(engines)]

        async def stream():
            request_id = engine.add_request(prompt, PARAMS, resume=resume)
            sent = 0
            try:
                while engine.has_unfinished():
                    for out in engine.step():
                        if attempt < len(fail_after) and fail_after[attempt] == sent:
                            raise ReplicaDied(f"replica of attempt {attempt} died")
                        sent += 1
                        yield out
            finally:
                engine.abort(request_id)  # a no-op once finished; frees the slot of a dead or closed stream

        return stream()

    return start, calls


def collect(stream) -> list[RequestOutput]:
    async def run():
        return [out async for out in stream]

    return asyncio.run(run())


def test_stream_resumes_on_another_engine_without_gap_or_repeat(engines):
    prompt = "Write a short poem about the sea."
    start, _ = starter(engines, prompt, [None])
    whole = collect(resumable(start, is_fault))
    start, calls = starter(engines, prompt, [3, 2])  # dies twice, on both engines, then completes
    got = collect(resumable(start, is_fault, ResumeConfig(first_backoff_s=0.01)))
    assert [t for o in got for t in o.token_ids] == [t for o in whole for t in o.token_ids]
    assert "".join(o.text for o in got) == "".join(o.text for o in whole)
    assert got[-1].finished and got[-1].num_output_tokens == PARAMS.max_tokens
    assert len({o.request_id for o in got}) == 1  # the client sees one request
    assert calls[0] is None and calls[1] is not None and len(calls) == 3
    assert calls[2].output_ids[: len(calls[1].output_ids)] == calls[1].output_ids


def test_client_errors_are_not_retried(engines):
    calls = []

    def start(resume):
        calls.append(resume)

        async def stream():
            raise InvalidRequestError("sampling.max_tokens", "too many")
            yield  # an async generator

        return stream()

    with pytest.raises(InvalidRequestError):
        collect(resumable(start, is_fault))
    assert len(calls) == 1


def test_nobody_to_resume_on_ends_as_unavailable():
    def start(resume):
        async def stream():
            raise ReplicaDied("no replica")
            yield

        return stream()

    with pytest.raises(UnavailableError, match="no replica"):
        collect(resumable(start, is_fault, ResumeConfig(retry_timeout_s=0.2, first_backoff_s=0.02)))


def test_a_stream_that_ends_early_is_resumed(engines):
    prompt = "Name three rivers."
    start, _ = starter(engines, prompt, [None])
    whole = collect(resumable(start, is_fault))
    attempts = []

    def start_cut(resume):
        attempts.append(resume)
        inner = start(resume)

        async def stream():
            async for i, out in _enumerate(inner):
                yield out
                if len(attempts) == 1 and i == 1:
                    await inner.aclose()
                    return  # the replica shut down: no final output

        return stream()

    got = collect(resumable(start_cut, is_fault, ResumeConfig(first_backoff_s=0.01)))
    assert [t for o in got for t in o.token_ids] == [t for o in whole for t in o.token_ids]
    assert len(attempts) == 2


async def _enumerate(stream):
    i = 0
    async for item in stream:
        yield i, item
        i += 1
