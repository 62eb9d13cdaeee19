from .base import CachePolicy, DecodeContext, StepInfo
from .registry import policy_class, policy_names, register

__all__ = ["CachePolicy", "DecodeContext", "StepInfo", "policy_class", "policy_names", "register"]
