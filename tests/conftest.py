"""Shared fixtures: the default model (lean and Hugging Face), its tokenizer and the dev prompts.

Everything is loaded once per session; the machine is small, so torch uses two threads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

DATASETS_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEV_PROMPTS = DATASETS_DIR / "dev_prompts.jsonl"


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
    """First user turn of every dev prompt; tests using it are skipped when the file is absent."""
    if not DEV_PROMPTS.exists():
        pytest.skip(f"{DEV_PROMPTS} not found")
    prompts = []
    with DEV_PROMPTS.open() as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["turns"][0])
    return prompts


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
