"""Drafter checkpoints: `config.json` + `model.safetensors` (+ `calibration.json` once calibrated).

Only the drafter's own weights and its draft vocabulary are stored; the shared embedding and LM head are
taken from the target at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark.drafters.dspark.calibration import Calibration
from dspark.drafters.dspark.model import DrafterConfig, DSparkDrafter
from dspark.models.llama import Transformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CALIBRATION = "calibration.json"
# The drafter shipped for the default target (SmolLM2-135M-Instruct); `drafter: default` names it.
SHIPPED_DRAFTER = Path(__file__).resolve().parent / "checkpoints" / "smollm2-135m-instruct"


def resolve_drafter_dir(drafter: str) -> Path:
    """A drafter folder from a config value ('default': the shipped checkpoint)."""
    path = SHIPPED_DRAFTER if drafter == "default" else Path(drafter)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"no DSpark drafter checkpoint at {path}")
    return path


def save_drafter(
    drafter: DSparkDrafter,
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    calibration: Calibration | None = None,
) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.detach().to(dtype) if t.is_floating_point() else t.detach()).contiguous().cpu()
        for name, t in drafter.state_dict().items()
    }
    save_file(tensors, str(out / WEIGHTS))
    (out / CONFIG).write_text(drafter.cfg.model_dump_json(indent=2) + "\n")
    if calibration is not None:
        (out / CALIBRATION).write_text(calibration.model_dump_json(indent=2) + "\n")
    return out


def load_drafter(directory: str | Path, target: Transformer | None = None) -> DSparkDrafter:
    """Load a drafter (fp32) and, given the target, attach its embedding and LM head."""
    path = Path(directory)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a DSpark drafter checkpoint (no {CONFIG})")
    cfg = DrafterConfig.model_validate_json((path / CONFIG).read_text())
    drafter = DSparkDrafter(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path / WEIGHTS).items()}
    drafter.load_state_dict(state)
    if target is not None:
        drafter.attach_target(target.embed, target.lm_head.weight)
    return drafter


def load_calibration(directory: str | Path) -> Calibration | None:
    path = Path(directory) / CALIBRATION
    return Calibration.model_validate(json.loads(path.read_text())) if path.exists() else None
