"""Shared fixtures: the default model (lean and Hugging Face), its tokenizer and the dev prompts.

Everything is loaded once per session; the machine is small, so torch uses two threads
(DSPARK_TEST_THREADS overrides, e.g. 1 while a training job holds the other core).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch

from dspark.prompts import dev_prompts_path, load_prompts
from dspark.runtime import set_threads

set_threads(int(os.environ.get("DSPARK_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def default_model():
    """The lean Transformer of the default model (SmolLM2-135M-Instruct), fp32, packed weights."""
    from dspark.models.loader import load_transformer

    return load_transformer("default")


@pytest.fixture(scope="session")
def tokenizer():
    from dspark.models.loader import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def hf_model():
    """The Hugging Face reference implementation of the same checkpoint, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    from dspark.models.loader import resolve_model_dir

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir("default"), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def dev_prompts() -> list[str]:
    """First user turn of every dev prompt (data/dev_prompts.jsonl, part of the repository)."""
    return [record.turns[0] for record in load_prompts(dev_prompts_path())]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a single user turn through the chat template, ready for the assistant's reply."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )


@pytest.fixture(scope="session")
def to_chat_ids(tokenizer) -> Callable[[str], list[int]]:
    """`to_chat_ids(prompt)` -> chat-template ids with the session tokenizer."""
    return lambda prompt: chat_ids(tokenizer, prompt)


# ---- process exit -----------------------------------------------------------------------------------------

_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Leave without interpreter teardown once pytest is done (results printed, exit status kept).

    One process here has loaded Ray's core worker, gRPC's C core, gloo and torch's thread pools, and
    started and stopped several of them; CI saw that teardown crash (SIGSEGV, exit 139) after every test had
    passed. No test checks anything there, and `dspark serve` and the engine never run it in one process, so
    the suite skips it rather than turn a clean run red. PYTHONFAULTHANDLER (set in .ci/run) would still
    print the stacks of a crash before this point."""
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
