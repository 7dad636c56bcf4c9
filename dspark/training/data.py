"""Drafter training data: the target's own responses to the training prompts, with its hidden states.

The engine generates the responses (batched; greedy, or several sampled ones per prompt with a seed each,
DeepSpec's way to get more data from the same prompts) while a `FeatureRecorder` observes the hidden states
of the chosen target layers at every position it commits. Each shard of prompts is written as one
safetensors file, so an interrupted run resumes at the first missing shard. A post-pass adds the target's
top-k next-token distribution at every response position, computed from the last layer's hidden state
(the last feature layer is the target's final layer), for the total-variation loss.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dspark.assembly import build_engine
from dspark.engine import Engine, EngineConfig
from dspark.models.llama import Transformer, rms_norm
from dspark.prompts import TRAIN_PROMPTS, PromptRecord, data_dir, load_prompts
from dspark.proposers import DraftRequest
from dspark.sampling import SamplingParams

log = logging.getLogger(__name__)


class FeatureRecorder:
    """Collects the observed target features of each request until it finishes."""

    def __init__(self, hidden_layers: tuple[int, ...]) -> None:
        self.hidden_layers = hidden_layers
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.finished: dict[str, torch.Tensor] = {}

    def observe(self, request: DraftRequest, features: torch.Tensor) -> None:
        self.rows.setdefault(request.request_id, []).append(features.to(torch.float16))

    def release(self, request: DraftRequest) -> None:
        self.finished[request.request_id] = torch.cat(self.rows.pop(request.request_id))


@dataclass
class Sequence:
    """One training sequence: prompt + response ids and features of every position but the last."""

    token_ids: torch.Tensor  # [n] int64
    prompt_len: int
    features: torch.Tensor  # [n - 1, layers * hidden] float16
    target_topk_ids: (
        torch.Tensor
    )  # [n - prompt_len, k]: next-token distribution at positions prompt_len-1..n-2
    target_topk_probs: torch.Tensor


def chat_prompt(record: PromptRecord) -> list[dict]:
    return [{"role": "user", "content": record.turns[0]}]


def generate_shard(
    engine: Engine,
    recorder: FeatureRecorder,
    records: list[PromptRecord],
    params: SamplingParams,
    top_k: int,
    samples: int = 1,
    first_seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Generate one shard; `recorder` must be one of the engine's observers. Sampled responses (`samples`
    per prompt) get seeds `first_seed + i * samples + j` for record i, so a regenerated shard is the same."""
    room = engine.config.max_model_len - params.max_tokens
    encoded = [engine.encode_prompt(messages=chat_prompt(r)) for r in records]
    jobs = [
        (p, params if params.greedy else params.model_copy(update={"seed": first_seed + i * samples + j}))
        for i, p in enumerate(encoded)
        if len(p) <= room  # the rare very long prompt is skipped, not cut
        for j in range(samples)
    ]
    prompts = [p for p, _ in jobs]
    ids = [engine.add_request(p, job_params) for p, job_params in jobs]
    responses: dict[str, list[int]] = {i: [] for i in ids}
    for out in engine.run_until_done():
        responses[out.request_id] += out.token_ids
    columns: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("token_ids", "features", "topk_ids", "topk_probs")
    }
    offsets, prompt_lens = [0], []
    for rid, prompt in zip(ids, prompts, strict=True):
        seq, feats = prompt + responses[rid], recorder.finished.pop(rid)
        if len(feats) != len(seq) - 1:  # every position but the last was fed to the target
            raise RuntimeError(f"{rid}: {len(feats)} feature rows for {len(seq)} tokens")
        topk_ids, topk_probs = target_topk(engine.model, feats[len(prompt) - 1 :], top_k)
        values = (torch.tensor(seq, dtype=torch.int32), feats, topk_ids, topk_probs)
        for key, value in zip(columns, values, strict=True):
            columns[key].append(value)
        offsets.append(offsets[-1] + len(seq))
        prompt_lens.append(len(prompt))
    return {
        **{key: torch.cat(values) for key, values in columns.items()},
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int64),
    }


@torch.inference_mode()
def target_topk(model: Transformer, last_hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k next-token probabilities from its last decoder layer's output."""
    hidden = last_hidden[:, -model.cfg.hidden_size :].float()
    logits = model.lm_head(rms_norm(hidden, model.norm, model.cfg.rms_norm_eps))
    probs, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return ids.to(torch.int32), probs.to(torch.float16)


def load_sequences(data_dir: str | Path) -> list[Sequence]:
    sequences = []
    for shard in sorted(Path(data_dir).glob("shard-*.safetensors")):
        t = load_file(shard)
        offsets, rows = t["offsets"].tolist(), 0
        topk_row = 0
        for i, plen in enumerate(t["prompt_lens"].tolist()):
            a, b = offsets[i], offsets[i + 1]
            n = b - a
            n_resp = n - plen
            sequences.append(
                Sequence(
                    token_ids=t["token_ids"][a:b].long(),
                    prompt_len=plen,
                    features=t["features"][rows : rows + n - 1],
                    target_topk_ids=t["topk_ids"][topk_row : topk_row + n_resp].long(),
                    target_topk_probs=t["topk_probs"][topk_row : topk_row + n_resp],
                )
            )
            rows += n - 1
            topk_row += n_resp
    return sequences


def generate_dataset(
    out_dir: str | Path,
    hidden_layers: tuple[int, ...],
    num_prompts: int,
    max_tokens: int = 256,
    shard_size: int = 64,
    batch_size: int = 32,
    top_k: int = 32,
    model: str = "default",
    seed: int = 0,
    max_prompt_tokens: int = 1024,
    sampling: SamplingParams | None = None,
    samples_per_prompt: int = 1,
) -> Path:
    """Generate (or resume generating) the training shards under `out_dir`: the greedy response to each
    prompt, or with `sampling` (temperature > 0) `samples_per_prompt` sampled ones. Shard i always holds
    the same prompts whatever the sampling, so held-out prompts can be told apart across data sets."""
    params = (sampling or SamplingParams()).model_copy(update={"max_tokens": max_tokens})
    if samples_per_prompt > 1 and params.greedy:
        raise ValueError("several responses per prompt need a sampling temperature above 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_prompts(data_dir() / TRAIN_PROMPTS)
    random.Random(seed).shuffle(records)  # any prefix of shards is a mix of every dataset
    records = records[:num_prompts]
    shards = [records[i : i + shard_size] for i in range(0, len(records), shard_size)]
    done = sum((out / f"shard-{i:04d}.safetensors").exists() for i in range(len(shards)))
    log.info("phase 1/3: the target's responses to %d prompts, %d shards (%d already there) in %s",
             len(records), len(shards), done, out)  # fmt: skip
    if done == len(shards):
        return out
    config = EngineConfig(
        model=model,
        proposer="none",
        max_batch_size=batch_size,
        max_model_len=max_prompt_tokens + max_tokens,
        max_tokens_per_step=1024,
    )
    recorder = FeatureRecorder(hidden_layers)
    engine = build_engine(config, observers=[recorder])
    for index, shard in enumerate(tqdm(shards, desc="generating shards", unit="shard")):
        path = out / f"shard-{index:04d}.safetensors"
        if path.exists():
            continue
        first_seed = (seed * num_prompts + index * shard_size) * samples_per_prompt
        tensors = generate_shard(engine, recorder, shard, params, top_k, samples_per_prompt, first_seed)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"hidden_layers": ",".join(map(str, hidden_layers))})
        tmp.rename(path)
    return out
