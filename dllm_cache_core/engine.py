"""Engine: tokenizer + model + policy; text (or chat messages) in, text + stats out.

Bad rows never raise: they come back with `error` and `error_type` set, so a batch job can write
them out and go on. Only a whole-batch failure (e.g. CUDA OOM) propagates, for the caller to split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from .config import CacheConfig, GenerationConfig
from .decoding.generate import DecodeLoop
from .models.fingerprint import model_fingerprint
from .models.loading import load_model, stop_ids_from_tokenizer
from .stats import SampleStats

__all__ = ["Engine", "TextOutput", "model_fingerprint", "stop_ids_from_tokenizer"]

PROMPT_BUCKET = 64
"""Prompt widths of the engine's kept decode loop are multiples of this (see Engine.loop)."""


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
        self._loop: Optional[tuple[tuple[int, int], DecodeLoop]] = None

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

    def _encode_checked(self, prompt: Any, chat_template: bool) -> list[int]:
        t = self.encode(prompt, chat_template)
        if not t:
            raise _RowError("empty_prompt", "prompt has no tokens")
        limit = self.model.config.max_len - self.generation.gen_length
        if len(t) > limit:
            raise _RowError("too_long", f"prompt has {len(t)} tokens; at most {limit} fit with "
                                        f"gen_length {self.generation.gen_length}")
        return t

    def _text(self, r) -> TextOutput:
        text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        return TextOutput(text=text, token_ids=r.token_ids, stats=r.stats)

    def generate(self, prompts: Sequence[Any], row_ids: Optional[Sequence] = None,
                 chat_template: bool = False) -> list[TextOutput]:
        """Plain-text prompts go in raw (no template, as vLLM's LLM.generate) unless chat_template;
        a prompt that is a list of messages gets the chat template."""
        outs = [TextOutput() for _ in prompts]
        ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        good, good_ids, where = [], [], []
        for i, p in enumerate(prompts):
            try:
                t = self._encode_checked(p, chat_template)
            except _RowError as e:
                outs[i] = TextOutput(error=str(e), error_type=e.kind)
                continue
            good.append(t)
            good_ids.append(ids[i])
            where.append(i)
        if good:
            loop = self.loop(self.generation.slots or len(good), max(len(t) for t in good))
            for j, _, r in loop.run((j, rid, t) for j, (rid, t) in enumerate(zip(good_ids, good))):
                outs[where[j]] = self._text(r)
        return outs

    def loop(self, slots: int, prompt_len: int) -> DecodeLoop:
        """The engine's decode loop for `slots` rows and prompts up to `prompt_len` tokens, kept for the
        engine's lifetime: its buffers and static steps (CUDA graphs on GPUs) serve every later call
        that fits it (as many slots or more, a prompt width from prompt_len up to twice it; a wider
        canvas changes no token). Widths are multiples of PROMPT_BUCKET; one loop is kept at a time
        (a call that does not fit frees it before building its own)."""
        limit = self.model.config.max_len - self.generation.gen_length
        width = min(limit, -(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET)
        if self._loop is not None:
            (k_slots, k_width), kept = self._loop
            if k_slots >= slots and width <= k_width <= max(2 * width, width + PROMPT_BUCKET):
                return kept
            kept.close()
            self._loop = None  # free the old buffers before the new ones are allocated
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        loop = DecodeLoop(self.model, self.generation, self.cache, self.seed, slots, width, padded=True, keep=True)
        self._loop = ((slots, width), loop)
        return loop

    def stream(self, rows: Iterable[tuple[Any, Any]], chat_template: bool = False, slots: Optional[int] = None,
               prompt_len: Optional[int] = None) -> Iterator[tuple[Any, TextOutput]]:
        """(row_id, prompt) in, (row_id, output) out as rows finish (continuous batching by default):
        rows are read only as slots free up; a bad row comes back at once with its error set.
        slots: rows decoded at once (default generation.slots, else 32). prompt_len: the widest prompt
        the canvas holds (default: the model's max length minus gen_length; every row pays for the
        canvas width, so set it); a longer prompt is a too_long row. One stream (or generate call)
        at a time per engine: they share the engine's kept decode loop."""
        limit = self.model.config.max_len - self.generation.gen_length
        width = min(limit, prompt_len or limit)
        bad: list[tuple[Any, TextOutput]] = []

        def good_rows():
            for rid, p in rows:
                try:
                    t = self._encode_checked(p, chat_template)
                    if len(t) > width:
                        raise _RowError("too_long", f"prompt has {len(t)} tokens; this stream's canvas holds {width}")
                except _RowError as e:
                    bad.append((rid, TextOutput(error=str(e), error_type=e.kind)))
                    continue
                yield rid, t

        loop = self.loop(slots or self.generation.slots or 32, width)
        for _, rid, r in loop.run((j, rid, t) for j, (rid, t) in enumerate(good_rows())):
            while bad:
                yield bad.pop(0)
            yield rid, self._text(r)
        while bad:
            yield bad.pop(0)


class _RowError(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind

