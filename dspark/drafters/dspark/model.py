"""The DSpark drafter: a parallel backbone conditioned on the target, a Markov head and a confidence head.

Parallel stage (DFlash-style backbone, paper Sec. 2.2 / 3.1): hidden states of several target layers are
concatenated, projected and normalised into context features, injected as extra keys/values into every
draft layer. The block input is the anchor token (the last token the target produced, not yet fed to it)
followed by gamma-1 mask tokens; the anchor is the first prediction position, so gamma inputs give gamma
logits. Inside a block attention is bidirectional; a block sees the context of positions before its anchor.

Sequential stage: the Markov head adds a low-rank transition bias B(x_{k-1}, .) = W1[x_{k-1}] W2 to
position k's base logits; tokens are sampled left to right. The confidence head estimates
c_k = sigmoid(w . [h_k ; W1[x_{k-1}]]), the probability that position k survives given the earlier ones did.

The drafter shares the target's embedding and LM head, frozen; the LM head is cut to a draft vocabulary
(the tokens the target actually produces most) to keep its cost small on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dspark.models.config import ModelConfig
from dspark.models.linear import Linear
from dspark.models.rope import apply_rope, inverse_frequencies, rope_tables


class DrafterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_layers: list[int] = Field(description="target decoder layers whose outputs condition the drafter")
    num_layers: int = Field(2, ge=1)
    block_size: int = Field(7, ge=1, description="gamma: draft tokens per block (anchor + gamma-1 masks)")
    markov_rank: int = Field(64, ge=1)
    markov_head: bool = Field(True, description="False: a purely parallel (DFlash-style) drafter")
    normalize_target_layers: bool = Field(
        True, description="RMS-normalise each target layer's hidden state before the projection"
    )
    draft_vocab_size: int = Field(8192, ge=2)
    # copied from the target
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    max_positions: int
    target_vocab_size: int

    @classmethod
    def for_target(cls, target: ModelConfig, **overrides) -> DrafterConfig:
        return cls(
            hidden_size=target.hidden_size, num_heads=target.num_heads, num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim, intermediate_size=target.intermediate_size,
            rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta, rope_scaling=target.rope_scaling,
            max_positions=target.max_position_embeddings, target_vocab_size=target.vocab_size, **overrides,
        )  # fmt: skip


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    linear = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.pack()
    return linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class DraftLayer(nn.Module):
    """A Llama decoder layer whose keys/values are [injected context ; block]."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.wq = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.wkv = nn.Linear(d, 2 * cfg.num_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.w_gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, d, bias=False)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated keys and values [rows, kv_heads, head_dim] of already-normalised inputs."""
        k, v = self.wkv(x).view(x.shape[0], 2 * self.cfg.num_kv_heads, self.cfg.head_dim).chunk(2, dim=1)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context: list[tuple[torch.Tensor, torch.Tensor]],
        block_sizes: list[int],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """x: [rows, d], the blocks of several groups stacked; group i has `block_sizes[i]` rows and
        attends to context[i] = (keys, values) and to its own rows, under masks[i] (None: all visible)."""
        cfg = self.cfg
        h = rms_norm(x, self.attn_norm, cfg.rms_norm_eps)
        q = apply_rope(self.wq(h).view(-1, cfg.num_heads, cfg.head_dim), cos, sin)
        k, v = self.keys_values(h, cos, sin)
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
        x = x + self.wo(torch.cat(outs))
        gate, up = self.w_gate_up(rms_norm(x, self.mlp_norm, cfg.rms_norm_eps)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class DSparkDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, r, vd = cfg.hidden_size, cfg.markov_rank, cfg.draft_vocab_size
        self.context_proj = nn.Linear(len(cfg.target_layers) * d, d, bias=False)
        self.context_norm = nn.Parameter(torch.ones(d))
        self.mask_embedding = nn.Parameter(torch.zeros(d))
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.Parameter(torch.ones(d))
        # Markov head: W1 embeds the previous token (row vd: a token outside the draft vocabulary).
        self.markov_embed = nn.Embedding(vd + 1, r)
        self.markov_out = nn.Linear(r, vd, bias=False)
        nn.init.zeros_(self.markov_out.weight)  # training starts from the parallel drafter
        self.confidence = nn.Linear(d + r, 1)
        # Shared with the target and frozen (filled by `attach_target`, never saved).
        self.register_buffer("embed", torch.zeros(cfg.target_vocab_size, d), persistent=False)
        self.register_buffer("lm_head", torch.zeros(vd, d), persistent=False)
        # Draft vocabulary: draft id -> target id, and target id -> draft id (vd when absent).
        self.register_buffer("draft_to_target", torch.arange(vd))
        self.register_buffer("target_to_draft", torch.full((cfg.target_vocab_size,), vd), persistent=False)
        cos, sin = rope_tables(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                               cfg.max_positions)  # fmt: skip
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head_packed: Linear | None = None

    # ---- wiring ---------------------------------------------------------------------------------------

    def attach_target(self, embed: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Share the target's (frozen) embedding and the draft-vocabulary rows of its LM head."""
        self.embed = embed.detach()
        self.lm_head = lm_head_weight.detach()[self.draft_to_target].clone()
        t2d = torch.full((self.cfg.target_vocab_size,), self.cfg.draft_vocab_size, dtype=torch.long)
        t2d[self.draft_to_target] = torch.arange(self.cfg.draft_vocab_size)
        self.target_to_draft = t2d

    def set_draft_vocab(self, draft_to_target: torch.Tensor) -> None:
        if draft_to_target.numel() != self.cfg.draft_vocab_size:
            raise ValueError(f"draft vocabulary has {draft_to_target.numel()} ids, config says "
                             f"{self.cfg.draft_vocab_size}")  # fmt: skip
        self.draft_to_target = draft_to_target.long().clone()

    def init_final_norm(self) -> None:
        """After `attach_target`: scale the final norm so that the first logits have unit spread (near-uniform
        drafts); a random backbone through the target's own norm gain gives confidently wrong logits."""
        with torch.no_grad():
            self.final_norm.fill_(1 / float(self.lm_head.norm(dim=1).mean()))

    # ---- the parallel stage ---------------------------------------------------------------------------

    def context_features(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """[rows, layers*d] concatenated target hidden states -> [rows, d] context features.

        Normalising each layer first matters: a few positions (attention sinks) carry activations ~1000x
        the typical size in a few channels, which otherwise dominate the projection."""
        target_hidden = target_hidden.to(self.context_norm.dtype)
        if self.cfg.normalize_target_layers:
            rows, d = target_hidden.shape[0], self.cfg.hidden_size
            per_layer = target_hidden.view(rows, -1, d)
            target_hidden = F.rms_norm(per_layer, (d,), eps=self.cfg.rms_norm_eps).reshape(rows, -1)
        projected = self.context_proj(target_hidden)
        return rms_norm(projected, self.context_norm, self.cfg.rms_norm_eps)

    def context_keys_values(
        self, features: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per draft layer, the injected keys/values of context features at `positions`."""
        cos, sin = self.rope_cos[positions, None], self.rope_sin[positions, None]
        return [layer.keys_values(features, cos, sin) for layer in self.layers]

    def backbone(
        self,
        anchors: torch.Tensor,
        positions: torch.Tensor,
        context: list[list[tuple[torch.Tensor, torch.Tensor]]],
        block_sizes: list[int],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """Hidden states h_1..h_gamma of blocks [blocks, gamma, d].

        anchors: [blocks] anchor ids; positions: [blocks] anchor positions. Blocks are grouped: group i
        has block_sizes[i] // gamma blocks sharing context[i] (per layer keys/values) under masks[i].
        """
        gamma = self.cfg.block_size
        x = self.mask_embedding.expand(len(anchors), gamma, -1).clone()
        x[:, 0] = self.embed[anchors]
        pos = (positions[:, None] + torch.arange(gamma)).flatten()
        cos, sin = self.rope_cos[pos, None], self.rope_sin[pos, None]
        x = x.flatten(0, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, [c[i] for c in context], block_sizes, masks)
        return rms_norm(x, self.final_norm, self.cfg.rms_norm_eps).view(len(anchors), gamma, -1)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_packed is not None:
            return self.lm_head_packed(hidden.flatten(0, -2)).view(*hidden.shape[:-1], -1)
        return F.linear(hidden, self.lm_head)

    def pack_for_inference(self) -> None:
        """Use the engine's CPU matmul kernels (drafting multiplies a handful of rows); no autograd after."""
        for module in list(self.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, _packed_linear(child.weight, child.bias))
        self.lm_head_packed = _packed_linear(self.lm_head)

    # ---- the sequential stage and confidence ------------------------------------------------------------

    def markov_embedding(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """W1[x_{k-1}] for target ids (tokens outside the draft vocabulary share one row)."""
        return self.markov_embed(self.target_to_draft[prev_tokens])

    def transition_bias(self, prev_embedding: torch.Tensor) -> torch.Tensor:
        if not self.cfg.markov_head:
            return torch.zeros((), dtype=prev_embedding.dtype)
        return self.markov_out(prev_embedding)

    def confidence_logit(self, hidden: torch.Tensor, prev_embedding: torch.Tensor) -> torch.Tensor:
        return self.confidence(torch.cat((hidden, prev_embedding), dim=-1)).squeeze(-1)
