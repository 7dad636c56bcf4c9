"""Load a target model and its tokenizer from a local Hugging Face folder, a GGUF file or the default."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from dspark.models.config import ModelConfig
from dspark.models.default import convert_gguf, default_model_dir
from dspark.models.llama import Transformer
from dspark.runtime import cache_root

DEFAULT_SOURCE = "default"


def resolve_model_dir(source: str | Path = DEFAULT_SOURCE) -> Path:
    """A safetensors folder for `source`: 'default', a model folder, or a .gguf file (converted once)."""
    if str(source) == DEFAULT_SOURCE:
        return default_model_dir()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        out_dir = cache_root() / "models" / f"{path.stem}-{key}"
        return out_dir if (out_dir / "config.json").exists() else convert_gguf(path, out_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a folder with config.json")
    return path


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no .safetensors weights in {model_dir} (pickled checkpoints are not loaded)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


def _hf_to_lean(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Hugging Face tensors and fuse q/k/v and gate/up into single matmuls."""
    out = {"embed": hf["model.embed_tokens.weight"], "norm": hf["model.norm.weight"]}
    out["lm_head.weight"] = (
        hf["model.embed_tokens.weight"] if cfg.tie_word_embeddings else hf["lm_head.weight"]
    )
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        attn = p + "self_attn."
        out[q + "attn_norm"] = hf[p + "input_layernorm.weight"]
        out[q + "mlp_norm"] = hf[p + "post_attention_layernorm.weight"]
        out[q + "attn.wqkv.weight"] = torch.cat([hf[f"{attn}{n}_proj.weight"] for n in "qkv"])
        if cfg.attention_bias:
            out[q + "attn.wqkv.bias"] = torch.cat([hf[f"{attn}{n}_proj.bias"] for n in "qkv"])
        out[q + "attn.wo.weight"] = hf[attn + "o_proj.weight"]
        if cfg.qk_norm:
            out[q + "attn.q_norm"] = hf[attn + "q_norm.weight"]
            out[q + "attn.k_norm"] = hf[attn + "k_norm.weight"]
        mlp = p + "mlp."
        out[q + "mlp.w_gate_up.weight"] = torch.cat(
            [hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]]
        )
        out[q + "mlp.w_down.weight"] = hf[mlp + "down_proj.weight"]
    return out


def load_transformer(
    source: str | Path = DEFAULT_SOURCE, dtype: torch.dtype = torch.float32, pack: bool = True
) -> Transformer:
    model_dir = resolve_model_dir(source)
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: v.to(dtype) for k, v in _hf_to_lean(_read_safetensors(model_dir), cfg).items()}
    model.load_state_dict(state, strict=True, assign=True)
    # Buffers were created on the meta device; rebuild them for real.
    model.rope_cos, model.rope_sin = (t.to(dtype) for t in Transformer.rope_buffers(cfg))
    model.eval()
    if pack:
        model.pack_weights()
    return model


def load_tokenizer(source: str | Path = DEFAULT_SOURCE):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(source))
