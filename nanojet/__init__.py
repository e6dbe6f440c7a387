"""nanojet: a minimal Qwen3 inference runtime with JetFlow parallel tree speculative decoding."""
__all__ = ["LLM", "SamplingParams", "SpeculativeParams"]


def __getattr__(name: str):
    # Lazy, so that light modules (nanojet.tools.cli for a CLI's --help) do not pull in torch.
    if name == "LLM":
        from nanojet.llm import LLM
        return LLM
    if name == "SamplingParams":
        from nanojet.engine.sampling import SamplingParams
        return SamplingParams
    if name == "SpeculativeParams":
        from nanojet.engine.request import SpeculativeParams
        return SpeculativeParams
    raise AttributeError(f"module 'nanojet' has no attribute {name!r}")
