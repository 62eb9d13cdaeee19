"""dllm_cache_core: native LLaDA / Dream models, batched diffusion decoding and cache policies."""
from .config import CacheConfig, GenerationConfig
from .models.loading import load_model
from .stats import SampleStats, token_agreement

__all__ = ["CacheConfig", "GenerationConfig", "load_model", "SampleStats", "token_agreement",
           "generate", "stream", "GenerationOutput", "Engine", "TextOutput"]


def __getattr__(name):  # the decoding loop and engine import lazily (they are the heavy part)
    if name in ("generate", "stream", "GenerationOutput"):
        from .decoding import generate as g
        return getattr(g, name)
    if name in ("Engine", "TextOutput"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
