"""Assembly: the one place that turns an `EngineConfig` into a running `Engine`.

It sets the process's threads, loads the target and tokenizer (unless given), builds the proposer from
the registry, resolves the draft length (the proposer's own default when the config sets none), builds the
verification policy (measuring or reading the scheduler's cost profile) and allocates the KV cache. Every
command, server, benchmark and test builds engines here; `Engine` itself only receives its parts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

from dspark.drafters.dspark.checkpoint import resolve_drafter_dir
from dspark.drafters.dspark.proposer import DSparkProposer
from dspark.engine import Engine, EngineConfig
from dspark.models.llama import Transformer
from dspark.models.loader import load_tokenizer, load_transformer
from dspark.proposers import HybridProposer, NgramProposer, Proposer, TargetObserver
from dspark.runtime import set_threads
from dspark.scheduling import VerificationPolicy, build_policy
from dspark.scheduling.cost_profile import (
    ProfileMeasurement,
    cached_or_measurement,
    load_or_measure,
    profile_dir,
)

log = logging.getLogger(__name__)

ProposerFactory = Callable[[EngineConfig, Transformer], Proposer]

PROPOSERS: dict[str, ProposerFactory] = {
    "ngram": lambda config, _: NgramProposer(config.ngram.min_n, config.ngram.max_n),
    "dspark": lambda config, model: DSparkProposer.load(resolve_drafter_dir(config.drafter), model),
    "hybrid": lambda config, model: with_lookup(
        config, DSparkProposer.load(resolve_drafter_dir(config.drafter), model)
    ),
}


def with_lookup(config: EngineConfig, model: Proposer) -> HybridProposer:
    """The hybrid around a draft model, in process or remote: prompt lookup first, the model for the rest."""
    return HybridProposer(
        NgramProposer(config.ngram.min_n, config.ngram.max_n), model, config.ngram.hybrid_min_match
    )


def draft_worker_config(config: EngineConfig) -> EngineConfig:
    """What a disaggregated draft worker builds its proposer from. A hybrid's worker hosts only the draft
    model: prompt lookup is free and stays with the engine (`with_lookup`), which gates the model apart."""
    return config.model_copy(update={"proposer": "dspark"}) if config.proposer == "hybrid" else config


def build_proposer(config: EngineConfig, model: Transformer) -> Proposer | None:
    """The configured proposer (None when speculation is off: proposer `none`)."""
    if not config.speculative:
        return None
    return PROPOSERS[config.proposer](config, model)


def with_draft_length(config: EngineConfig, proposer: Proposer | None) -> EngineConfig:
    """The config with its draft length resolved: as set, else the proposer's default (None: no proposer)."""
    if proposer is None:
        return config.model_copy(update={"num_speculative_tokens": None})
    length = config.num_speculative_tokens or proposer.default_num_speculative_tokens
    return config.model_copy(update={"num_speculative_tokens": length})


def build_verification_policy(
    config: EngineConfig, model: Transformer, proposer: Proposer | None, defer_profile: bool = False
) -> tuple[VerificationPolicy | None, ProfileMeasurement | None]:
    """The configured policy. A scheduler's cost profile is read from the cache, else measured now, or, with
    `defer_profile`, returned as a pending measurement (the policy verifies whole drafts until it is done)."""
    if proposer is None:
        return None, None
    if config.verification.policy != "scheduler":
        return build_policy(config.verification, None), None
    assert config.num_speculative_tokens is not None  # resolved by with_draft_length
    directory = profile_dir() if config.verification.profile_cache else None
    args = (model, proposer, config.max_batch_size, config.num_speculative_tokens, directory)
    if not defer_profile:
        return build_policy(config.verification, load_or_measure(*args)), None
    found = cached_or_measurement(*args)
    if isinstance(found, ProfileMeasurement):
        log.info("no cost profile of this machine yet: verifying whole drafts until it is measured "
                 "(%d timed runs, in idle time)", found.total_runs)  # fmt: skip
        return build_policy(config.verification, None, profile_pending=True), found
    return build_policy(config.verification, found), None


def build_engine(
    config: EngineConfig,
    *,
    model: Transformer | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    proposer: Proposer | None = None,
    observers: Sequence[TargetObserver] = (),
    defer_profile: bool = False,
) -> Engine:
    """An engine for `config`; pass a loaded model / tokenizer to share them between engines, or a proposer
    object (a remote drafter, a test oracle) instead of the configured one. With `defer_profile`, a missing
    cost profile is measured later, in the engine's idle time (`Engine.advance_profile`), so that a first
    start answers at once."""
    set_threads(config.num_threads)
    model = model if model is not None else load_transformer(config.model, pack=config.pack_weights)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    proposer = proposer if proposer is not None else build_proposer(config, model)
    config = with_draft_length(config, proposer)
    policy, measurement = build_verification_policy(config, model, proposer, defer_profile)
    cache = model.new_cache(config.max_batch_size, config.max_model_len)
    return Engine(config, model, tokenizer, cache, proposer, policy, observers, measurement)
