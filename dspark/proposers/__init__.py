"""Draft proposers: the interface, and model-free prompt lookup (draft models live in dspark.drafters)."""

from dspark.proposers.base import Draft, DraftRequest, Proposer, TargetObserver
from dspark.proposers.ngram import NgramProposer

__all__ = ["Draft", "DraftRequest", "NgramProposer", "Proposer", "TargetObserver"]
