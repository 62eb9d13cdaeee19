"""The two public configs. Frozen dataclasses; every invalid value is a ValueError naming the field.

Allowed remasking values come from the decoding profiles, schedules from the schedule table and cache
policies and their parameters from the policy modules' declarations.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from .cache.registry import param_names, policy_decl
from .decoding.schedule import SCHEDULES as _SCHEDULE_TABLE
from .models.profile import PROFILES, DecodingProfile

REMASKING = tuple(dict.fromkeys(r for p in PROFILES.values() for r in p.remasking))
SCHEDULES = ("auto", *_SCHEDULE_TABLE)
SCHEDULING = ("continuous", "static")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")


@dataclass(frozen=True)
class GenerationConfig:
    gen_length: int = 128
    """Tokens to generate (the canvas)."""
    steps: Optional[int] = None
    """Total denoising steps over all blocks (None = gen_length); must divide by the number of blocks."""
    block_length: Optional[int] = None
    """Semi-AR block size (None = gen_length); gen_length must divide by it."""
    remasking: Optional[str] = None
    """Which masked positions to commit; None = the decoding profile's default (its allowed values)."""
    alg_temp: float = 0.0
    """Sample the positions to commit from softmax(confidence / alg_temp) instead of top-k (0 = top-k; Dream's option)."""
    schedule: str = "auto"
    """Per-step commit counts: auto (the decoding profile's), llada (even split, remainder first) or
    dream (timestep linspace)."""
    eps: float = 1e-3
    """Dream timestep floor."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_p: Optional[float] = None
    """Nucleus filter for sampling (Dream semantics); None = off."""
    top_k: Optional[int] = None
    """Top-k filter for sampling; None = off."""
    threshold: Optional[float] = None
    """Parallel decoding: commit every masked block token with confidence >= threshold (at least one)."""
    certainty_prior_sigma: Optional[float] = None
    """d2Cache certainty-prior decoding: score = confidence x certainty density (Gaussian sigma); None = off."""
    cfg_scale: float = 0.0
    """Classifier-free guidance (LLaDA semantics: un + (w + 1)(cond - un))."""
    logits_eos_inf: bool = False
    """LLaDA option: EOS logit = -inf before choosing tokens."""
    confidence_eos_eot_inf: bool = False
    """LLaDA option: EOS/EoT get -inf confidence after tokens are chosen (reference semantics)."""
    stop_token_ids: Optional[tuple[int, ...]] = None
    """Tokens that end an output; None = EOS plus the chat template's end-of-turn token."""
    stop_at_eos: bool = True
    """Cut outputs at the first stop token and skip blocks once every row has stopped."""
    mask_id: Optional[int] = None
    """Mask token id; None = from the model config."""
    scheduling: str = "continuous"
    """continuous: every row advances its own block and a finished row's slot is refilled at once;
    static: the batch waits for its slowest row at every block (kept for side-by-side measurement).
    Tokens and stats are the same either way."""
    slots: Optional[int] = None
    """Rows decoded at once; None = every row of the call (a streaming caller sets its own)."""

    def __post_init__(self) -> None:
        g = self.gen_length
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
            raise _bad("gen_length", g, "a positive integer")
        if self.block_length is not None and (not isinstance(self.block_length, int) or self.block_length <= 0):
            raise _bad("block_length", self.block_length, "a positive integer or None")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps <= 0):
            raise _bad("steps", self.steps, "a positive integer or None")
        if g % self.block_len:
            raise ValueError(f"gen_length={g} must be a multiple of block_length={self.block_len}")
        if self.total_steps % self.num_blocks:
            raise ValueError(f"steps={self.total_steps} must divide by the number of blocks "
                             f"({self.num_blocks} = gen_length / block_length)")
        if self.remasking is not None and self.remasking not in REMASKING:
            raise _bad("remasking", self.remasking, ", ".join(REMASKING))
        if self.schedule not in SCHEDULES:
            raise _bad("schedule", self.schedule, ", ".join(SCHEDULES))
        if self.threshold is not None and not (0.0 < float(self.threshold) <= 1.0):
            raise _bad("threshold", self.threshold, "a number in (0, 1] or None")
        if self.temperature < 0:
            raise _bad("temperature", self.temperature, "a number >= 0")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise _bad("top_p", self.top_p, "a number in (0, 1] or None")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise _bad("top_k", self.top_k, "a positive integer or None")
        if self.alg_temp < 0:
            raise _bad("alg_temp", self.alg_temp, "a number >= 0")
        if not (0.0 < self.eps < 1.0):
            raise _bad("eps", self.eps, "a number in (0, 1)")
        if self.certainty_prior_sigma is not None and self.certainty_prior_sigma <= 0:
            raise _bad("certainty_prior_sigma", self.certainty_prior_sigma, "a positive number or None")
        if self.cfg_scale < 0:
            raise _bad("cfg_scale", self.cfg_scale, "a number >= 0")
        if self.scheduling not in SCHEDULING:
            raise _bad("scheduling", self.scheduling, ", ".join(SCHEDULING))
        if self.slots is not None and (not isinstance(self.slots, int) or isinstance(self.slots, bool)
                                       or self.slots <= 0):
            raise _bad("slots", self.slots, "a positive integer or None")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def block_len(self) -> int:
        return self.block_length or self.gen_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_len

    @property
    def total_steps(self) -> int:
        return self.steps or self.gen_length

    @property
    def steps_per_block(self) -> int:
        return self.total_steps // self.num_blocks

    def remasking_for(self, profile: DecodingProfile) -> str:
        """The profile's default when unset; else checked against the profile's allowed values."""
        if self.remasking is None:
            return profile.default_remasking
        if self.remasking not in profile.remasking:
            raise _bad("remasking", self.remasking, f"{', '.join(profile.remasking)} (for {profile.name})")
        return self.remasking

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["stop_token_ids"] is not None:
            d["stop_token_ids"] = list(d["stop_token_ids"])
        return d


@dataclass(frozen=True, init=False)
class CacheConfig:
    """Flat: `policy` plus that policy's parameters as keywords, e.g. CacheConfig(policy="dllm_cache", kp=25);
    unset or None = the policy's default. The parameters and their ranges are the policy module's
    declaration (`POLICY`); a parameter of another policy is an error."""

    policy: str = "none"
    """Cache policy name: a module of dllm_cache_core/cache/ or a `dllm_cache.policies` entry point."""
    values: tuple[tuple[str, Any], ...] = ()
    """The parameters that were set (not None), sorted by name; `params()` fills in the defaults."""

    def __init__(self, policy: str = "none", extra: Optional[Mapping[str, Any]] = None, **params: Any):
        """`extra` takes parameters as a mapping (the same as keywords)."""
        given = {k: v for k, v in {**(extra or {}), **params}.items() if v is not None}
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "values", tuple(sorted(given.items())))
        policy_decl(policy).check(given)

    def __getattr__(self, name: str) -> Any:
        """A declared parameter reads as its value, or None when unset (cfg.kp)."""
        if not name.startswith("_") and name in param_names():
            return dict(self.__dict__.get("values", ())).get(name)
        raise AttributeError(name)

    def params(self) -> dict[str, Any]:
        """The chosen policy's parameters with its defaults filled in."""
        return policy_decl(self.policy).resolve(dict(self.values))

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, **dict(self.values)}
