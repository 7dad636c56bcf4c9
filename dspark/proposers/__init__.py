"""Draft proposers: the interface, model-free prompt lookup, and lookup before a draft model (hybrid).

Draft models live in dspark.drafters."""

from dspark.proposers.base import Draft, DraftRequest, Proposer, TargetObserver
from dspark.proposers.hybrid import HybridProposer
from dspark.proposers.ngram import NgramProposer

__all__ = ["Draft", "DraftRequest", "HybridProposer", "NgramProposer", "Proposer", "TargetObserver"]
