"""Drafter folders in the standard DSpark format (DeepSpec's, which vLLM 0.32 serves).

A folder is `config.json` (a Qwen3 config with the DSpark fields, `DrafterConfig.to_hf`) and
`model.safetensors` with the standard tensor names. This project writes two flavours of it:

- `dspark` (its own, the shipped drafter): the standard folder without `lm_head.weight` when those rows
  are the target's own (the reduced head is a frozen slice of the target's, rebuilt from `d2t` at load:
  9.4 MB saved on the SmolLM2 drafter), plus `calibration.json`, the per-position STS scalings this
  project applies to the confidences.
- `vllm`: exactly what vLLM loads: the reduced `lm_head` written out, and no side file (vLLM has no slot
  for per-position calibration; a single affine correction can be folded into `confidence_head.proj`).

Loading accepts either, and DeepSeek's released drafters as they are: `embed_tokens` and `lm_head` are
optional (shared from the target when absent), `mask_embedding` and `t2d` are ignored as vLLM ignores them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from dspark.drafters.dspark.calibration import Calibration, PositionScaling
from dspark.drafters.dspark.model import DrafterConfig, DrafterConfigError, DSparkDrafter
from dspark.models.llama import Transformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CALIBRATION = "calibration.json"
IGNORED_TENSORS = ("mask_embedding", "t2d")  # vLLM drops them too: the mask is a vocabulary row
OPTIONAL_TENSORS = ("embed_tokens.weight", "lm_head.weight")
# The drafter shipped for the default target (SmolLM2-135M-Instruct); `drafter: default` names it.
SHIPPED_DRAFTER = Path(__file__).resolve().parent / "checkpoints" / "smollm2-135m-instruct"

ExportFormat = Literal["dspark", "vllm"]


def resolve_drafter_dir(drafter: str) -> Path:
    """A drafter folder from a config value ('default': the shipped checkpoint)."""
    path = SHIPPED_DRAFTER if drafter == "default" else Path(drafter)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"no DSpark drafter checkpoint at {path} (no {CONFIG})")
    return path


def read_config(directory: str | Path) -> DrafterConfig:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path.parent} is not a DSpark drafter checkpoint (no {CONFIG})")
    return DrafterConfig.from_hf(json.loads(path.read_text()))


def save_drafter(
    drafter: DSparkDrafter,
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    calibration: Calibration | None = None,
    fmt: ExportFormat = "dspark",
    fold: PositionScaling | None = None,
) -> Path:
    """Write `drafter` as a `fmt` folder; `fold`: an affine confidence correction folded into the head."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = standard_tensors(drafter, with_lm_head=fmt == "vllm" or not drafter.lm_head_from_target)
    if fold is not None and drafter.confidence_head is not None:
        # sigmoid(l / T + b) with l = w.x + c  ==  sigmoid((w / T).x + (c / T + b))
        weight, bias = "confidence_head.proj.weight", "confidence_head.proj.bias"
        tensors[weight] = tensors[weight] / fold.temperature
        tensors[bias] = tensors[bias] / fold.temperature + fold.offset
    cast = {
        name: t.to(dtype) if t.is_floating_point() and "confidence_head" not in name else t
        for name, t in tensors.items()
    }  # fmt: skip  (vLLM keeps the confidence head in fp32)
    save_file({k: v.contiguous() for k, v in cast.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    torch_dtype = str(dtype).removeprefix("torch.")
    (out / CONFIG).write_text(json.dumps(drafter.cfg.to_hf(torch_dtype), indent=2) + "\n")
    stale = out / CALIBRATION
    if fmt == "dspark" and calibration is not None:
        stale.write_text(calibration.model_dump_json(indent=2) + "\n")
    elif stale.exists():
        stale.unlink()
    return out


def standard_tensors(drafter: DSparkDrafter, with_lm_head: bool) -> dict[str, torch.Tensor]:
    """The drafter's tensors under their standard names (fp32 copies on the CPU)."""
    state = {name: t.detach().cpu().clone() for name, t in drafter.state_dict().items()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if not with_lm_head:
        state.pop("lm_head.weight")
    return state


def load_drafter(directory: str | Path, target: Transformer | None = None) -> DSparkDrafter:
    """Load a standard drafter folder (fp32); given the target, check that it fits and share its
    embedding and LM head. Errors name the config field or tensor at fault."""
    path = Path(directory)
    cfg = read_config(path)
    drafter = DSparkDrafter(cfg)
    tensors = _checked_tensors(load_file(path / WEIGHTS), drafter)
    if target is not None:
        shares = not {"embed_tokens.weight", "lm_head.weight"} <= tensors.keys()  # needs the target's width
        cfg.check_fits(target.cfg, shares_target_tensors=shares)
    own_embedding = tensors.pop("embed_tokens.weight", None)
    drafter.lm_head_from_target = "lm_head.weight" not in tensors
    if drafter.lm_head_from_target:
        tensors["lm_head.weight"] = drafter.lm_head.weight.detach()
    drafter.load_state_dict(tensors)
    if target is not None:
        drafter.attach_target(target.embed if own_embedding is None else own_embedding,
                              target.lm_head.weight)  # fmt: skip
    elif cfg.reduced_vocab:
        drafter._index_draft_vocab()
    return drafter


def _checked_tensors(tensors: dict[str, torch.Tensor], drafter: DSparkDrafter) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (fp32) after checking names and shapes against the config."""
    expected = {name: tuple(t.shape) for name, t in drafter.state_dict().items()}
    expected["embed_tokens.weight"] = (drafter.cfg.vocab_size, drafter.cfg.hidden_size)
    kept = {k: v for k, v in tensors.items() if not any(k.startswith(i) for i in IGNORED_TENSORS)}
    unknown = sorted(set(kept) - set(expected))
    if unknown:
        raise DrafterConfigError(unknown[0], f"unexpected tensor in {WEIGHTS} (unknown: {unknown[:5]})")
    missing = sorted(set(expected) - set(kept) - set(OPTIONAL_TENSORS))
    if missing:
        raise DrafterConfigError(missing[0], f"missing from {WEIGHTS} (missing: {missing[:5]})")
    for name, tensor in kept.items():
        if tuple(tensor.shape) != expected[name]:
            raise DrafterConfigError(name, f"shape {tuple(tensor.shape)} does not match the config's "
                                     f"{expected[name]}")  # fmt: skip
    if drafter.cfg.reduced_vocab:
        target_ids = torch.arange(drafter.cfg.draft_vocab) + kept["d2t"]
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= drafter.cfg.vocab_size:
            raise DrafterConfigError("d2t", "maps draft ids outside the target vocabulary")
    return {k: v.float() if v.is_floating_point() else v.long() for k, v in kept.items()}


def export_drafter(
    source: str | Path,
    output: str | Path,
    target: Transformer,
    fmt: ExportFormat = "vllm",
    dtype: torch.dtype = torch.float32,
    fold_calibration: Literal["greedy", "sampled", "none"] = "greedy",
) -> Path:
    """Rewrite a drafter folder as `fmt`. For vLLM, the calibration's one shared scaling (fitted with the
    per-position ones) is folded into the confidence head, since vLLM reads the confidences raw."""
    drafter = load_drafter(source, target)
    calibration = load_calibration(source)
    fold = None
    if fmt == "vllm" and calibration is not None and fold_calibration != "none":
        fold = calibration.greedy_shared if fold_calibration == "greedy" else calibration.sampled_shared
    return save_drafter(drafter, output, dtype, calibration, fmt, fold)


def load_calibration(directory: str | Path) -> Calibration | None:
    path = Path(directory) / CALIBRATION
    return Calibration.model_validate(json.loads(path.read_text())) if path.exists() else None
