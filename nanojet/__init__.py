"""nanojet: a minimal Qwen3 inference runtime with JetFlow parallel tree speculative decoding."""
__all__ = ["LLM", "SamplingParams", "SpeculativeParams"]


def __getattr__(name: str):
    # Lazy, so that light modules (nanojet.cli for a CLI's --help) do not pull in torch.
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "SamplingParams":
        from .sampling import SamplingParams
        return SamplingParams
    if name == "SpeculativeParams":
        from .engine import SpeculativeParams
        return SpeculativeParams
    raise AttributeError(f"module 'nanojet' has no attribute {name!r}")
