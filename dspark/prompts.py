"""Prompt sets in the JSON Lines format of data/: {"id", "dataset", "domain", "turns"}."""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import zip_longest
from pathlib import Path

from pydantic import BaseModel

DEV_PROMPTS = "dev_prompts.jsonl"
TRAIN_PROMPTS = "train_prompts.jsonl"


class PromptRecord(BaseModel):
    id: str
    dataset: str
    domain: str
    turns: list[str]


def data_dir() -> Path:
    """`data/` at the repository root, where the prompt sets ship (see data/README.md)."""
    return Path(__file__).resolve().parents[1] / "data"


def dev_prompts_path() -> Path:
    return data_dir() / DEV_PROMPTS


def train_prompts_path() -> Path:
    return data_dir() / TRAIN_PROMPTS


def load_prompts(
    path: str | Path | None = None, limit: int | None = None, skip: int = 0
) -> list[PromptRecord]:
    """Read a prompt file (default: the dev prompts); with `limit` or `skip`, take datasets round-robin so
    that a small sample still covers every dataset and domain, and `skip` the first prompts of that order
    (a held-out sample: prompts a setting was not tuned on)."""
    if path is None:
        path = dev_prompts_path()
        if not path.exists():
            raise FileNotFoundError(
                f"the default dev prompts {path} are missing: they ship in the repository's data/ directory, "
                "which an installed (non-editable) package does not include; pass --prompts FILE "
                "(JSON Lines records {id, dataset, domain, turns})"
            )
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records = [
        PromptRecord.model_validate_json(line) for line in path.read_text().split("\n") if line.strip()
    ]
    if skip == 0 and (limit is None or limit >= len(records)):
        return records
    by_dataset: dict[str, list[PromptRecord]] = defaultdict(list)
    for record in records:
        by_dataset[record.dataset].append(record)
    interleaved = [r for group in zip_longest(*by_dataset.values()) for r in group if r is not None]
    return interleaved[skip : None if limit is None else skip + limit]


def write_json(path: str | Path, payload: object) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
