"""Engine: tokenizer + model + policy; text (or chat messages) in, text + stats out.

Bad rows never raise: they come back with `error` and `error_type` set, so a batch job can write
them out and go on. Only a whole-batch failure (e.g. CUDA OOM) propagates, for the caller to split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


from .config import CacheConfig, GenerationConfig
from .decoding.generate import generate
from .models.fingerprint import model_fingerprint
from .models.loading import load_model, stop_ids_from_tokenizer
from .stats import SampleStats

__all__ = ["Engine", "TextOutput", "model_fingerprint", "stop_ids_from_tokenizer"]


@dataclass
class TextOutput:
    text: Optional[str] = None
    token_ids: list[int] = field(default_factory=list)
    stats: Optional[SampleStats] = None
    """None for a row that failed before generation (see error / error_type)."""
    error: Optional[str] = None
    error_type: Optional[str] = None


class Engine:
    """A model, its tokenizer and the generation and cache settings: text in, text and stats out."""

    def __init__(self, model, tokenizer, generation: GenerationConfig, cache: CacheConfig, seed: int = 0,
                 model_path: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.generation, self.cache, self.seed = generation, cache, seed
        self.model_path = model_path

    @classmethod
    def from_spec(cls, model_path: str, generation: GenerationConfig | None = None, cache: CacheConfig | None = None,
                  device: str = "cpu", dtype: str = "float32", family: str = "auto", seed: int = 0) -> "Engine":
        model, tok = load_model(model_path, device=device, dtype=dtype, family=family)
        return cls(model, tok, generation or GenerationConfig(), cache or CacheConfig(), seed, str(model_path))

    def with_cache(self, cache: CacheConfig | str) -> "Engine":
        """The same weights and tokenizer under another cache policy (e.g. the audit's `none`)."""
        cache = CacheConfig(policy=cache) if isinstance(cache, str) else cache
        return Engine(self.model, self.tokenizer, self.generation, cache, self.seed, self.model_path)

    def model_fingerprint(self) -> str:
        return model_fingerprint(self.model_path)

    # -- tokenisation ---------------------------------------------------------------------------
    def encode(self, prompt: Any, chat_template: bool = False) -> list[int]:
        """Token ids of one prompt; ValueError/TypeError with an error_type prefix on bad input."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not prompt.strip():
                raise _RowError("empty_prompt", "empty prompt")
            if chat_template:
                prompt = [{"role": "user", "content": prompt}]
            else:
                try:
                    return list(tok(prompt)["input_ids"])
                except Exception as e:  # noqa: BLE001  (any tokenizer failure is this row's error)
                    raise _RowError("tokenizer", f"tokenizer failed: {e}") from e
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise _RowError("bad_input", "chat messages need string 'role' and 'content'")
            if not any(m["content"].strip() for m in prompt):
                raise _RowError("empty_prompt", "empty prompt")
            try:
                text = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
                return list(tok(text, add_special_tokens=False)["input_ids"])
            except Exception as e:  # noqa: BLE001
                raise _RowError("tokenizer", f"chat template / tokenizer failed: {e}") from e
        if prompt is None or (isinstance(prompt, (list, tuple)) and not prompt):
            raise _RowError("empty_prompt", "empty prompt")
        raise _RowError("bad_input", f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")

    # -- generation -----------------------------------------------------------------------------
    def chat(self, conversations: Sequence[Sequence[dict]], row_ids: Optional[Sequence] = None) -> list[TextOutput]:
        """One reply per conversation (a list of {"role", "content"} messages), each through the
        tokenizer's chat template (vLLM's LLM.chat)."""
        for i, c in enumerate(conversations):
            if isinstance(c, (str, dict)):
                raise TypeError(f"conversations[{i}] is a {type(c).__name__}; a conversation is a list of "
                                "{'role', 'content'} messages (plain text goes to Engine.generate)")
        return self.generate([list(c) for c in conversations], row_ids=row_ids)

    def generate(self, prompts: Sequence[Any], row_ids: Optional[Sequence] = None,
                 chat_template: bool = False) -> list[TextOutput]:
        """Plain-text prompts go in raw (no template, as vLLM's LLM.generate) unless chat_template;
        a prompt that is a list of messages gets the chat template."""
        outs = [TextOutput() for _ in prompts]
        ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        good, good_ids, where = [], [], []
        limit = self.model.config.max_len - self.generation.gen_length
        for i, p in enumerate(prompts):
            try:
                t = self.encode(p, chat_template)
                if not t:
                    raise _RowError("empty_prompt", "prompt has no tokens")
                if len(t) > limit:
                    raise _RowError("too_long", f"prompt has {len(t)} tokens; at most {limit} fit with "
                                                f"gen_length {self.generation.gen_length}")
            except _RowError as e:
                outs[i] = TextOutput(error=str(e), error_type=e.kind)
                continue
            good.append(t)
            good_ids.append(ids[i])
            where.append(i)
        if good:
            res = generate(self.model, good, self.generation, self.cache, seed=self.seed, row_ids=good_ids)
            for i, r in zip(where, res):
                text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
                outs[i] = TextOutput(text=text, token_ids=r.token_ids, stats=r.stats)
        return outs


class _RowError(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind

