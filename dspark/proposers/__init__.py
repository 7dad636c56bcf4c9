"""Draft proposers: model-free prompt lookup, and (later) draft models."""

from dspark.proposers.base import Draft, DraftRequest, Proposer, TargetObserver, observed_layers
from dspark.proposers.ngram import NgramProposer

__all__ = ["Draft", "DraftRequest", "NgramProposer", "Proposer", "TargetObserver", "observed_layers"]
