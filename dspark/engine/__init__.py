"""The serving engine: continuous batching with speculative decoding."""

from dspark.engine.config import EngineConfig
from dspark.engine.engine import Completion, Engine
from dspark.engine.request import RequestOutput, ResumeState

__all__ = ["Completion", "Engine", "EngineConfig", "RequestOutput", "ResumeState"]
