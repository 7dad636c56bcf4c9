"""Engine configuration (pydantic: validated when read from YAML or built in code)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dspark.scheduling.policies import VerificationConfig

ProposerName = Literal["none", "ngram", "dspark", "hybrid"]


class NgramConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_n: int = Field(1, ge=1, description="shortest suffix n-gram looked up")
    max_n: int = Field(4, ge=1, description="longest suffix n-gram looked up (tried first)")
    hybrid_min_match: int = Field(
        2, ge=1, description="proposer hybrid: a request whose suffix matched this many tokens keeps its "
        "n-gram draft and skips the drafter",
    )  # fmt: skip

    @model_validator(mode="after")
    def _ordered(self) -> NgramConfig:
        if self.min_n > self.max_n:
            raise ValueError(f"ngram.min_n ({self.min_n}) must be <= ngram.max_n ({self.max_n})")
        return self


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "default", description="'default' (the embedded SmolLM2), a Hugging Face folder or a .gguf"
    )
    max_batch_size: int = Field(8, ge=1, description="KV-cache slots = concurrently running requests")
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per request")
    max_tokens_per_step: int = Field(512, ge=16, description="token budget of one forward (chunks prefill)")
    proposer: ProposerName = Field(
        "ngram", description="draft proposer ('hybrid': n-gram, else the DSpark drafter); 'none' switches "
        "speculation off",
    )  # fmt: skip
    num_speculative_tokens: int | None = Field(
        None, ge=1, le=64,
        description="draft length gamma, the most a policy may verify (default: the proposer's own: the "
        "drafter's block size, 4 for ngram)",
    )  # fmt: skip
    ngram: NgramConfig = NgramConfig()
    verification: VerificationConfig = VerificationConfig()
    drafter: str = Field(
        "default", description="DSpark drafter checkpoint folder ('default': the shipped one)"
    )
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: leave as is)")
    pack_weights: bool = Field(True, description="oneDNN-packed linear weights on CPU")
    prefix_cache_mib: int = Field(
        1024, ge=0,
        description="MiB of prompt-prefix KV kept for reuse by later prompts (0: off; 1 GiB holds "
        "~22k positions of the default model; unused with a drafter that reads the target's hidden states)",
    )  # fmt: skip

    @property
    def speculative(self) -> bool:
        return self.proposer != "none"
