"""The lean Transformer against Hugging Face transformers: logits, hidden states, ragged batches, rollback.

Tiny random-weight models are built locally from transformers configs for every supported layout, saved
as safetensors and loaded back through `load_transformer`, so the loader's renaming/fusing is covered too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from dspark.models.llama import Transformer
from dspark.models.loader import load_transformer

# ---- helpers ------------------------------------------------------------------------------------------


def run_segments(
    model: Transformer,
    tokens: Sequence[int],
    segments: Sequence[int],
    hidden_layers: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Feed `tokens` to one cache slot in consecutive forwards of the given sizes (prefill, decode, verify).

    Returns the logits of every position and the requested hidden states, concatenated over the forwards.
    """
    assert sum(segments) == len(tokens)
    cache = model.new_cache(num_slots=2, max_len=len(tokens) + 8)
    slot = cache.allocate()
    logits, hidden = [], {i: [] for i in hidden_layers}
    start = 0
    for n in segments:
        layout = model.layout([slot], [start], [n])
        out = model(torch.tensor(tokens[start : start + n]), layout, cache, hidden_layers=hidden_layers)
        assert out.logits.shape == (n, model.cfg.vocab_size)
        logits.append(out.logits)
        for i in hidden_layers:
            hidden[i].append(out.hidden[i])
        start += n
        assert cache.lengths[slot] == start
    return torch.cat(logits), {i: torch.cat(h) for i, h in hidden.items()}


def hf_forward(hf_model, tokens: Sequence[int]):
    with torch.inference_mode():
        return hf_model(torch.tensor([list(tokens)]), output_hidden_states=True)


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial values: HF initializes norms to 1 and biases to 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # short, so that the 16-dim heads have frequencies in all three llama3 bands
    "original_max_position_embeddings": 64,
}

TINY_CONFIGS = {
    "llama-gqa-untied": lambda: LlamaConfig(**SMALL, num_hidden_layers=3, tie_word_embeddings=False),
    "llama-gqa-tied": lambda: LlamaConfig(**SMALL, num_hidden_layers=2, tie_word_embeddings=True),
    "llama-mha": lambda: LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, num_hidden_layers=2),
    "llama3-rope": lambda: LlamaConfig(**SMALL, num_hidden_layers=2, rope_scaling=LLAMA3_ROPE),
    "qwen2-bias": lambda: Qwen2Config(**SMALL, num_hidden_layers=3, tie_word_embeddings=False),
    "qwen3-qk-norm": lambda: Qwen3Config(**SMALL, num_hidden_layers=3, head_dim=32, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**SMALL, num_hidden_layers=4, rope_theta=1e6),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    """name -> (HF model, folder with config.json + model.safetensors); built once per module."""
    out = {}
    for i, (name, make_config) in enumerate(TINY_CONFIGS.items()):
        torch.manual_seed(i)
        hf = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32).eval()
        randomize_(hf, seed=100 + i)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder, safe_serialization=True)
        out[name] = (hf, folder)
    return out


# ---- the default model --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [40, 100])  # 100 > 64 new tokens: the SDPA attention path
def test_default_model_logits_match_transformers(default_model, hf_model, prefill: int):
    segments = [prefill, 1, 9]  # prefill, one decode step, a verify block of 1 + 8 drafts
    tokens = random_tokens(sum(segments), default_model.cfg.vocab_size, seed=prefill)
    logits, hidden = run_segments(default_model, tokens, segments, hidden_layers=(0, 14, 28))
    ref = hf_forward(hf_model, tokens)
    ref_logits = ref.logits[0]
    assert ref_logits.abs().max() > 5  # a meaningful scale for the tolerance below
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=0)
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    for i in (0, 14, 28):
        torch.testing.assert_close(hidden[i], ref.hidden_states[i + 1][0], atol=1e-3, rtol=1e-4)


def test_default_model_config(default_model, tokenizer):
    cfg = default_model.cfg
    assert cfg.model_type == "llama"
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings
    assert tokenizer.eos_token_id in cfg.eos_token_ids


