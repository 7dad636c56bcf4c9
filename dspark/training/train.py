"""`dspark train`: generate the target's data, build the draft vocabulary, train, calibrate, export.

Every stage resumes: data shards are skipped when present, training restores its state (model, optimizer,
step, RNG: `train_state.json`, validated, naming a safetensors file of the tensors; nothing is unpickled),
calibration and export rerun from the trained weights. The target stays frozen; only the backbone, the
Markov head and the confidence head learn. Uses a GPU when one is present.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dspark.drafters.dspark.calibration import (
    Calibration,
    PositionScaling,
    cross_fitted_ece,
    fit_shared,
    fit_sts,
    prefix_ece,
)
from dspark.drafters.dspark.checkpoint import (
    load_drafter,
    read_config,
    resolve_drafter_dir,
    save_drafter,
)
from dspark.drafters.dspark.model import DrafterConfig, DSparkDrafter
from dspark.models.llama import Transformer
from dspark.models.loader import load_tokenizer, load_transformer
from dspark.prompts import write_json
from dspark.runtime import cache_root, set_threads
from dspark.sampling import SamplingParams
from dspark.training.blocks import make_blocks, sample_anchors, score_blocks
from dspark.training.data import Sequence, generate_dataset, load_sequences
from dspark.training.losses import drafter_loss, total_variation

log = logging.getLogger(__name__)


class SampledResponses(BaseModel):
    """Extra responses per training prompt, sampled next to the greedy one (DeepSpec regenerates its answers
    at temperature 0.7, top-p 0.8, top-k 20): more sequences from the same prompts, and drafts trained on
    the target's alternatives as well as its argmax path."""

    model_config = ConfigDict(extra="forbid")

    per_prompt: int = Field(0, ge=0, description="sampled responses per prompt (0: greedy data only)")
    num_prompts: int | None = Field(
        None, ge=1, description="sample for the first this many training prompts only (None: every one)"
    )
    temperature: float = Field(0.7, gt=0, allow_inf_nan=False)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(20, ge=0)

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def dir_suffix(self) -> str:
        return f"-sampled-t{self.temperature:g}-p{self.top_p:g}-k{self.top_k}-x{self.per_prompt}"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "default"
    output: str = "drafters/smollm2-135m-dspark"
    data_dir: str = Field("", description="'' = <cache>/drafter_data/<layers>")
    target_layer_ids: list[int] = Field([2, 11, 20, 29], description="target layers whose outputs condition")
    num_hidden_layers: int = Field(2, ge=1, description="draft layers")
    block_size: int = Field(7, ge=1)
    markov_rank: int = Field(64, ge=1)
    markov_head: bool = Field(True, description="False: the Markov head stays zero (a DFlash-style ablation)")
    init_from_target: bool = Field(
        False, description="start the draft layers from copies of the target's last layers (same widths)"
    )
    init_from: str | None = Field(
        None,
        description="start from a trained drafter (a checkpoint folder; 'default': the shipped one): its "
        "weights and draft vocabulary, a fresh optimizer and learning-rate schedule; a larger markov_rank "
        "widens its Markov head first",
    )
    position_decay: float | None = Field(
        None, gt=0, description="loss weight exp(-(k-1)/decay) per block position (None: the block size)"
    )
    draft_vocab_size: int | None = Field(
        8192, ge=2, description="reduced output vocabulary: the ids the target emits most (None: full)"
    )
    mask_token: str = Field(
        "<empty_output>", description="the special token whose (frozen) embedding row fills the block"
    )
    num_prompts: int = Field(768, ge=1, description="training prompts to generate responses for")
    max_response_tokens: int = Field(256, ge=8)
    sampled_responses: SampledResponses = SampledResponses()
    holdout_sequences: int = Field(64, ge=1, description="generated sequences kept for calibration")
    epochs: float = Field(4.0, gt=0)
    steps: int | None = Field(
        None, ge=1, description="optimizer steps, overriding `epochs` (recipe arms compare at equal steps)"
    )
    anchors_per_sequence: int = Field(32, ge=1)
    sequences_per_step: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    max_minutes: float | None = Field(None, gt=0, description="stop training after this long")
    checkpoint_minutes: float = Field(5.0, gt=0)
    num_threads: int | None = Field(None, ge=1, description="torch threads (default: all cores)")
    seed: int = 0

    @model_validator(mode="after")
    def _one_initialisation(self) -> TrainConfig:
        if self.init_from and self.init_from_target:
            raise ValueError("init_from and init_from_target both initialise the draft layers: choose one")
        return self

    def resolved_data_dir(self) -> Path:
        """The greedy responses' shards (the sampled ones sit beside them, `sampled_data_dir`)."""
        if self.data_dir:
            return Path(self.data_dir)
        return cache_root() / "drafter_data" / ("smollm2-" + "-".join(map(str, self.target_layer_ids)))

    def sampled_data_dir(self) -> Path:
        greedy = self.resolved_data_dir()
        return greedy.with_name(greedy.name + self.sampled_responses.dir_suffix())


