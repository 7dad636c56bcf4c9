"""The DSpark drafter in the standard architecture (DeepSpec's `Qwen3DSparkModel`, served by vLLM 0.32).

Parallel stage (DFlash-style backbone, paper Sec. 2.2 / 3.1): the outputs of several target layers are
concatenated, projected by `fc` and normalised by `hidden_norm` into context features; every draft layer
turns them into extra keys (with its per-head `k_norm` and RoPE) and values. A block is the anchor (the
last token the target produced, not yet fed to it) followed by `mask_token_id` rows of the vocabulary
embedding; with `sample_from_anchor` the anchor is the first prediction position, so a block of gamma
rows drafts gamma tokens (without it, the DFlash convention, gamma - 1). Attention inside a block is
bidirectional; a block sees the context before its anchor.

Sequential stage: the Markov head adds a low-rank transition bias W2 . W1[x_{k-1}] to position k's logits,
W1 indexed by the previous token's target id; tokens are drawn left to right. The confidence head
estimates c_k = sigmoid(proj([h_k ; W1[x_{k-1}]])), the probability that position k survives given the
earlier ones did.

The input embedding is the target's (frozen, shared). The output head covers the full vocabulary (the
target's head, shared) or a reduced draft vocabulary (`lm_head` rows + `d2t`, EAGLE-3 style: target id =
draft id + d2t[draft id]); the reduced head keeps the CPU cost of a draft step small.

Module and parameter names are the standard checkpoint's tensor names, so `state_dict()` is the format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from dspark.kernels import native_ops
from dspark.models.config import ModelConfig
from dspark.models.linear import Linear
from dspark.models.rope import apply_rope, inverse_frequencies, rope_tables

ARCHITECTURE = "Qwen3DSparkModel"
VLLM_DEFAULT_ROPE_THETA = 1e6  # what vLLM assumes when a drafter's config.json names no rope theta
# Draft tokens, greedy or sampled, are drawn among each position's this many best base logits
# (`draw_candidates`).
DRAW_CANDIDATES = 256


class DrafterConfigError(ValueError):
    """A drafter config.json that is not the standard format, or a drafter that does not fit its target.
    `field` names the config field (or tensor) at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class DrafterConfig(BaseModel):
    """The drafter's architecture: the fields of the standard `config.json` this project reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_hidden_layers: int = Field(ge=1)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    rms_norm_eps: float = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    vocab_size: int = Field(gt=0, description="input vocabulary: the target's")
    rope_theta: float = Field(gt=0)
    rope_scaling: dict[str, Any] | None = None
    block_size: int = Field(ge=1, description="draft tokens per block")
    mask_token_id: int = Field(ge=0, description="vocabulary row that fills the block after the anchor")
    target_layer_ids: list[int] = Field(min_length=1, description="target layers whose outputs condition")
    markov_rank: int = Field(ge=1)
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    draft_vocab_size: int | None = Field(None, ge=2, description="reduced output vocabulary (None: full)")
    target_hidden_size: int | None = Field(None, gt=0, description="the target's width when it differs")
    sample_from_anchor: bool = True

    @property
    def draft_vocab(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab < self.vocab_size

    @property
    def target_width(self) -> int:
        return self.target_hidden_size or self.hidden_size

    @classmethod
    def for_target(cls, target: ModelConfig, **overrides: Any) -> DrafterConfig:
        """A drafter with the target's widths (what DeepSeek's released drafters use)."""
        return cls(**(_backbone_fields(target) | overrides))

    # ---- config.json ------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DrafterConfig:
        """Read a standard DSpark `config.json` (DeepSpec / vLLM); a clear error names what does not fit."""
        if "target_layers" in hf and "target_layer_ids" not in hf:
            raise DrafterConfigError("target_layer_ids", "this is the project's pre-standard drafter format "
                                     "(it has `target_layers`); retrain it with `dspark train`")  # fmt: skip
        _expect(hf, "model_type", ("qwen3",))
        _expect(hf, "markov_head_type", ("vanilla",), default="vanilla")
        if hf.get("attention_bias", False):
            raise DrafterConfigError("attention_bias", "draft attention with biases is not supported")
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            message = f"only full (bidirectional in-block) attention is supported: {sorted(set(layer_types))}"
            raise DrafterConfigError("layer_types", message)
        # The backbone is a Qwen3 decoder config, read as the target's are; vLLM's defaults where they differ.
        try:
            backbone = ModelConfig.from_hf_dict(
                {"rope_theta": VLLM_DEFAULT_ROPE_THETA, "max_position_embeddings": 40960} | hf
            )
        except KeyError as err:
            raise DrafterConfigError(str(err.args[0]), "missing from the drafter's config.json") from err
        except ValueError as err:  # "hidden_act 'gelu' is not supported", "rope type 'yarn' is not ..."
            field = "rope_parameters" if str(err).startswith("rope") else str(err).split(" ")[0]
            raise DrafterConfigError(field, str(err)) from err
        dspark = dict(
            block_size=_required(hf, "block_size"), mask_token_id=_required(hf, "mask_token_id"),
            target_layer_ids=_required(hf, "target_layer_ids"), markov_rank=_required(hf, "markov_rank"),
            enable_confidence_head=hf.get("enable_confidence_head", False),
            confidence_head_with_markov=hf.get("confidence_head_with_markov", False),
            draft_vocab_size=hf.get("draft_vocab_size"), target_hidden_size=hf.get("target_hidden_size"),
            sample_from_anchor=hf.get("sample_from_anchor", True),
        )  # fmt: skip
        try:
            cfg = cls(**(_backbone_fields(backbone) | {"num_hidden_layers": backbone.num_layers} | dspark))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "config.json"
            raise DrafterConfigError(field, first["msg"]) from err
        cfg.check_self_consistent()
        return cfg

    def check_self_consistent(self) -> None:
        if self.draft_vocab > self.vocab_size:
            message = f"{self.draft_vocab} exceeds vocab_size {self.vocab_size}"
            raise DrafterConfigError("draft_vocab_size", message)
        if self.mask_token_id >= self.vocab_size:
            raise DrafterConfigError("mask_token_id", f"{self.mask_token_id} is outside the vocabulary "
                                     f"({self.vocab_size} rows)")  # fmt: skip
        if list(self.target_layer_ids) != sorted(set(self.target_layer_ids)):
            # vLLM concatenates the captured layers in ascending order: another order would read differently
            message = f"{self.target_layer_ids} must be distinct and ascending"
            raise DrafterConfigError("target_layer_ids", message)
        if self.num_attention_heads % self.num_key_value_heads:
            raise DrafterConfigError("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                                     f"num_attention_heads {self.num_attention_heads}")  # fmt: skip

    def check_fits(self, target: ModelConfig, shares_target_tensors: bool = True) -> None:
        """Refuse a drafter that was not made for this target, naming the field that differs."""
        if self.target_width != target.hidden_size:
            field = "target_hidden_size" if self.target_hidden_size else "hidden_size"
            raise DrafterConfigError(field, f"the drafter reads target states of width {self.target_width}, "
                                     f"the target's hidden_size is {target.hidden_size}")  # fmt: skip
        if shares_target_tensors and self.hidden_size != target.hidden_size:
            message = f"{self.hidden_size} differs from the target's {target.hidden_size}, whose embedding"
            message += " and LM head the drafter shares (it ships no embed_tokens / lm_head of its own)"
            raise DrafterConfigError("hidden_size", message)
        if self.vocab_size != target.vocab_size:
            message = f"the drafter's vocabulary has {self.vocab_size} rows, the target's {target.vocab_size}"
            raise DrafterConfigError("vocab_size", message)
        bad = [i for i in self.target_layer_ids if not 0 <= i < target.num_layers]
        if bad:
            last = target.num_layers - 1
            message = f"{bad} out of range: the target has {target.num_layers} layers (ids 0..{last})"
            raise DrafterConfigError("target_layer_ids", message)

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The standard `config.json`: a Qwen3 config that vLLM 0.32 and DeepSpec read as is."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta} | (self.rope_scaling or {})
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,  # explicit: vLLM falls back to 1e6 when absent
            "rope_parameters": rope,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": False,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "block_size": self.block_size,
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": list(self.target_layer_ids),
            "markov_rank": self.markov_rank,
            "markov_head_type": "vanilla",
            "enable_confidence_head": self.enable_confidence_head,
            "confidence_head_with_markov": self.confidence_head_with_markov,
            "sample_from_anchor": self.sample_from_anchor,
            "num_speculative_tokens": self.block_size if self.sample_from_anchor else self.block_size - 1,
            "torch_dtype": torch_dtype,
            **({"draft_vocab_size": self.draft_vocab_size} if self.reduced_vocab else {}),
            **({"target_hidden_size": self.target_hidden_size} if self.target_hidden_size else {}),
        }


def _backbone_fields(model: ModelConfig) -> dict[str, Any]:
    """The decoder widths of a model config, as drafter config fields."""
    return {
        "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "intermediate_size": model.intermediate_size,
        "rms_norm_eps": model.rms_norm_eps,
        "max_position_embeddings": model.max_position_embeddings,
        "vocab_size": model.vocab_size,
        "rope_theta": model.rope_theta,
        "rope_scaling": model.rope_scaling,
    }


def _required(hf: dict[str, Any], field: str) -> Any:
    if field not in hf:
        raise DrafterConfigError(field, "missing from the drafter's config.json")
    return hf[field]


def _expect(hf: dict[str, Any], field: str, allowed: tuple[str, ...], default: str | None = None) -> None:
    value = hf.get(field, default)
    if value not in allowed:
        raise DrafterConfigError(field, f"{value!r} is not supported (expected {' or '.join(allowed)})")


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    linear = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.pack()
    return linear


class _PackedRMSNorm(nn.Module):
    """Inference RMSNorm over the last dim in one native call (nn.RMSNorm dispatches ~5 ops on the CPU);
    same `weight` name, so saving after packing still writes the standard tensors."""

    def __init__(self, norm: nn.RMSNorm, eps: float, native) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach(), requires_grad=False)
        self.eps = norm.eps if norm.eps is not None else eps
        self.native = native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None or x.dtype != torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.native.rms_norm_rows(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)


class ContextBuffer:
    """One draft layer's injected keys/values of one request at inference: [kv_heads, capacity, head_dim]
    buffers holding the context in rows [0, length), growing by doubling. A block's own keys/values go in the
    rows after the context, kept only by `append` (the context grows) and overwritten otherwise."""

    def __init__(self, kv_heads: int, head_dim: int, like: torch.Tensor) -> None:
        self.length = 0
        self.keys = like.new_empty(kv_heads, 256, head_dim)
        self.values = like.new_empty(kv_heads, 256, head_dim)

    def reserve(self, rows: int) -> None:
        """Room for `rows` rows (context and a block after it), keeping the context."""
        if rows <= self.keys.shape[1]:
            return
        capacity = max(2 * self.keys.shape[1], rows)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_empty(old.shape[0], capacity, old.shape[2])
            grown[:, : self.length] = old[:, : self.length]
            setattr(self, name, grown)

    def write_block(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Keys/values [n, kv_heads, head_dim] after the context (not kept); returns where they end."""
        end = self.length + k.shape[0]
        self.reserve(end)
        self.keys[:, self.length : end] = k.transpose(0, 1)
        self.values[:, self.length : end] = v.transpose(0, 1)
        return end

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Context rows k, v [n, kv_heads, head_dim] after the ones held."""
        self.length = self.write_block(k, v)


class DraftAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
        # Inference only (`pack`): one matmul for q/k/v of the block rows, one for k/v of context rows.
        self.qkv_packed: Linear | None = None
        self.kv_packed: Linear | None = None

    def pack(self) -> None:
        q, k, v = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        self.qkv_packed = _packed_linear(torch.cat((q, k, v)).detach())
        self.kv_packed = _packed_linear(torch.cat((k, v)).detach())
        self.o_proj = _packed_linear(self.o_proj.weight.detach())

    def _project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_packed is not None:
            return self.kv_packed(x).split(self.cfg.num_key_value_heads * self.cfg.head_dim, dim=-1)
        return self.k_proj(x), self.v_proj(x)

    def _rotated_keys(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(self.k_norm(k.view(k.shape[0], -1, self.cfg.head_dim)), cos, sin)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised, rotated keys and values [rows, kv_heads, head_dim] of `x` (block rows after the
        input norm, or context features: vLLM applies k_norm to the injected keys too)."""
        k, v = self._project_kv(x)
        return self._rotated_keys(k, cos, sin), v.view(x.shape[0], -1, self.cfg.head_dim)

    def _queries_keys_values(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cfg = self.cfg
        if self.qkv_packed is not None:
            kv_size = cfg.num_key_value_heads * cfg.head_dim
            q, k, v = self.qkv_packed(h).split([cfg.num_attention_heads * cfg.head_dim, kv_size, kv_size], -1)
        else:
            q, (k, v) = self.q_proj(h), self._project_kv(h)
        q = apply_rope(self.q_norm(q.view(-1, cfg.num_attention_heads, cfg.head_dim)), cos, sin)
        return q, self._rotated_keys(k, cos, sin), v.view(h.shape[0], -1, cfg.head_dim)

    def attend_buffers(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, buffers: list[ContextBuffer], rows: int
    ) -> torch.Tensor:
        """Inference: request r's block (rows r*rows..) attends to its context and to its own block, all
        of it visible. Its keys/values go to the buffer rows just past the context (scratch, overwritten
        when the context grows), so attention reads one contiguous run of keys: no concatenation, and the
        query heads sharing a KV head are stacked instead of repeating the keys."""
        cfg = self.cfg
        q, k, v = self._queries_keys_values(h, cos, sin)
        group, d = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
        outs = []
        for r, buf in enumerate(buffers):
            block = slice(r * rows, (r + 1) * rows)
            end = buf.write_block(k[block], v[block])
            qg = q[block].view(rows, -1, group, d).permute(1, 2, 0, 3).reshape(-1, group * rows, d)
            scores = torch.bmm(qg, buf.keys[:, :end].transpose(1, 2)).mul_(d**-0.5)
            out = torch.bmm(torch.softmax(scores, dim=-1), buf.values[:, :end])
            outs.append(out.view(-1, group, rows, d).permute(2, 0, 1, 3).reshape(rows, -1))
        return self.o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]],
        block_sizes: list[int],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """h: [rows, d], the blocks of several groups stacked; group i has `block_sizes[i]` rows and
        attends to context[i] = (keys, values) and to its own rows, under masks[i] (None: all visible)."""
        q, k, v = self._queries_keys_values(h, cos, sin)
        outs, start = [], 0
        for (ctx_k, ctx_v), n, mask in zip(context, block_sizes, masks, strict=True):
            rows = slice(start, start + n)
            keys = torch.cat((ctx_k, k[rows])).transpose(0, 1)[None]
            values = torch.cat((ctx_v, v[rows])).transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], keys, values, attn_mask=mask, enable_gqa=True
            )
            outs.append(out[0].transpose(0, 1).reshape(n, -1))
            start += n
        return self.o_proj(torch.cat(outs))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_packed: Linear | None = None  # inference only (`pack`): one matmul for gate and up

    def pack(self) -> None:
        self.gate_up_packed = _packed_linear(torch.cat((self.gate_proj.weight, self.up_proj.weight)).detach())
        self.down_proj = _packed_linear(self.down_proj.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_packed is not None:
            gate, up = self.gate_up_packed(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DraftLayer(nn.Module):
    """A Qwen3 decoder layer (pre-norm, per-head q/k norm) whose keys/values are [context ; block]."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos, sin, context, block_sizes, masks) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context, block_sizes, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.markov_w1 = nn.Embedding(cfg.vocab_size, cfg.markov_rank)  # by the previous token's target id
        self.markov_w2 = nn.Linear(cfg.markov_rank, cfg.draft_vocab, bias=False)
        nn.init.zeros_(self.markov_w2.weight)  # training starts from the parallel drafter


def draw_candidates(base: torch.Tensor) -> torch.Tensor | None:
    """Which draft tokens a draw may choose at each position of base logits [..., V]: those whose base logit
    is among the DRAW_CANDIDATES largest (ties at the last kept), or None when that is all of them. The Markov
    bias then needs only those rows of W2 (the native draw computes no other): on the shipped drafter's
    held-out blocks the unrestricted greedy token is in this set 99% of the time (model card). A draft is
    only a proposal, so greedy output stays the target's; a sampled draft's distribution is the filtered
    softmax over this set, and rejection sampling against exactly that distribution keeps sampling
    lossless."""
    if base.shape[-1] <= DRAW_CANDIDATES:
        return None
    return base >= base.topk(DRAW_CANDIDATES, dim=-1).values[..., -1:]


class ConfidenceHead(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        width = cfg.hidden_size + (cfg.markov_rank if cfg.confidence_head_with_markov else 0)
        self.proj = nn.Linear(width, 1, bias=True)


class FusedDraft:
    """A packed drafter's inference in three native calls (dspark/kernels/draft_ops.cpp): the block layers,
    the context append and the Markov draw. Same weights, kernels and arithmetic as the PyTorch path
    (`draft_hidden` and friends without it), without its ~600 small ops per call, which cost more than the
    matmuls (a draft block is only 7 rows per request)."""

    def __init__(self, drafter: DSparkDrafter, native) -> None:
        cfg = drafter.cfg
        self.native = native
        self.eps = cfg.rms_norm_eps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.layer_weights: list[torch.Tensor] = []
        self.layer_kinds: list[int] = []
        fc_kind, fc = drafter.fc.kernel_spec()
        self.context_weights: list[torch.Tensor] = [*fc, drafter.hidden_norm.weight]
        self.context_kinds: list[int] = [fc_kind]
        for layer in drafter.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, attn.q_norm, attn.k_norm, layer.post_attention_layernorm)
            self.layer_weights += [norm.weight for norm in norms]
            for linear in (attn.qkv_packed, attn.o_proj, mlp.gate_up_packed, mlp.down_proj):
                kind, tensors = linear.kernel_spec()
                self.layer_kinds.append(kind)
                self.layer_weights += tensors
            kind, tensors = attn.kv_packed.kernel_spec()
            self.context_kinds.append(kind)
            self.context_weights += [*tensors, attn.k_norm.weight]
        self.final_norm = drafter.norm.weight
        self.w1 = drafter.markov_head.markov_w1.weight.detach().contiguous()
        self.w2 = drafter.markov_head.markov_w2.weight.detach().contiguous()
        self.draft_to_target = drafter.draft_to_target.contiguous()

    def layers(self, x, cos, sin, contexts: list[list[ContextBuffer]], rows: int) -> torch.Tensor:
        for context in contexts:
            for buffer in context:
                buffer.reserve(buffer.length + rows)
        buffers = [b for context in contexts for b in context]
        return self.native.draft_layers(
            x, cos, sin, self.layer_weights, self.layer_kinds, [b.keys for b in buffers],
            [b.values for b in buffers], [c[0].length for c in contexts], rows, self.heads, self.kv_heads,
            self.eps, self.final_norm,
        )  # fmt: skip

    def append(self, buffers: list[ContextBuffer], features: torch.Tensor, cos, sin) -> None:
        end = buffers[0].length + len(features)
        for buffer in buffers:
            buffer.reserve(end)
        self.native.draft_context_append(
            features, cos, sin, self.context_weights, self.context_kinds, [b.keys for b in buffers],
            [b.values for b in buffers], buffers[0].length, self.eps,
        )  # fmt: skip
        for buffer in buffers:
            buffer.length = end

    def markov_draw(
        self,
        base: torch.Tensor,
        anchors: torch.Tensor,
        steps: int,
        sampling: tuple[torch.Tensor, ...],
        uniforms: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Draws (target ids [requests, steps]), their previous tokens' W1 rows, and the sampled rows' draft
        distributions ([requests, steps, draft vocab], zeros for greedy rows; empty when none samples), among
        `draw_candidates`: greedy rows by argmax, sampled rows as `processed_probs` and `sample_rows` make
        them (sampling: per-row temperature, top_k, top_p; uniforms: float64 [requests, steps])."""
        temperature, top_k, top_p = sampling
        return self.native.markov_draw(
            base, anchors, self.w1, self.w2, self.draft_to_target, steps, DRAW_CANDIDATES,
            temperature.float().contiguous(), top_k.long().contiguous(), top_p.float().contiguous(),
            uniforms.double().contiguous(),
        )  # fmt: skip


class DSparkDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        cfg.check_self_consistent()
        self.cfg = cfg
        d = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.target_layer_ids) * cfg.target_width, d, bias=False)
        self.hidden_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.markov_head = MarkovHead(cfg)
        self.confidence_head = ConfidenceHead(cfg) if cfg.enable_confidence_head else None
        # Output head: frozen. Its rows are the target's own unless a checkpoint ships different ones.
        self.lm_head = nn.Linear(d, cfg.draft_vocab, bias=False).requires_grad_(False)
        self.lm_head_from_target = True
        if cfg.reduced_vocab:  # target id = draft id + d2t[draft id]
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab, dtype=torch.long))
        # The target's input embedding, frozen and shared (never saved unless a checkpoint ships its own).
        self.register_buffer("embed_tokens", torch.zeros(cfg.vocab_size, d), persistent=False)
        self.register_buffer("target_to_draft", torch.arange(cfg.vocab_size), persistent=False)
        cos, sin = rope_tables(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                               cfg.max_position_embeddings)  # fmt: skip
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.fused: FusedDraft | None = None  # inference on CPU, after `pack_for_inference`

    # ---- wiring -------------------------------------------------------------------------------------------

    @property
    def draft_to_target(self) -> torch.Tensor:
        """[draft vocab] target id of every draft id."""
        ids = torch.arange(self.cfg.draft_vocab, device=self.lm_head.weight.device)
        return ids + self.d2t if self.cfg.reduced_vocab else ids

    def set_draft_vocab(self, draft_to_target: torch.Tensor) -> None:
        if not self.cfg.reduced_vocab:
            raise ValueError("a full-vocabulary drafter has no draft vocabulary to set")
        if draft_to_target.numel() != self.cfg.draft_vocab:
            raise ValueError(f"draft vocabulary has {draft_to_target.numel()} ids, config says "
                             f"{self.cfg.draft_vocab}")  # fmt: skip
        self.d2t = (draft_to_target.long() - torch.arange(self.cfg.draft_vocab)).to(self.d2t.device)
        self._index_draft_vocab()

    def _index_draft_vocab(self) -> None:
        t2d = torch.full((self.cfg.vocab_size,), self.cfg.draft_vocab, dtype=torch.long)
        t2d[self.draft_to_target.cpu()] = torch.arange(self.cfg.draft_vocab)
        self.target_to_draft = t2d.to(self.lm_head.weight.device)

    def attach_target(self, embed: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Share the target's frozen embedding and, unless the checkpoint shipped its own, the draft
        vocabulary's rows of its LM head."""
        if embed.shape != self.embed_tokens.shape:
            message = f"target embedding {tuple(embed.shape)} differs from {tuple(self.embed_tokens.shape)}"
            raise DrafterConfigError("vocab_size", message)
        self.embed_tokens = embed.detach()
        if self.cfg.reduced_vocab:
            self._index_draft_vocab()
        if self.lm_head_from_target:
            rows = lm_head_weight.detach()
            rows = rows[self.draft_to_target.to(rows.device)] if self.cfg.reduced_vocab else rows
            self.lm_head.weight = nn.Parameter(rows.to(self.lm_head.weight.dtype), requires_grad=False)

    def init_norm_for_training(self) -> None:
        """After `attach_target`: scale the final norm so that the first logits have unit spread (near-uniform
        drafts); a random backbone through the target's own norm gain gives confidently wrong logits."""
        with torch.no_grad():
            self.norm.weight.fill_(1 / float(self.lm_head.weight.norm(dim=1).mean()))

    # ---- the parallel stage -------------------------------------------------------------------------------

    def context_features(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """[rows, layers * target width] concatenated target states -> [rows, d] context features."""
        return self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))

    def context_keys_values(
        self, features: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per draft layer, the injected keys/values of context features at `positions`."""
        cos, sin = self.rope_cos[positions, None], self.rope_sin[positions, None]
        return [layer.self_attn.keys_values(features, cos, sin) for layer in self.layers]

    @property
    def draft_length(self) -> int:
        """Tokens one block drafts: every row with `sample_from_anchor`, else all but the anchor's (the
        DFlash convention, where slot k predicts the token k after the anchor)."""
        return self.cfg.block_size if self.cfg.sample_from_anchor else self.cfg.block_size - 1

    def _block_input(self, anchors: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embedded blocks (anchor, then mask rows) [blocks * block_size, d] and their RoPE rows."""
        rows = self.cfg.block_size
        ids = torch.full((len(anchors), rows), self.cfg.mask_token_id, device=anchors.device)
        ids[:, 0] = anchors
        pos = (positions[:, None] + torch.arange(rows, device=positions.device)).flatten()
        x = F.embedding(ids.flatten(), self.embed_tokens)
        return x, self.rope_cos[pos, None], self.rope_sin[pos, None]

    def backbone(
        self,
        anchors: torch.Tensor,
        positions: torch.Tensor,
        context: list[list[tuple[torch.Tensor, torch.Tensor]]],
        block_sizes: list[int],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """Hidden states of the prediction rows of blocks [blocks, draft_length, d], after the final norm.

        anchors: [blocks] anchor ids; positions: [blocks] anchor positions. Blocks are grouped: group i
        has block_sizes[i] rows (block_sizes[i] // block_size blocks) sharing context[i] (per layer keys/
        values) under masks[i].
        """
        rows = self.cfg.block_size
        x, cos, sin = self._block_input(anchors, positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, [c[i] for c in context], block_sizes, masks)
        hidden = self.norm(x).view(len(anchors), rows, -1)
        return hidden if self.cfg.sample_from_anchor else hidden[:, 1:]

    def new_context(self) -> list[ContextBuffer]:
        """Empty per-layer key/value buffers of one request's context (inference)."""
        like = self.layers[0].self_attn.o_proj.weight  # the dtype and device keys and values come in
        return [ContextBuffer(self.cfg.num_key_value_heads, self.cfg.head_dim, like) for _ in self.layers]

    def draft_hidden(
        self, anchors: torch.Tensor, positions: torch.Tensor, contexts: list[list[ContextBuffer]]
    ) -> torch.Tensor:
        """Inference twin of `backbone` for one block per request: [requests, draft_length, d]. Request
        r's context is contexts[r] (per layer): the injected keys/values of positions [0, positions[r])."""
        rows = self.cfg.block_size
        x, cos, sin = self._block_input(anchors, positions)
        if self.fused is not None:
            hidden = self.fused.layers(x, cos.flatten(1), sin.flatten(1), contexts, rows)
            hidden = hidden.view(len(anchors), rows, -1)
            return hidden if self.cfg.sample_from_anchor else hidden[:, 1:]
        for i, layer in enumerate(self.layers):
            buffers = [c[i] for c in contexts]
            x = x + layer.self_attn.attend_buffers(layer.input_layernorm(x), cos, sin, buffers, rows)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.norm(x).view(len(anchors), rows, -1)
        return hidden if self.cfg.sample_from_anchor else hidden[:, 1:]

    def append_context(self, buffers: list[ContextBuffer], target_hidden: torch.Tensor) -> None:
        """Inference: the injected keys/values of a request's next committed rows (their target states
        [rows, layers * target width]) appended to its per-layer buffers."""
        start = buffers[0].length
        positions = torch.arange(start, start + len(target_hidden), device=target_hidden.device)
        if self.fused is not None:
            features = target_hidden.to(torch.float32).contiguous()
            self.fused.append(buffers, features, self.rope_cos[positions], self.rope_sin[positions])
            return
        kv = self.context_keys_values(self.context_features(target_hidden), positions)
        for buffer, (k, v) in zip(buffers, kv, strict=True):
            buffer.append(k, v)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden.flatten(0, -2)).view(*hidden.shape[:-1], -1)

    def pack_for_inference(self) -> None:
        """Use the engine's CPU matmul kernels (drafting multiplies a handful of rows) with fused q/k/v and
        gate/up projections and one-call norms; no autograd after. The standard tensors stay as they are
        (saving still works)."""
        native = native_ops() if self.fc.weight.dtype == torch.float32 else None
        eps = self.cfg.rms_norm_eps
        for layer in self.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
            for owner, name in ((layer, "input_layernorm"), (layer, "post_attention_layernorm"),
                                (layer.self_attn, "q_norm"), (layer.self_attn, "k_norm")):  # fmt: skip
                setattr(owner, name, _PackedRMSNorm(getattr(owner, name), eps, native))
        self.norm = _PackedRMSNorm(self.norm, eps, native)
        self.hidden_norm = _PackedRMSNorm(self.hidden_norm, eps, native)
        self.fc = _packed_linear(self.fc.weight.detach())
        self.lm_head = _packed_linear(self.lm_head.weight.detach())
        self.markov_head.markov_w2 = _packed_linear(self.markov_head.markov_w2.weight.detach())
        if self.confidence_head is not None:
            proj = self.confidence_head.proj
            self.confidence_head.proj = _packed_linear(proj.weight.detach(), proj.bias.detach())
        if native is not None and self.embed_tokens.device.type == "cpu":
            self.fused = FusedDraft(self, native)

    # ---- the sequential stage and confidence --------------------------------------------------------------

    def markov_embedding(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """W1[x_{k-1}] for target ids."""
        return self.markov_head.markov_w1(prev_tokens)

    def transition_bias(self, prev_embedding: torch.Tensor) -> torch.Tensor:
        return self.markov_head.markov_w2(prev_embedding)

    def confidence_logit(self, hidden: torch.Tensor, prev_embedding: torch.Tensor) -> torch.Tensor | None:
        """The confidence head's logit (None: the checkpoint has no confidence head)."""
        if self.confidence_head is None:
            return None
        x = torch.cat((hidden, prev_embedding), dim=-1) if self.cfg.confidence_head_with_markov else hidden
        return self.confidence_head.proj(x.float()).squeeze(-1)
