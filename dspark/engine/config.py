"""Engine configuration (pydantic: validated when read from YAML or built in code)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dspark.scheduling.policies import VerificationConfig

ProposerName = Literal["none", "ngram", "dspark"]

# The DSpark drafter shipped for the default target (SmolLM2-135M-Instruct).
SHIPPED_DRAFTER = (
    Path(__file__).resolve().parents[1] / "drafters" / "dspark" / "checkpoints" / "smollm2-135m-instruct"
)


def resolve_drafter_dir(drafter: str) -> Path:
    path = SHIPPED_DRAFTER if drafter == "default" else Path(drafter)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no DSpark drafter checkpoint at {path}")
    return path


class NgramConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_n: int = Field(1, ge=1)
    max_n: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> NgramConfig:
        if self.min_n > self.max_n:
            raise ValueError(f"ngram.min_n ({self.min_n}) must be <= ngram.max_n ({self.max_n})")
        return self


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "default"  # 'default', a Hugging Face folder (safetensors) or a .gguf file
    max_batch_size: int = Field(8, ge=1, description="KV-cache slots = concurrently running requests")
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per request")
    max_tokens_per_step: int = Field(512, ge=16, description="token budget of one forward (chunks prefill)")
    proposer: ProposerName = "ngram"
    num_speculative_tokens: int = Field(
        4, ge=0, le=64, description="draft length gamma (the most a policy may verify); 0 = plain decoding"
    )
    ngram: NgramConfig = NgramConfig()
    verification: VerificationConfig = VerificationConfig()
    drafter: str = Field(
        "default", description="DSpark drafter checkpoint folder ('default': the shipped one)"
    )
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: leave as is)")
    pack_weights: bool = Field(True, description="oneDNN-packed linear weights on CPU")

    @property
    def speculative(self) -> bool:
        return (
            self.proposer != "none" and self.num_speculative_tokens > 0 and self.verification.policy != "none"
        )
