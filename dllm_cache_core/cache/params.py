"""What a cache policy declares about itself: its name, its parameters and when it is exact.

A policy module states these once, at its top (`POLICY = PolicyDecl(...)`). `CacheConfig`'s
validation, the job spec's `cache:` section, their error messages and the README's policy table are
all derived from the declarations, so a policy's parameters and ranges are written nowhere else.
Imports no torch: reading declarations costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Param:
    """One policy parameter: type, default, allowed range, one-line doc."""

    name: str
    type: Optional[type]
    """int or float (an int is accepted for a float); None = any value (a policy registered without
    declarations)."""
    default: Any
    doc: str
    ge: Optional[float] = None
    """Inclusive lower bound."""
    gt: Optional[float] = None
    """Exclusive lower bound."""
    le: Optional[float] = None
    """Inclusive upper bound."""

    def allowed(self) -> str:
        """The allowed values in words, as error messages and the README show them."""
        kind = {int: "an integer", float: "a number", None: "any value"}[self.type]
        lo = f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else None
        if lo and self.le is not None:
            lo_b = "(" if self.gt is not None else "["
            rng = f" in {lo_b}{self.gt if self.gt is not None else self.ge:g}, {self.le:g}]"
        elif lo:
            rng = f" {lo}"
        elif self.le is not None:
            rng = f" <= {self.le:g}"
        else:
            rng = ""
        return kind + rng

    def ok(self, value: Any) -> bool:
        if value is None:
            return True  # None = the default (whose meaning `doc` gives)
        if self.type is None:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type is int and not isinstance(value, int):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))

    def check(self, value: Any) -> None:
        if not self.ok(value):
            raise ValueError(f"cache.{self.name}={value!r} is not allowed; allowed: {self.allowed()}")

    def default_text(self) -> str:
        return "None" if self.default is None else f"{self.default:g}" if isinstance(self.default, float) \
            else str(self.default)


@dataclass(frozen=True)
class PolicyDecl:
    """A policy's declaration; `exact` lists parameter settings under which its tokens equal `none`'s."""

    name: str
    params: tuple[Param, ...] = ()
    reuses: str = ""
    """What the policy reuses between forwards (README table)."""
    exact_when: str = ""
    """The exactness conditions in words (README table); "always" for the reference path."""
    exact: tuple[dict[str, Any], ...] = field(default=())
    """Machine-checked form of exact_when: each dict is a setting whose tokens equal `none`'s for any
    generation whose gen_length is at most 4096 (tests run every one of them)."""
    order: int = 100
    """Position in listings (error messages, tables); ties by name."""
    calibration: tuple[dict[str, Any], ...] = field(default=())
    """Settings besides the defaults that `cache.policy: auto` tries by default: safer (more often
    refreshed) variants of a fast policy."""

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        allowed = ", ".join(p.name for p in self.params) or "none"
        raise ValueError(f"cache.{name} is not a parameter of policy {self.name!r}; its parameters: {allowed}")

    def check(self, given: dict[str, Any]) -> None:
        """Unknown parameter or value out of range: ValueError naming cache.<name> and what is allowed."""
        for k, v in given.items():
            self.param(k).check(v)

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every parameter, the ones given (not None) replacing the defaults."""
        out = self.defaults
        out.update({k: v for k, v in given.items() if v is not None})
        return out