# ---- tiny random-weight models of every supported layout --------------------------------------------


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_model_matches_transformers(tiny_models, name: str):
    hf, folder = tiny_models[name]
    model = load_transformer(folder)
    cfg = model.cfg
    hf_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert cfg.model_type == hf_type
    assert cfg.attention_bias == (hf_type == "qwen2")
    assert cfg.qk_norm == (hf_type == "qwen3")
    assert (cfg.rope_scaling is not None) == (name == "llama3-rope")

    L = cfg.num_layers
    for prefill in (40, 70):  # 70 > 64 new tokens: the SDPA attention path
        segments = [prefill, 1, 9]
        tokens = random_tokens(sum(segments), cfg.vocab_size, seed=prefill)
        logits, hidden = run_segments(model, tokens, segments, hidden_layers=range(L))
        ref = hf_forward(hf, tokens)
        assert ref.logits[0].std() > 0.1  # the random model is not degenerate
        torch.testing.assert_close(logits, ref.logits[0], atol=1e-4, rtol=1e-4)
        # hidden[i] is decoder layer i's output = HF hidden_states[i + 1]; HF's last entry is normed.
        assert len(ref.hidden_states) == L + 1
        for i in range(L - 1):
            torch.testing.assert_close(hidden[i], ref.hidden_states[i + 1][0], atol=1e-4, rtol=1e-4)
        last = hidden[L - 1]
        normed = torch.nn.functional.rms_norm(last, (last.shape[-1],), model.norm, cfg.rms_norm_eps)
        torch.testing.assert_close(normed, ref.hidden_states[L][0], atol=1e-4, rtol=1e-4)


def test_transformers_v4_style_config(tiny_models, tmp_path):
    """Older config.json files spell RoPE as top-level rope_theta + rope_scaling (not rope_parameters)."""
    hf, folder = tiny_models["llama3-rope"]
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}  # the legacy key name
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in folder.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    model = load_transformer(tmp_path)
    assert model.cfg.rope_scaling is not None
    tokens = random_tokens(50, 128, seed=5)
    logits, _ = run_segments(model, tokens, [40, 1, 9])
    torch.testing.assert_close(logits, hf_forward(hf, tokens).logits[0], atol=1e-4, rtol=1e-4)


def test_tiny_model_unpacked_weights_match(tiny_models):
    hf, folder = tiny_models["qwen2-bias"]
    packed, plain = load_transformer(folder), load_transformer(folder, pack=False)
    tokens = random_tokens(30, 128, seed=3)
    a, _ = run_segments(packed, tokens, [20, 1, 9])
    b, _ = run_segments(plain, tokens, [20, 1, 9])
    ref = hf_forward(hf, tokens).logits[0]
    torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, ref, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_loaded_both_ways(tiny_models):
    tied = load_transformer(tiny_models["llama-gqa-tied"][1])
    untied = load_transformer(tiny_models["llama-gqa-untied"][1])
    assert torch.equal(tied.lm_head.weight, tied.embed)
    assert not torch.equal(untied.lm_head.weight, untied.embed)


# ---- ragged batches and rollback ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["default", "qwen3-qk-norm"])
def ragged_model(request, tiny_models, default_model) -> Transformer:
    if request.param == "default":
        return default_model
    return load_transformer(tiny_models[request.param][1])


def prefill(model: Transformer, cache, slot: int, tokens: Sequence[int]) -> None:
    if tokens:
        model(torch.tensor(list(tokens)), model.layout([slot], [0], [len(tokens)]), cache)


SHORT_BLOCKS = [(23, 6), (9, 1), (40, 17), (0, 12)]  # a verify block, a decode step, a chunk, a prefill
MIXED = [(23, 6), (9, 1), (10, 50), (0, 12)]  # with a chunk long enough to take the per-request path


@pytest.mark.parametrize("shapes", [SHORT_BLOCKS, MIXED], ids=["short-blocks", "mixed"])
def test_ragged_batch_equals_requests_alone(ragged_model, shapes):
    """(cached length, new tokens) per request: batched logits and cache lengths equal each request's."""
    model = ragged_model
    vocab = model.cfg.vocab_size
    histories = [random_tokens(c + n, vocab, seed=10 + i) for i, (c, n) in enumerate(shapes)]

    alone = []
    for (cached, _), hist in zip(shapes, histories, strict=True):
        cache = model.new_cache(1, 64)
        slot = cache.allocate()
        prefill(model, cache, slot, hist[:cached])
        layout = model.layout([slot], [cached], [len(hist) - cached])
        alone.append(model(torch.tensor(hist[cached:]), layout, cache).logits)

    cache = model.new_cache(6, 64)
    slots = [cache.allocate() for _ in range(6)][1:5]  # not slot 0: slots need not be contiguous from 0
    slots = [slots[2], slots[0], slots[3], slots[1]]  # nor in order
    for slot, (cached, _), hist in zip(slots, shapes, histories, strict=True):
        prefill(model, cache, slot, hist[:cached])
    layout = model.layout(slots, [c for c, _ in shapes], [n for _, n in shapes])
    flat = torch.tensor([t for (c, _), h in zip(shapes, histories, strict=True) for t in h[c:]])
    batched = model(flat, layout, cache).logits
    # The linear kernel depends on the step's row count (block kernel up to quantized.MAX_ROWS, oneDNN past
    # it), and the summation orders differ by ~1e-7 relative per product, compounded over the layers.
    torch.testing.assert_close(batched, torch.cat(alone), atol=5e-4, rtol=1e-4)
    for slot, hist in zip(slots, histories, strict=True):
        assert cache.lengths[slot] == len(hist)

    # logit_rows picks rows of the flattened batch
    cache2 = model.new_cache(6, 64)
    assert sorted(cache2.allocate() for _ in range(6)) == list(range(6))
    for slot, (cached, _), hist in zip(slots, shapes, histories, strict=True):
        prefill(model, cache2, slot, hist[:cached])
    rows = torch.tensor([0, 5, 6, 7, 23, 35])
    picked = model(flat, layout, cache2, logit_rows=rows).logits
    torch.testing.assert_close(picked, batched[rows], atol=1e-4, rtol=1e-4)


