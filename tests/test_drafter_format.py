"""The DSpark drafter against the standard checkpoint format (DeepSpec's `Qwen3DSparkModel`, vLLM 0.32).

A tiny random Qwen3 target (Hugging Face `Qwen3ForCausalLM`, the SmolLM2 tokenizer) and a random drafter
folder written here straight from the format description (config.json + model.safetensors, never through
the project's save functions) are checked against an independent plain-PyTorch forward of that format
(`reference_draft`, which imports nothing of `dspark.drafters`): the production loader and proposer draft
the same tokens with the same confidences; export and save round-trip bit for bit; mismatched pairs and
broken folders are refused naming the field; the engine and the OpenAI server over the pair keep the
target's greedy output.

Reference semantics (vLLM's qwen3_dflash.py / qwen3_dspark.py): context c = hidden_norm(fc(concat of the
outputs of target layers `target_layer_ids`, pre final norm)); every draft layer attends its block queries
over [RoPE(k_norm(k_proj(c))) at positions 0..p-1 ; the block's own keys] with values [v_proj(c) ; block
values], bidirectionally; the block is [anchor, mask, ..., mask] at positions p..p+block_size-1; logits_k =
lm_head(h_k) + W2 W1[prev_k] in the draft vocabulary; confidence_k = sigmoid(proj([h_k ; W1[prev_k]])).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dspark.assembly import build_engine
from dspark.drafters.dspark.checkpoint import export_drafter, load_drafter, read_config, save_drafter
from dspark.drafters.dspark.model import DrafterConfigError
from dspark.drafters.dspark.proposer import DSparkProposer
from dspark.engine import EngineConfig
from dspark.models.loader import load_tokenizer, load_transformer, resolve_model_dir
from dspark.sampling import SamplingParams
from dspark.scheduling import CostProfile, VerificationConfig
from dspark.scheduling.policies import ScheduledVerification
from dspark.serving.async_engine import AsyncEngine
from dspark.serving.openai_api import create_app

# ---- the tiny target ---------------------------------------------------------------------------------------

VOCAB = 49152  # SmolLM2's, so its tokenizer serves the tiny target
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 4, 2, 16, 128
TARGET_LAYERS = 4
TARGET_THETA = 1e5

# ---- the drafter (its rope theta and eps differ from the target's: the drafter's own must be used) ---------

BLOCK = 4
MASK_ID = 40961
LAYER_IDS = [0, 2, TARGET_LAYERS - 1]  # the last one too: its output *before* the final norm
DRAFT_VOCAB = 512
RANK = 8
DRAFT_THETA = 5e4
DRAFT_EPS = 1e-5


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    """A random Qwen3 folder (safetensors) with the default model's tokenizer files."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=TARGET_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rope_theta=TARGET_THETA,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, initializer_range=0.1, architectures=["Qwen3ForCausalLM"],
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm gains (a layer mix-up then shows)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.6, 1.4)
    out = tmp_path_factory.mktemp("qwen3-target")
    model.save_pretrained(out)
    default = resolve_model_dir("default")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (default / name).exists():
            shutil.copy(default / name, out / name)
    assert (out / "model.safetensors").exists()
    return out


