from .base import DiffusionLM
from .config import ModelConfig
from .dream import DreamModel
from .llada import LLaDAModelLM
from .loading import load_model

__all__ = ["DiffusionLM", "ModelConfig", "DreamModel", "LLaDAModelLM", "load_model"]
