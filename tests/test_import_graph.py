"""The import graph of dllm_cache_core/ and pipeline/ is acyclic, counting imports inside functions
(a lazy import hides a cycle only until the two modules are changed together), the package
__init__ modules an import runs, and the cache registry's discovery of every module in
dllm_cache_core/cache/. Also the layering: models import neither decoding nor cache, the caches do not
import the decoding loop, and the engine imports no pipeline."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dllm_cache_core", "pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of `known` that `mod` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, is_pkg, node.level, node.module)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for n in names:
            # importing a.b.c runs a/__init__ and a/b/__init__ first (those not already running)
            parts = n.split(".")
            out.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                       if p in known and p != mod and not (mod + ".").startswith(p + "."))
    return out


def import_graph() -> dict[str, set[str]]:
    known = all_modules()
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    # the policy registry imports every module of its package by name (discovery; not _private ones)
    graph["dllm_cache_core.cache.registry"] |= {m for m in known if m.startswith("dllm_cache_core.cache.")
                                                and m != "dllm_cache_core.cache.registry"
                                                and not m.rsplit(".", 1)[1].startswith("_")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_graph_sees_function_level_imports():
    """The walker finds an import nested in a function, so the acyclicity check below can fail."""
    g = import_graph()
    assert "dllm_cache_core.decoding.generate" in g["dllm_cache_core.eval"]  # imported inside functions
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layering():
    g = import_graph()
    bad = [(m, n) for m, ns in g.items() for n in ns if (
        (m.startswith("dllm_cache_core.models") and n.startswith(("dllm_cache_core.decoding", "dllm_cache_core.cache")))
        or (m.startswith("dllm_cache_core.cache") and n.startswith("dllm_cache_core.decoding"))
        or (m.startswith("dllm_cache_core") and n.startswith("pipeline")))]
    assert not bad, bad