def build_draft_vocab(sequences: list[Sequence], size: int, always: list[int]) -> torch.Tensor:
    """The `size` target ids the target produces most often in its responses (plus `always`)."""
    counts = Counter()
    for seq in sequences:
        counts.update(seq.token_ids[seq.prompt_len :].tolist())
    chosen = list(dict.fromkeys([*always, *(t for t, _ in counts.most_common(size))]))[:size]
    rest = (t for t in range(10**9) if t not in set(chosen))
    while len(chosen) < size:  # a tiny corpus: pad with low ids so the size stays as configured
        chosen.append(next(rest))
    return torch.tensor(sorted(chosen))


def new_drafter(cfg: TrainConfig, target: Transformer, train_set: list[Sequence]) -> DSparkDrafter:
    """A randomly initialised drafter with the target's widths, its draft vocabulary and shared tensors."""
    tokenizer = load_tokenizer(cfg.model)
    mask_token_id = tokenizer.convert_tokens_to_ids(cfg.mask_token)
    if mask_token_id is None or mask_token_id == tokenizer.unk_token_id:
        raise ValueError(f"mask_token {cfg.mask_token!r} is not a token of {cfg.model}'s vocabulary")
    drafter = DSparkDrafter(
        DrafterConfig.for_target(
            target.cfg, target_layer_ids=cfg.target_layer_ids, num_hidden_layers=cfg.num_hidden_layers,
            block_size=cfg.block_size, markov_rank=cfg.markov_rank, draft_vocab_size=cfg.draft_vocab_size,
            mask_token_id=mask_token_id,
        )
    )  # fmt: skip
    if drafter.cfg.reduced_vocab:
        vocab = build_draft_vocab(train_set, drafter.cfg.draft_vocab, target.cfg.eos_token_ids)
        drafter.set_draft_vocab(vocab)
    drafter.attach_target(target.embed, target.lm_head.weight)
    drafter.init_norm_for_training()
    if cfg.init_from_target:
        copy_target_layers(drafter, target)
    return drafter


def warm_start(cfg: TrainConfig, target: Transformer) -> DSparkDrafter:
    """The drafter in `cfg.init_from`, checked against the config (everything but the Markov rank must
    match), its Markov head widened to `cfg.markov_rank` if that is larger."""
    drafter = load_drafter(resolve_drafter_dir(cfg.init_from), target)
    have = drafter.cfg
    wanted = {
        "target_layer_ids": cfg.target_layer_ids, "num_hidden_layers": cfg.num_hidden_layers,
        "block_size": cfg.block_size, "draft_vocab_size": cfg.draft_vocab_size,
    }  # fmt: skip
    for field, value in wanted.items():
        if getattr(have, field) != value:
            raise ValueError(f"init_from {cfg.init_from}: its {field} is {getattr(have, field)}, "
                             f"the config asks for {value}")  # fmt: skip
    if cfg.markov_rank < have.markov_rank:
        raise ValueError(f"init_from {cfg.init_from}: markov_rank {cfg.markov_rank} is below its "
                         f"{have.markov_rank} (a Markov head can be widened, not cut)")  # fmt: skip
    if cfg.markov_rank > have.markov_rank:
        drafter = widen_markov_rank(drafter, cfg.markov_rank, target, torch.Generator().manual_seed(cfg.seed))
    return drafter


