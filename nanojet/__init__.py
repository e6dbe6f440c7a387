"""nanojet: a minimal Qwen3 inference runtime with JetFlow parallel tree speculative decoding."""
from .engine import SpeculativeParams
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "SpeculativeParams"]