def test_rollback_discards_rejected_drafts(ragged_model):
    model = ragged_model
    vocab = model.cfg.vocab_size
    prompt = random_tokens(20, vocab, seed=1)
    continuation = random_tokens(7, vocab, seed=2)
    garbage = random_tokens(6, vocab, seed=3)

    ref_cache = model.new_cache(1, 64)
    prefill(model, ref_cache, ref_cache.allocate(), prompt)
    ref = model(torch.tensor(continuation), model.layout([0], [20], [7]), ref_cache).logits

    cache = model.new_cache(2, 64)
    other = cache.allocate()
    slot = cache.allocate()
    prefill(model, cache, other, random_tokens(11, vocab, seed=4))
    prefill(model, cache, slot, prompt)
    # a verify block: the real next token and 5 wrong drafts, alongside another request's decode step
    layout = model.layout([slot, other], [20, 11], [6, 1])
    model(torch.tensor([continuation[0], *garbage[:5], garbage[5]]), layout, cache)
    assert cache.lengths[slot] == 26
    cache.rollback(slot, 21)  # keep the real token, drop the 5 drafts
    assert cache.lengths[slot] == 21
    out = model(torch.tensor(continuation[1:]), model.layout([slot], [21], [6]), cache).logits
    torch.testing.assert_close(out, ref[1:], atol=1e-4, rtol=1e-4)

    # rolling back everything and starting over also works
    cache.rollback(slot, 0)
    prefill(model, cache, slot, prompt + continuation)
    with pytest.raises(ValueError, match="roll"):
        cache.rollback(slot, 28)


def test_forward_checks_layout(default_model):
    cache = default_model.new_cache(2, 32)
    slot = cache.allocate()
    with pytest.raises(ValueError, match="slot"):  # the slot holds 0 positions, not 5
        default_model(torch.tensor([1, 2]), default_model.layout([slot], [5], [2]), cache)
    with pytest.raises(ValueError, match="cache length"):
        default_model(torch.tensor([1] * 33), default_model.layout([slot], [0], [33]), cache)
    with pytest.raises(ValueError, match="exceeds"):
        default_model.new_cache(1, default_model.cfg.max_position_embeddings + 1)


def test_kv_cache_slots(default_model):
    cache = default_model.new_cache(3, 16)
    assert cache.num_free == 3
    slots = [cache.allocate() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2]
    with pytest.raises(RuntimeError):
        cache.allocate()
    cache.lengths[slots[1]] = 7
    cache.free(slots[1])
    assert cache.num_free == 1
    assert cache.allocate() == slots[1]
    assert cache.lengths[slots[1]] == 0


# ---- loader errors ----------------------------------------------------------------------------------------


def test_loader_rejects_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_transformer(tmp_path)


def test_loader_rejects_missing_safetensors(tiny_models, tmp_path):
    _, folder = tiny_models["llama-gqa-tied"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_transformer(tmp_path)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
    ],
)
def test_loader_rejects_unsupported_configs(tiny_models, tmp_path, patch: dict, message: str):
    _, folder = tiny_models["llama-gqa-tied"]
    hf = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, **patch}))
    for f in folder.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=message):
        load_transformer(tmp_path)


def test_loader_reads_eos_from_generation_config(tiny_models, tmp_path):
    _, folder = tiny_models["llama-gqa-tied"]
    for f in folder.iterdir():
        if f.is_file() and f.name != "generation_config.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_transformer(tmp_path).cfg.eos_token_ids == (2, 7)


@pytest.mark.slow
def test_gguf_file_converts_once_and_matches_default(tmp_path, monkeypatch, default_model):
    """A .gguf path is dequantized into the cache on first use, then loaded like any folder (~25 s)."""
    from dspark.models.default import default_gguf_path
    from dspark.models.loader import resolve_model_dir

    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    folder = resolve_model_dir(default_gguf_path())
    assert folder.is_relative_to(tmp_path) and (folder / "model.safetensors").exists()
    assert resolve_model_dir(default_gguf_path()) == folder  # cached: no second conversion
    model = load_transformer(default_gguf_path())
    torch.testing.assert_close(model.embed, default_model.embed)
