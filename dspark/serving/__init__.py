"""Serving front ends: the async engine, the dspark.v1 gRPC service and OpenAI-compatible HTTP."""
