"""Draft verification: greedy matching and lossless speculative (rejection) sampling."""

from dspark.verify.rejection import VerifyResult, verify

__all__ = ["VerifyResult", "verify"]