@pytest.fixture(scope="module")
def hf_target(target_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def target(target_dir):
    """The project's own Transformer of the tiny target (packed, as the engine runs it)."""
    return load_transformer(target_dir)


def hf_layer_outputs(hf_target, ids: list[int]) -> list[torch.Tensor]:
    """[len(ids), hidden] output of every decoder layer (before the final norm), by forward hooks: HF's
    `output_hidden_states[-1]` is after the final norm, vLLM's auxiliary state of the last layer is not."""
    outputs: dict[int, torch.Tensor] = {}

    def hook(index):
        def record(_module, _args, out):
            outputs[index] = (out[0] if isinstance(out, tuple) else out).detach()

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(hf_target.model.layers)]
    try:
        with torch.no_grad():
            result = hf_target(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    layers = [outputs[i][0] for i in range(len(hf_target.model.layers))]
    for i in range(len(layers) - 1):  # HF's own convention agrees below the last layer
        torch.testing.assert_close(result.hidden_states[i + 1][0], layers[i])
    return layers


def hf_features(hf_target, ids: list[int], layer_ids: list[int] = LAYER_IDS) -> torch.Tensor:
    """[len(ids), len(layer_ids) * hidden]: the concatenated target states the drafter conditions on."""
    layers = hf_layer_outputs(hf_target, ids)
    return torch.cat([layers[i] for i in layer_ids], dim=-1)


# ---- a drafter folder, written from the format description -------------------------------------------------


def drafter_config(**overrides) -> dict:
    """A standard DSpark config.json (as DeepSpec's `save_pretrained` writes it) for the tiny target."""
    layers = overrides.get("num_hidden_layers", 2)
    config = {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "num_hidden_layers": layers,
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "intermediate_size": INTERMEDIATE, "rms_norm_eps": DRAFT_EPS,
        "max_position_embeddings": 2048, "vocab_size": VOCAB, "rope_theta": DRAFT_THETA, "rope_scaling": None,
        "tie_word_embeddings": False, "layer_types": ["full_attention"] * layers, "block_size": BLOCK,
        "mask_token_id": MASK_ID, "target_layer_ids": LAYER_IDS, "markov_rank": RANK,
        "markov_head_type": "vanilla", "enable_confidence_head": True, "confidence_head_with_markov": True,
        "draft_vocab_size": DRAFT_VOCAB, "sample_from_anchor": True, "num_speculative_tokens": BLOCK,
        "torch_dtype": "float32", "transformers_version": "4.57.1",
    }  # fmt: skip
    return config | overrides


def drafter_tensors(config: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors of every standard name for `config`, at scales where each part matters: norm gains
    (q_norm / k_norm included) away from one, a non-zero Markov head, an unsaturated confidence head."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def gain(n: int) -> torch.Tensor:
        return 0.6 + 0.8 * torch.rand(n, generator=g)

    d, hd, heads, kv = (
        config["hidden_size"],
        config["head_dim"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    )
    inter, vocab, rank = config["intermediate_size"], config["vocab_size"], config["markov_rank"]
    draft_vocab = config.get("draft_vocab_size") or vocab
    fc_in = len(config["target_layer_ids"]) * (config.get("target_hidden_size") or d)
    t = {
        "fc.weight": normal(d, fc_in, std=fc_in**-0.5),
        "hidden_norm.weight": gain(d),
        "norm.weight": gain(d),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        t[p + "self_attn.q_proj.weight"] = normal(heads * hd, d, std=d**-0.5)
        t[p + "self_attn.k_proj.weight"] = normal(kv * hd, d, std=d**-0.5)
        t[p + "self_attn.v_proj.weight"] = normal(kv * hd, d, std=d**-0.5)
        t[p + "self_attn.o_proj.weight"] = normal(d, heads * hd, std=(heads * hd) ** -0.5)
        t[p + "self_attn.q_norm.weight"] = gain(hd)
        t[p + "self_attn.k_norm.weight"] = gain(hd)
        t[p + "mlp.gate_proj.weight"] = normal(inter, d, std=d**-0.5)
        t[p + "mlp.up_proj.weight"] = normal(inter, d, std=d**-0.5)
        t[p + "mlp.down_proj.weight"] = normal(d, inter, std=inter**-0.5)
        t[p + "input_layernorm.weight"] = gain(d)
        t[p + "post_attention_layernorm.weight"] = gain(d)
    if draft_vocab < vocab:
        target_ids = torch.randperm(vocab, generator=g)[:draft_vocab].sort().values
        t["lm_head.weight"] = normal(draft_vocab, d, std=0.5)
        t["d2t"] = (target_ids - torch.arange(draft_vocab)).to(torch.int64)
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[target_ids] = True
        t["t2d"] = t2d  # EAGLE-3's reverse map: ignored by vLLM
    t["markov_head.markov_w1.weight"] = normal(vocab, rank, std=1.0)
    t["markov_head.markov_w2.weight"] = normal(draft_vocab, rank, std=0.5)
    if config.get("enable_confidence_head"):
        width = d + (rank if config.get("confidence_head_with_markov") else 0)
        t["confidence_head.proj.weight"] = normal(1, width, std=0.3)
        t["confidence_head.proj.bias"] = normal(1, std=0.5)
    t["mask_embedding"] = normal(1, 1, d, std=1.0)  # a training-time parameter vLLM drops on load
    return t


def write_drafter(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory) -> Path:
    config = drafter_config()
    return write_drafter(tmp_path_factory.mktemp("dspark-drafter"), config, drafter_tensors(config))


# ---- the independent reference forward ---------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox (rotate-half) RoPE of x [rows, heads, head_dim] at `positions` [rows]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.double()[:, None] * inv_freq[None]
    cos = torch.cat((angles.cos(), angles.cos()), -1)[:, None]
    sin = torch.cat((angles.sin(), angles.sin()), -1)[:, None]
    rotated = torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), -1)
    return x * cos + rotated * sin


@dataclass
class Reference:
    tokens: list[int]  # target ids
    confidences: torch.Tensor  # [block]
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 draft logit per position


def reference_draft(
    config: dict,
    tensors: dict[str, torch.Tensor],
    embed: torch.Tensor,
    features: torch.Tensor,
    anchor: int,
    variant: str = "",
) -> Reference:
    """Greedy block of the standard format, in float64 from the config dict and the raw tensors.

    features: [p, len(target_layer_ids) * target hidden], the target states of positions 0..p-1; the
    anchor sits at position p. `variant` swaps in one plausible mistake (to check that the comparison
    would catch it)."""
    w = {k: v.double() for k, v in tensors.items() if v.is_floating_point()}
    eps, hd = config["rms_norm_eps"], config["head_dim"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    theta = TARGET_THETA if variant == "target_theta" else config["rope_theta"]
    block, p = config["block_size"], len(features)
    context = _rms(features.double() @ w["fc.weight"].T, w["hidden_norm.weight"], eps)
    ids = torch.tensor([anchor] + [config["mask_token_id"]] * (block - 1))
    x = embed.double()[ids]
    ctx_pos, block_pos = torch.arange(p), torch.arange(p, p + block)
    for i in range(config["num_hidden_layers"]):
        a = f"layers.{i}.self_attn."
        h = _rms(x, w[f"layers.{i}.input_layernorm.weight"], eps)
        c = _rms(context, w[f"layers.{i}.input_layernorm.weight"], eps) if variant == "ctx_norm" else context
        q = _rms((h @ w[a + "q_proj.weight"].T).view(block, heads, hd), w[a + "q_norm.weight"], eps)
        k = _rms((h @ w[a + "k_proj.weight"].T).view(block, kv, hd), w[a + "k_norm.weight"], eps)
        v = (h @ w[a + "v_proj.weight"].T).view(block, kv, hd)
        ctx_k = (c @ w[a + "k_proj.weight"].T).view(p, kv, hd)
        if variant != "ctx_no_k_norm":
            ctx_k = _rms(ctx_k, w[a + "k_norm.weight"], eps)
        ctx_v = (c @ w[a + "v_proj.weight"].T).view(p, kv, hd)
        q, k = _rope(q, block_pos, theta), _rope(k, block_pos, theta)
        ctx_k = _rope(ctx_k, block_pos[:1].expand(p) if variant == "ctx_at_anchor" else ctx_pos, theta)
        # GQA: query head j reads kv head j // (heads // kv)
        keys = torch.cat((ctx_k, k)).repeat_interleave(heads // kv, dim=1)
        values = torch.cat((ctx_v, v)).repeat_interleave(heads // kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * hd**-0.5
        if variant == "causal":
            future = torch.ones(block, block).triu(1).bool()
            scores[:, :, p:] = scores[:, :, p:].masked_fill(future, -torch.inf)
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(block, heads * hd)
        x = x + out @ w[a + "o_proj.weight"].T
        h2 = _rms(x, w[f"layers.{i}.post_attention_layernorm.weight"], eps)
        m = f"layers.{i}.mlp."
        gated = F.silu(h2 @ w[m + "gate_proj.weight"].T) * (h2 @ w[m + "up_proj.weight"].T)
        x = x + gated @ w[m + "down_proj.weight"].T
    hidden = _rms(x, w["norm.weight"], eps)
    base = hidden @ w["lm_head.weight"].T
    d2t = tensors["d2t"]
    w1, w2 = w["markov_head.markov_w1.weight"], w["markov_head.markov_w2.weight"]
    tokens, confidences, margins, prev = [], [], [], anchor
    for k in range(block):
        e = w1[prev]
        logits = base[k] + (0 if variant == "no_markov" else w2 @ e)
        proj_w, proj_b = w["confidence_head.proj.weight"][0], w["confidence_head.proj.bias"][0]
        confidences.append(torch.sigmoid(proj_w @ torch.cat((hidden[k], e)) + proj_b))
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        draft_id = int(logits.argmax())
        prev = draft_id + int(d2t[draft_id])
        tokens.append(prev)
    return Reference(tokens, torch.stack(confidences), margins)


# ---- shared inputs -----------------------------------------------------------------------------------------

CASES = [(0, 1), (0, 9), (1, 16), (2, 23)]  # (prompt, anchor position p): context rows 0..p-1
MAX_LENS = [BLOCK, BLOCK, 2, 3]  # the batched propose call asks some requests for fewer tokens


@dataclass
class FakeRequest:
    request_id: str
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)  # greedy
    generator: torch.Generator | None = None


@pytest.fixture(scope="module")
def drafter_file(drafter_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """The folder's config.json and tensors exactly as stored."""
    return json.loads((drafter_dir / "config.json").read_text()), load_file(drafter_dir / "model.safetensors")


@pytest.fixture(scope="module")
def embed(hf_target) -> torch.Tensor:
    return hf_target.model.embed_tokens.weight.detach()


@pytest.fixture(scope="module")
def references(hf_target, drafter_file, embed):
    """Per case: the request's token ids (ending with the anchor), the target features of the positions
    before the anchor (Hugging Face forward, pre-norm layer outputs) and the reference block."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (24,), generator=g).tolist() for _ in range(3)]
    config, tensors = drafter_file
    cases = []
    for prompt, p in CASES:
        ids = prompts[prompt][: p + 1]
        features = hf_features(hf_target, ids[:-1])
        reference = reference_draft(config, tensors, embed, features, ids[-1])
        assert min(reference.margins) > 1e-3, "a near tie: pick another seed"
        cases.append((ids, features, reference))
    return cases


def propose_cases(proposer: DSparkProposer, cases, tag: str) -> tuple[list, list]:
    """Observe each case's features (in chunks, as prefill chunks and verification blocks arrive), then
    draft each request alone and all of them in one batched call."""
    requests = []
    for i, (ids, features, _) in enumerate(cases):
        request = FakeRequest(f"{tag}-{i}", ids)
        for chunk in features.split(5):
            proposer.observe(request, chunk)
        requests.append(request)
    alone = [proposer.propose([r], [BLOCK])[0] for r in requests]
    batched = proposer.propose(requests, MAX_LENS)
    return alone, batched


def assert_drafts_match(alone, batched, cases, atol: float = 1e-5) -> None:
    lengths = [BLOCK] * len(alone) + MAX_LENS
    for draft, m, (_, _, ref) in zip([*alone, *batched], lengths, [*cases, *cases], strict=True):
        assert draft.tokens == ref.tokens[:m]
        assert draft.probs is None
        torch.testing.assert_close(draft.confidences.double(), ref.confidences[:m], atol=atol, rtol=1e-4)


# ---- a. the production drafter drafts the reference's block ------------------------------------------------


def test_proposer_drafts_the_reference_block(drafter_dir, target, references):
    """Loading the standard folder and drafting through `DSparkProposer` (fed the Hugging Face target's
    pre-norm layer outputs, the same features the reference gets) gives the reference's greedy target ids
    and raw confidences (no calibration.json), alone and batched, for several anchor positions."""
    proposer = DSparkProposer.load(drafter_dir, target)
    assert proposer.calibration is None
    assert proposer.hidden_layers == tuple(LAYER_IDS)
    assert proposer.default_num_speculative_tokens == BLOCK
    alone, batched = propose_cases(proposer, references, "a")
    assert_drafts_match(alone, batched, references)


def test_project_target_features_are_the_layer_outputs(target, hf_target, references):
    """The engine's features (the project's Transformer, `hidden_layers=target_layer_ids`) equal the
    Hugging Face target's outputs of those layers before the final norm, the last layer included."""
    ids = references[-1][0]
    out = target(
        torch.tensor(ids),
        target.layout([0], [0], [len(ids)]),
        target.new_cache(1, 64),
        hidden_layers=LAYER_IDS,
    )
    ours = torch.cat([out.hidden[i] for i in LAYER_IDS], dim=-1)
    torch.testing.assert_close(ours, hf_features(hf_target, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "variant", ["ctx_norm", "ctx_no_k_norm", "ctx_at_anchor", "causal", "target_theta", "no_markov"]
)
def test_the_comparison_would_catch_a_plausible_mistake(drafter_file, embed, references, variant):
    """Guards the test itself: each plausible misreading of the format (input_layernorm on the context, no
    k_norm on the context keys, context keys rotated to the anchor's position, a causal block, the target's
    rope theta, no Markov bias) changes the reference's tokens or confidences well beyond the tolerance
    used above."""
    config, tensors = drafter_file
    changed = False
    for ids, features, ref in references:
        other = reference_draft(config, tensors, embed, features, ids[-1], variant)
        changed |= (
            other.tokens != ref.tokens or float((other.confidences - ref.confidences).abs().max()) > 1e-3
        )
    assert changed


# ---- b. export and save round trips ------------------------------------------------------------------------


def _keys_and_dtypes(directory: Path) -> dict[str, torch.dtype]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        assert tensor.dtype == sb[name].dtype and torch.equal(tensor, sb[name]), name
    assert a.cfg == b.cfg


def test_vllm_export_round_trips(drafter_dir, drafter_file, target, references, tmp_path):
    """`export_drafter(fmt="vllm")` writes vLLM's folder (architecture, model type, explicit rope theta,
    the reduced `lm_head`, int64 `d2t`, no `model.` prefix) whose tensors are the source file's, bit for
    bit; loading it gives the same drafter and the same drafts as the reference."""
    source_config, source_tensors = drafter_file
    out = export_drafter(drafter_dir, tmp_path / "vllm", target, fmt="vllm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"]
    assert config["model_type"] == "qwen3"
    assert config["rope_theta"] == DRAFT_THETA
    assert all(t == "full_attention" for t in config["layer_types"])
    assert len(config["layer_types"]) == source_config["num_hidden_layers"]
    for key in (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "rms_norm_eps",
        "vocab_size",
        "block_size",
        "mask_token_id",
        "target_layer_ids",
        "markov_rank",
        "draft_vocab_size",
        "enable_confidence_head",
        "confidence_head_with_markov",
        "sample_from_anchor",
    ):
        assert config[key] == source_config[key], key
    assert not (out / "calibration.json").exists()
    dtypes = _keys_and_dtypes(out)
    assert "lm_head.weight" in dtypes and dtypes["d2t"] == "I64"
    assert not any(name.startswith("model.") for name in dtypes)
    exported = load_file(out / "model.safetensors")
    for name, tensor in source_tensors.items():
        if name not in ("mask_embedding", "t2d"):  # vLLM ignores both
            assert torch.equal(exported[name], tensor), name
    assert set(exported) - set(source_tensors) == set()

    original = load_drafter(drafter_dir, target)
    _assert_same_state(load_drafter(out, target), original)
    alone, batched = propose_cases(DSparkProposer.load(out, target), references, "b")
    assert_drafts_match(alone, batched, references)


def test_project_format_round_trips(drafter_dir, target, references, tmp_path):
    """`save_drafter(fmt="dspark")` of a loaded drafter loads back identical (tensors, config, drafts). The
    shipped `lm_head` is not the target's rows, so even the project's own flavour must keep it."""
    original = load_drafter(drafter_dir, target)
    out = save_drafter(original, tmp_path / "dspark", fmt="dspark")
    assert "lm_head.weight" in _keys_and_dtypes(out)
    assert read_config(out) == read_config(drafter_dir)
    reloaded = load_drafter(out, target)
    _assert_same_state(reloaded, original)
    alone, batched = propose_cases(DSparkProposer(reloaded), references, "c")
    assert_drafts_match(alone, batched, references)


def test_bf16_export_keeps_the_confidence_head_in_fp32(drafter_dir, target, tmp_path):
    """A bf16 vLLM export stores floating tensors in bf16 except the confidence head (vLLM keeps it in
    fp32); `d2t` stays int64, the config says bfloat16, and it loads back against the target."""
    out = export_drafter(drafter_dir, tmp_path / "bf16", target, fmt="vllm", dtype=torch.bfloat16)
    dtypes = _keys_and_dtypes(out)
    assert dtypes["d2t"] == "I64"
    assert dtypes["confidence_head.proj.weight"] == "F32" and dtypes["confidence_head.proj.bias"] == "F32"
    assert {dtypes[n] for n in dtypes if n != "d2t" and not n.startswith("confidence_head")} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    original, half = load_drafter(drafter_dir, target), load_drafter(out, target)
    torch.testing.assert_close(half.fc.weight, original.fc.weight, atol=2e-2, rtol=1e-2)
    assert torch.equal(half.confidence_head.proj.weight, original.confidence_head.proj.weight)


# ---- c. mismatched pairs and broken folders are refused, naming the field ----------------------------------


@pytest.mark.parametrize(
    ("field_name", "overrides"),
    [
        ("target_layer_ids", {"target_layer_ids": [0, 2, TARGET_LAYERS]}),  # one past the last layer
        ("hidden_size", {"hidden_size": 32}),  # a drafter made for a narrower target
        ("target_hidden_size", {"target_hidden_size": 48}),  # reads states of another width
        # reads the target's width but is narrower and ships no embed_tokens to replace the target's
        ("hidden_size", {"hidden_size": 32, "head_dim": 8, "target_hidden_size": HIDDEN}),
        ("vocab_size", {"vocab_size": VOCAB + 64}),  # another tokenizer
    ],
)
def test_a_drafter_for_another_target_is_refused(
    target, target_dir, tiny_tokenizer, tmp_path, field_name, overrides
):
    """A self-consistent folder (tensors match its config) that was made for a different target is refused
    by `load_drafter` and by the engine's `drafter:` path with a DrafterConfigError naming the field."""
    config = drafter_config(**overrides)
    folder = write_drafter(tmp_path / "other", config, drafter_tensors(config))
    with pytest.raises(DrafterConfigError, match=field_name) as err:
        load_drafter(folder, target)
    assert err.value.field == field_name
    engine_config = EngineConfig(model=str(target_dir), proposer="dspark", drafter=str(folder))
    with pytest.raises(DrafterConfigError) as err:
        build_engine(engine_config, model=target, tokenizer=tiny_tokenizer)
    assert err.value.field == field_name


def test_a_narrower_drafter_with_its_own_embedding_loads(target, references, tmp_path):
    """The format allows a drafter narrower than its target (`target_hidden_size`) that ships its own
    `embed_tokens` (and `lm_head`): it loads and drafts the reference's blocks with that embedding."""
    config = drafter_config(hidden_size=32, head_dim=8, target_hidden_size=HIDDEN)
    tensors = drafter_tensors(config)
    tensors["embed_tokens.weight"] = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(3))
    folder = write_drafter(tmp_path / "narrow", config, tensors)
    proposer = DSparkProposer.load(folder, target)
    cases = [
        (ids, features, reference_draft(config, tensors, tensors["embed_tokens.weight"], features, ids[-1]))
        for ids, features, _ in references
    ]
    assert_drafts_match(*propose_cases(proposer, cases, "narrow"), cases)


def _without(config: dict, name: str) -> dict:
    return {k: v for k, v in config.items() if k != name}


@pytest.mark.parametrize(
    ("field_name", "config"),
    [
        ("mask_token_id", _without(drafter_config(), "mask_token_id")),
        ("target_layer_ids", _without(drafter_config(), "target_layer_ids")),
        ("block_size", _without(drafter_config(), "block_size")),
        ("markov_rank", _without(drafter_config(), "markov_rank")),
        ("mask_token_id", drafter_config(mask_token_id=VOCAB)),
        ("model_type", drafter_config(model_type="llama")),
        ("layer_types", drafter_config(layer_types=["sliding_attention", "full_attention"])),
        ("markov_head_type", drafter_config(markov_head_type="gated")),
    ],
)
def test_a_broken_config_names_its_field(target, tmp_path, field_name, config):
    """A config.json missing a required DSpark field, or with a value the format does not allow, is
    refused by `read_config` and `load_drafter` with the field named."""
    folder = write_drafter(tmp_path / "broken", config, drafter_tensors(drafter_config()))
    with pytest.raises(DrafterConfigError, match=field_name) as err:
        read_config(folder)
    assert err.value.field == field_name
    with pytest.raises(DrafterConfigError) as err:
        load_drafter(folder, target)
    assert err.value.field == field_name


K_NORM = "layers.1.self_attn.k_norm.weight"


def _edit(tensors: dict, name: str, value: torch.Tensor | None) -> dict:
    edited = dict(tensors)
    if value is None:
        del edited[name]
    else:
        edited[name] = value
    return edited


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (K_NORM, torch.ones(HEAD_DIM // 2)),  # wrong shape
        ("markov_head.markov_w2.weight", torch.zeros(VOCAB, RANK)),  # full vocabulary, config says reduced
        ("fc.weight", torch.zeros(HIDDEN, 2 * HIDDEN)),  # two target layers, config says three
        ("layers.0.self_attn.q_norm.weight", None),  # missing
        ("d2t", None),  # reduced vocabulary without its map
        ("d2t", torch.full((DRAFT_VOCAB,), VOCAB, dtype=torch.int64)),  # maps outside the vocabulary
    ],
)
def test_a_broken_tensor_is_named(target, drafter_file, tmp_path, name, value):
    """A tensor of the wrong shape, a missing one, or a `d2t` outside the target vocabulary is refused with
    the tensor's name as the error's field."""
    config, tensors = drafter_file
    folder = write_drafter(tmp_path / "broken", config, _edit(tensors, name, value))
    with pytest.raises(DrafterConfigError) as err:
        load_drafter(folder, target)
    assert err.value.field == name
    assert name in str(err.value)


def test_rope_theta_is_read_as_vllm_reads_it(tmp_path):
    """`rope_parameters` wins, then `rope_theta`; with neither, vLLM's fallback of 1e6 applies."""
    base = _without(drafter_config(), "rope_theta")
    tensors = drafter_tensors(drafter_config())
    cases = [
        (drafter_config(), DRAFT_THETA),
        (base, 1e6),
        (base | {"rope_parameters": {"rope_type": "default", "rope_theta": 2e4}}, 2e4),
    ]
    for i, (config, theta) in enumerate(cases):
        assert read_config(write_drafter(tmp_path / str(i), config, tensors)).rope_theta == theta


# ---- d. the engine over the pair ---------------------------------------------------------------------------

MAX_TOKENS = 24
CHATS = ["Name three colors.", "What is two plus two?", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def tiny_tokenizer(target_dir):
    """The SmolLM2 tokenizer, loaded from the tiny target's folder."""
    return load_tokenizer(target_dir)


@pytest.fixture(scope="module")
def chat_prompts(tiny_tokenizer) -> list[list[int]]:
    return [
        list(
            tiny_tokenizer.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for c in CHATS
    ]


@pytest.fixture(scope="module")
def plain_outputs(target_dir, target, tiny_tokenizer, chat_prompts) -> list[list[int]]:
    """Plain greedy decoding of the tiny target (proposer none)."""
    config = EngineConfig(model=str(target_dir), proposer="none", max_batch_size=4)
    plain = build_engine(config, model=target, tokenizer=tiny_tokenizer)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return [c.token_ids for c in plain.generate(chat_prompts, params)]


def _spec_engine(target_dir, drafter_dir, policy: str, **parts):
    config = EngineConfig(
        model=str(target_dir), proposer="dspark", drafter=str(drafter_dir), max_batch_size=4,
        max_model_len=256, verification=VerificationConfig(policy=policy, profile_cache=False),
    )  # fmt: skip
    return build_engine(config, **parts)


def test_engine_greedy_output_is_the_targets_own(target_dir, drafter_dir, chat_prompts, plain_outputs):
    """The engine built from `EngineConfig(model=<target folder>, proposer="dspark", drafter=<folder>)` alone
    (it loads target, tokenizer and drafter itself) emits plain greedy decoding's tokens under the fixed
    policy, and did draft (a random drafter is rejected: the rejection path is what runs)."""
    engine = _spec_engine(target_dir, drafter_dir, "fixed")
    assert isinstance(engine.proposer, DSparkProposer)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [c.token_ids for c in engine.generate(chat_prompts, params)] == plain_outputs
    assert engine.stats.drafted > 0


# Verifying extra tokens is nearly free and drafting is free: the scheduler admits drafts every step.
CHEAP_VERIFICATION = CostProfile(
    key="test", requests=[1, 4], tokens_per_request=[1, 2, 3, 5],
    target_ms=[[10.0, 10.1, 10.2, 10.4]] * 2, draft_ms=[0.0, 0.0],
)  # fmt: skip


def test_scheduled_engine_greedy_output_is_the_targets_own(
    target_dir, drafter_dir, target, tiny_tokenizer, chat_prompts, plain_outputs
):
    """Under the scheduler (its cost profile measured at build, not cached) the output is plain greedy
    decoding's; the measured profile may gate the random drafter off on this machine, so the run is
    repeated with a fixed cheap-verification profile and no gate, where its confidences set the
    verification lengths every step, and it must draft."""
    engine = _spec_engine(target_dir, drafter_dir, "scheduler", model=target, tokenizer=tiny_tokenizer)
    assert isinstance(engine.policy, ScheduledVerification) and engine.policy.profile is not None
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [c.token_ids for c in engine.generate(chat_prompts, params)] == plain_outputs
    engine.policy = ScheduledVerification(CHEAP_VERIFICATION, draft_gate=False)
    drafted = engine.stats.drafted
    assert [c.token_ids for c in engine.generate(chat_prompts, params)] == plain_outputs
    assert engine.stats.drafted > drafted


class RecordingProposer(DSparkProposer):
    """Keeps (token ids, draft) of every non-empty draft the engine asked for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[list[int], list[int], torch.Tensor]] = []

    def propose(self, requests, max_lens):
        drafts = super().propose(requests, max_lens)
        for request, draft in zip(requests, drafts, strict=True):
            if draft.tokens:
                self.log.append((list(request.token_ids), draft.tokens, draft.confidences.clone()))
        return drafts


def test_engine_drafts_are_the_reference_blocks(
    target_dir, drafter_dir, drafter_file, target, tiny_tokenizer, hf_target, embed, chat_prompts
):
    """Inside the engine (features observed from prefill chunks and verification steps, two requests in a
    batch) each draft is the reference's block for that request's tokens, its anchor the last token."""
    proposer = RecordingProposer(load_drafter(drafter_dir, target))
    config = EngineConfig(
        model=str(target_dir),
        proposer="dspark",
        max_batch_size=2,
        max_tokens_per_step=16,
        verification=VerificationConfig(policy="fixed"),
    )
    engine = build_engine(config, model=target, tokenizer=tiny_tokenizer, proposer=proposer)
    engine.generate(chat_prompts[:2], SamplingParams(max_tokens=10, ignore_eos=True))
    assert len(proposer.log) >= 4
    drafter_config_, tensors = drafter_file
    prompt_lens = {len(p) for p in chat_prompts[:2]}
    assert any(len(ids) - 1 not in prompt_lens for ids, _, _ in proposer.log)  # after verification steps too
    for ids, tokens, confidences in proposer.log:
        features = hf_features(hf_target, ids[:-1])
        ref = reference_draft(drafter_config_, tensors, embed, features, ids[-1])
        assert tokens == ref.tokens[: len(tokens)]
        torch.testing.assert_close(confidences.double(), ref.confidences[: len(tokens)], atol=1e-4, rtol=1e-3)


# ---- e. serving --------------------------------------------------------------------------------------------

MODEL_ID = "tiny-qwen3"
PROMPT = "The capital of France is"


def test_openai_server_returns_the_plain_greedy_text(target_dir, drafter_dir, target, tiny_tokenizer):
    """The OpenAI-compatible app over an AsyncEngine speculating with the drafter folder returns, for a
    greedy /v1/completions and /v1/chat/completions, the text plain decoding of the target produces."""
    plain = build_engine(
        EngineConfig(model=str(target_dir), proposer="none", max_batch_size=1),
        model=target,
        tokenizer=tiny_tokenizer,
    )
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    expected = "".join(o.text for o in plain.stream(PROMPT, params))
    messages = [{"role": "user", "content": CHATS[0]}]
    expected_chat = "".join(o.text for o in plain.stream(messages=messages, params=params))
    config = EngineConfig(
        model=str(target_dir),
        proposer="dspark",
        drafter=str(drafter_dir),
        max_batch_size=2,
        verification=VerificationConfig(policy="fixed"),
    )
    async_engine = AsyncEngine(build_engine(config, model=target, tokenizer=tiny_tokenizer))
    try:
        client = TestClient(create_app(async_engine, MODEL_ID))
        body = {"model": MODEL_ID, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        reply = client.post("/v1/completions", json=body | {"prompt": PROMPT})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
        assert reply.json()["usage"]["completion_tokens"] == 16
        reply = client.post("/v1/chat/completions", json=body | {"messages": messages})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected_chat
        assert async_engine.engine.stats.drafted > 0
    finally:
        async_engine.shutdown()