@torch.no_grad()
def widen_markov_rank(
    drafter: DSparkDrafter, rank: int, target: Transformer, generator: torch.Generator
) -> DSparkDrafter:
    """The same drafter with a rank-`rank` Markov head that drafts exactly as before: the new columns of W1
    are random (so W2's new rows get gradients at once), W2's new rows and the confidence head's weights
    on the new columns are zero (so they add nothing until trained)."""
    old = drafter.cfg.markov_rank
    wide = DSparkDrafter(drafter.cfg.model_copy(update={"markov_rank": rank}))
    state = drafter.state_dict()
    w1 = state["markov_head.markov_w1.weight"]
    fresh = torch.randn(w1.shape[0], rank - old, generator=generator, dtype=w1.dtype) * w1.std()
    state["markov_head.markov_w1.weight"] = torch.cat([w1, fresh], dim=1)
    w2 = state["markov_head.markov_w2.weight"]
    state["markov_head.markov_w2.weight"] = torch.cat([w2, w2.new_zeros(w2.shape[0], rank - old)], dim=1)
    if drafter.confidence_head is not None and drafter.cfg.confidence_head_with_markov:
        proj = state["confidence_head.proj.weight"]  # its input is [h_k ; W1[x_{k-1}]]: new columns last
        state["confidence_head.proj.weight"] = torch.cat([proj, proj.new_zeros(1, rank - old)], dim=1)
    wide.lm_head_from_target = drafter.lm_head_from_target
    wide.load_state_dict(state)
    wide.attach_target(drafter.embed_tokens, target.lm_head.weight)
    return wide


@torch.no_grad()
def copy_target_layers(drafter: DSparkDrafter, target: Transformer) -> None:
    """Draft layer i <- target layer L-n+i: attention and MLP projections and both pre-norms. The target has
    no per-head q/k norm (Llama), so those stay at one; training adapts the attention scale."""
    n, cfg = len(drafter.layers), drafter.cfg
    if (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) != (
        target.cfg.hidden_size, target.cfg.intermediate_size, target.cfg.num_heads, target.cfg.num_kv_heads,
    ):  # fmt: skip
        raise ValueError("init_from_target needs draft layers as wide as the target's")
    for layer, source in zip(drafter.layers, target.layers[-n:], strict=True):
        q, k, v = source.attn.wqkv.weight.split([target.cfg.q_size, target.cfg.kv_size, target.cfg.kv_size])
        gate, up = source.mlp.w_gate_up.weight.chunk(2)
        pairs = [
            (layer.self_attn.q_proj.weight, q), (layer.self_attn.k_proj.weight, k),
            (layer.self_attn.v_proj.weight, v), (layer.self_attn.o_proj.weight, source.attn.wo.weight),
            (layer.mlp.gate_proj.weight, gate), (layer.mlp.up_proj.weight, up),
            (layer.mlp.down_proj.weight, source.mlp.w_down.weight),
            (layer.input_layernorm.weight, source.attn_norm),
            (layer.post_attention_layernorm.weight, source.mlp_norm),
        ]  # fmt: skip
        for dst, src in pairs:
            dst.copy_(src)
    first = len(target.layers) - n
    log.info("draft layers initialised from target layers %d..%d", first, first + n - 1)


