"""Draft proposers: model-free prompt lookup, and (later) draft models."""

from dspark.proposers.base import Draft, DraftRequest, Proposer
from dspark.proposers.ngram import NgramProposer

__all__ = ["Draft", "DraftRequest", "NgramProposer", "Proposer"]
