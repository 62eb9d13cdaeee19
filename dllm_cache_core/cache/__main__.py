"""`python -m dllm_cache_core.cache`: the README's policy table and parameter list, from the declarations."""
from .registry import markdown

print(markdown())