@torch.no_grad()
def fill_unseen_markov_rows(drafter: DSparkDrafter, train_set: list[Sequence], first_column: int = 0) -> None:
    """W1 has a row per target id but training only moves the rows of tokens it saw as a previous token;
    the others keep their random init. Give them the mean of the trained rows outside the draft vocabulary
    (or of all trained rows): an unseen token then reads as 'some rare token', not as noise. A warm start
    fills only the columns it added (`first_column` on): the earlier ones hold what the first run learned."""
    vocab = drafter.cfg.vocab_size
    seen = torch.zeros(vocab, dtype=torch.bool)
    for seq in train_set:
        seen[seq.token_ids[seq.prompt_len - 1 : -1]] = True
    w1 = drafter.markov_head.markov_w1.weight
    rare = seen & (drafter.target_to_draft.cpu() == drafter.cfg.draft_vocab)
    source = rare if int(rare.sum()) >= 16 else seen
    unseen, cols = ~seen.to(w1.device), slice(first_column, None)
    w1[unseen, cols] = w1[source.to(w1.device), cols].mean(0)
    log.info("Markov W1: %d of %d rows trained, the rest set to their mean", int(seen.sum()), vocab)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(cfg: TrainConfig) -> Path:
    set_threads(cfg.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    train_set, holdout = training_data(cfg)
    log.info("phase 2/3: training the drafter")
    log.info("%d training / %d held-out sequences", len(train_set), len(holdout))
    target = load_transformer(cfg.model, pack=False)
    drafter = warm_start(cfg, target) if cfg.init_from else new_drafter(cfg, target, train_set)
    if not cfg.markov_head:
        drafter.markov_head.markov_w2.requires_grad_(False)  # frozen (zero from scratch): no learned bias
    drafter.to(device)
    fit(drafter, train_set, cfg, out, device)
    inherited = read_config(resolve_drafter_dir(cfg.init_from)).markov_rank if cfg.init_from else 0
    fill_unseen_markov_rows(drafter, train_set, first_column=inherited)
    log.info("phase 3/3: calibrating on %d held-out sequences", len(holdout))
    calibration, report = calibrate(drafter, holdout)
    write_json(out / "calibration_report.json", report)
    save_drafter(drafter, out, dtype=torch.float16, calibration=calibration)
    return out


def ensure_data(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Generate the shards that are missing: the greedy ones, and the sampled ones if configured."""
    layers = tuple(cfg.target_layer_ids)
    greedy_dir = generate_dataset(
        cfg.resolved_data_dir(), layers, cfg.num_prompts, cfg.max_response_tokens, model=cfg.model
    )
    extra = cfg.sampled_responses
    if not extra.per_prompt:
        return greedy_dir, None
    prompts = min(cfg.num_prompts, extra.num_prompts or cfg.num_prompts)
    sampled_dir = generate_dataset(
        cfg.sampled_data_dir(), layers, prompts, cfg.max_response_tokens, model=cfg.model,
        sampling=extra.params(), samples_per_prompt=extra.per_prompt,
    )  # fmt: skip
    return greedy_dir, sampled_dir


def training_data(cfg: TrainConfig) -> tuple[list[Sequence], list[Sequence]]:
    """The data, generated where missing, split: the last `holdout_sequences` greedy sequences are held out
    for calibration, and the sampled responses to their prompts are dropped (no held-out prompt is trained
    on)."""
    greedy_dir, sampled_dir = ensure_data(cfg)
    sequences = load_sequences(greedy_dir)
    train_set, holdout = sequences[: -cfg.holdout_sequences], sequences[-cfg.holdout_sequences :]
    if sampled_dir is not None:
        held = {_prompt_key(seq) for seq in holdout}
        train_set = train_set + [seq for seq in load_sequences(sampled_dir) if _prompt_key(seq) not in held]
    return train_set, holdout


def _prompt_key(seq: Sequence) -> tuple[int, ...]:
    return tuple(seq.token_ids[: seq.prompt_len].tolist())


def fit(drafter: DSparkDrafter, train_set: list[Sequence], cfg: TrainConfig, out: Path, device) -> None:
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    total_steps = cfg.steps or math.ceil(cfg.epochs * len(train_set) / cfg.sequences_per_step)
    state_path, step = out / "train_state.json", 0
    rng = random.Random(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    if state_path.exists():
        step = load_train_state(state_path, drafter, optimizer, rng, generator)
        log.info("resumed at step %d", step)
    elif (out / "train_state.pt").exists():
        log.warning("%s is a pickled state of an older version: not loaded, training starts over",
                    out / "train_state.pt")  # fmt: skip
    history_path = out / "train_history.json"
    history: list[dict] = json.loads(history_path.read_text())[:step] if history_path.exists() else []
    began, last_save = time.monotonic(), time.monotonic()
    progress = tqdm(total=total_steps, initial=step, desc="training drafter")
    while step < total_steps:
        if cfg.max_minutes and (time.monotonic() - began) / 60 > cfg.max_minutes:
            log.info("time budget reached at step %d", step)
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, total_steps, cfg.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        parts_sum: Counter = Counter()
        for seq in rng.sample(train_set, cfg.sequences_per_step):
            anchors = sample_anchors(seq, cfg.anchors_per_sequence, generator)
            if not len(anchors):
                continue
            batch = make_blocks(seq, anchors, drafter)
            scores = score_blocks(drafter, seq, batch)
            loss, parts = drafter_loss(
                scores.logits, scores.confidence_logits, drafter.target_to_draft[batch.labels.to(device)],
                batch.target_probs.to(device), batch.valid.to(device), decay=cfg.position_decay,
            )  # fmt: skip
            (loss / cfg.sequences_per_step).backward()
            parts_sum.update({k: v / cfg.sequences_per_step for k, v in parts.items()})
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        progress.update(1)
        progress.set_postfix({k: f"{v:.3f}" for k, v in parts_sum.items()})
        history.append({"step": step, **parts_sum})
        if time.monotonic() - last_save > cfg.checkpoint_minutes * 60 or step == total_steps:
            save_train_state(state_path, drafter, optimizer, step, rng, generator)
            write_json(history_path, history)
            last_save = time.monotonic()
    save_train_state(state_path, drafter, optimizer, step, rng, generator)
    write_json(history_path, history)


class TrainState(BaseModel):
    """What resuming needs besides tensors (`train_state.json`, written last: it commits a save). The tensors
    are in the safetensors file it names: `model.<name>` (the drafter's state dict), `optimizer.<param>.<key>`
    (the optimizer's per-parameter state) and `torch_generator` (the anchor sampler's generator state)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    step: int = Field(ge=0)
    tensors_file: str = Field(pattern=r"^train_state-[0-9]+\.safetensors$")
    python_rng: tuple[int, list[int], float | None]  # random.Random.getstate(): version, state, gauss
    optimizer_param_groups: list[dict[str, JsonValue]]
    optimizer_scalars: dict[str, dict[str, JsonValue]] = {}  # per-parameter state that is not a tensor


def _lists(value):
    """A copy with tuples as lists (JSON's arrays)."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def save_train_state(
    path: Path, model: torch.nn.Module, optimizer, step: int, rng: random.Random, generator: torch.Generator
) -> None:
    """Write the resume state (`path` is the JSON file): the step's tensor file first, then the JSON that
    names it, atomically; a crash at any point leaves the previous consistent pair."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors["torch_generator"] = generator.get_state()
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, JsonValue]] = {}
    for index, values in optim["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = _lists(value)
    version, internal, gauss = rng.getstate()
    state = TrainState(
        step=step, tensors_file=f"train_state-{step:07d}.safetensors",
        python_rng=(version, list(internal), gauss), optimizer_param_groups=_lists(optim["param_groups"]),
        optimizer_scalars=scalars,
    )  # fmt: skip
    directory = path.parent
    save_file(tensors, str(directory / state.tensors_file))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(state.model_dump_json(indent=1) + "\n")
    tmp.replace(path)
    for old in directory.glob("train_state-*.safetensors"):
        if old.name != state.tensors_file:
            old.unlink()


def load_train_state(
    path: Path, model: torch.nn.Module, optimizer, rng: random.Random, generator: torch.Generator
) -> int:
    """Restore what `save_train_state` wrote into the given objects; returns the step."""
    state = TrainState.model_validate_json(path.read_text())
    tensors = load_file(path.parent / state.tensors_file)
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = value
    for index, values in state.optimizer_scalars.items():
        per_param.setdefault(int(index), {}).update(values)
    groups = [  # JSON has no tuples (AdamW's betas): restore them where the optimizer has them
        {k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()}
        for saved, current in zip(state.optimizer_param_groups, optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    version, internal, gauss = state.python_rng
    rng.setstate((version, tuple(internal), gauss))
    generator.set_state(tensors["torch_generator"])
    return state.step


@torch.no_grad()
def holdout_scores(drafter: DSparkDrafter, holdout: list[Sequence]) -> dict[str, torch.Tensor]:
    """Confidence logits and survival outcomes of every block of the held-out sequences (all anchors)."""
    rows: dict[str, list[torch.Tensor]] = {"logits": [], "greedy": [], "sampled": [], "valid": []}
    for seq in holdout:
        anchors = sample_anchors(seq, 10**6)
        if not len(anchors):
            continue
        batch = make_blocks(seq, anchors, drafter)
        scores = score_blocks(drafter, seq, batch)
        log_q = torch.log_softmax(scores.logits.float(), dim=-1).cpu()
        draft_argmax = drafter.draft_to_target.cpu()[log_q.argmax(-1)]
        rows["logits"].append(scores.confidence_logits.float().cpu())
        rows["greedy"].append((draft_argmax == batch.labels).float())
        rows["sampled"].append(1 - total_variation(log_q, batch.target_probs))
        rows["valid"].append(batch.valid)
    return {k: torch.cat(v) for k, v in rows.items()}


def calibrate(drafter: DSparkDrafter, holdout: list[Sequence]) -> tuple[Calibration, dict]:
    """Fit the per-position scalings on the held-out sequences for greedy (argmax match) and sampled (1 - TV)
    acceptance. Every way of fitting is judged by the per-position ECE of the prefix survival, cross-fitted
    over two folds of sequences: raw, the paper's STS (temperatures by least ECE), least-ECE temperatures and
    offsets, log-loss Platt per position, and the one shared scaling a vLLM export folds into the confidence
    head. Each mode ships the per-position fit whose worst position is best, refitted on both folds."""
    halves = [holdout_scores(drafter, holdout[::2]), holdout_scores(drafter, holdout[1::2])]
    every = {key: torch.cat([h[key] for h in halves]) for key in halves[0]}
    gamma = every["logits"].shape[1]
    per_position: dict[str, Callable[..., list[PositionScaling]]] = {
        "sts_temperature_only": lambda *scores: fit_sts(*scores, with_offset=False, objective="ece"),
        "sts_ece_with_offset": lambda *scores: fit_sts(*scores, objective="ece"),
        "log_loss_with_offset": lambda *scores: fit_sts(*scores, objective="log_loss"),
    }
    report: dict = {"blocks": len(every["logits"]), "folds": len(halves)}
    fitted = {}
    for mode in ("greedy", "sampled"):
        scores = (every["logits"], every[mode], every["valid"])
        folds = [(h["logits"], h[mode], h["valid"]) for h in halves]
        ece = {arm: cross_fitted_ece(folds, fit) for arm, fit in per_position.items()}
        ece["shared_folded"] = cross_fitted_ece(folds, lambda *s: [fit_shared(*s)] * gamma)
        chosen = min(per_position, key=lambda arm: max(ece[arm]))
        fitted[mode] = (per_position[chosen](*scores), fit_shared(*scores))
        valid = every["valid"]
        report[mode] = {
            "shipped": chosen,
            "scalings": [x.model_dump() for x in fitted[mode][0]],
            "shared_scaling": fitted[mode][1].model_dump(),
            "ece_raw": prefix_ece(*scores),
            **{f"ece_{arm}": values for arm, values in ece.items()},
            "acceptance_by_position": ((every[mode] * valid).sum(0) / valid.sum(0)).tolist(),
        }
    calibration = Calibration(
        greedy=fitted["greedy"][0], sampled=fitted["sampled"][0],
        greedy_shared=fitted["greedy"][1], sampled_shared=fitted["sampled"][1],
    )  # fmt: skip
    return calibration, report


def recalibrate(directory: str | Path, cfg: TrainConfig) -> dict:
    """Refit the calibration of a trained drafter on the held-out sequences of its training data."""
    from dspark.drafters.dspark.checkpoint import CALIBRATION, load_drafter

    target = load_transformer(cfg.model, pack=False)
    drafter = load_drafter(directory, target)
    holdout = load_sequences(cfg.resolved_data_dir())[-cfg.holdout_sequences :]
    log.info("phase 3/3: calibrating on %d held-out sequences", len(holdout))
    calibration, report = calibrate(drafter, holdout)
    write_json(Path(directory) / "calibration_report.json", report)
    (Path(directory) / CALIBRATION).write_text(calibration.model_dump_json(indent=2) + "\n")
    return report
