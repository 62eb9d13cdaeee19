#!/usr/bin/env python
"""Record golden token-id fixtures from the public reference samplers (NOT a pytest module).

    bash tests/golden/fetch_refs.sh                                  # reference code -> .refs/
    /work/refenv/bin/python tests/golden/record_golden.py [--only SUBSTR] [--dry-run]

Every fixture is one greedy, batch-1, no-padding, fp32 CPU run of a reference sampler on a tiny
random checkpoint written by the project's own builder (dllm_cache_core.models.tiny), loaded into
the reference model classes with a strict load_state_dict. The reference code is imported from the
git-ignored .refs/ folder and never copied into tracked files. tests/golden/README.md documents the
references, commits, patches and semantics. The environment needs torch, transformers==4.49.0,
einops, safetensors, accelerate, and for d2Cache hydra-core, omegaconf, loguru, python-dotenv,
pydantic, dill (see the README); TORCHDYNAMO_DISABLE=1 turns Fast-dLLM's @torch.compile off.

A candidate (checkpoint seed, prompt seed) is accepted only if the run is unambiguous:
  * no masked position ever has the mask token as its argmax (the reference would commit it),
    and the top-2 logits there differ by more than LOGIT_MARGIN;
  * every torch.topk the reference makes (commit selection, dLLM-Cache's similarity selection) has
    a relative gap > REL_MARGIN between the k-th and (k+1)-th value, and in threshold mode also
    between the first two values and between every candidate confidence and the threshold;
  * d2Cache's rollout nucleus selection has no cumulative share near rollout_p and no tie at the cut;
  * the reference model's logits equal the project model's logits (max abs diff <= LOGITS_TOL);
  * options that must change the result (CFG, EOS options, Dream top_p/top_k) do change it, and
    low-threshold runs really commit several tokens per forward.
Otherwise the next candidate is tried.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse
import contextlib
import importlib.util
import io
import json
import re
import sys
import tempfile
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
REFS = ROOT / ".refs"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))

from dllm_cache_core.models.loading import load_model as load_ours  # noqa: E402
from dllm_cache_core.models.tiny import write_tiny_checkpoint  # noqa: E402

REL_MARGIN = 1e-5      # relative gap required between competing confidences (top-k with largest=True)
SIM_MARGIN = 1e-6      # relative gap for dLLM-Cache's least-similar selection (cosine ~1, largest=False)
LOGIT_MARGIN = 1e-5    # gap required between the top-2 logits at masked positions
LOGITS_TOL = 1e-5      # reference vs project logits (fp32, CPU)
MAX_TRIES = 40

# ---------------------------------------------------------------------------------------------
# Reference code loading (from .refs/, laid out as <owner>+<name>/<path>)
# ---------------------------------------------------------------------------------------------


def _sources() -> dict[str, str]:
    f = REFS / "SOURCES.txt"
    if not f.exists():
        sys.exit("no .refs/SOURCES.txt: run `bash tests/golden/fetch_refs.sh` first")
    out = {}
    for line in f.read_text().splitlines():
        repo, commit, _ = line.split()
        out[repo] = commit
    return out


COMMITS = _sources()


def _exec_module(name: str, path: Path, source: Optional[str] = None, package: Optional[str] = None):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    if package:
        mod.__package__ = package
    sys.modules[name] = mod
    code = path.read_text() if source is None else source
    exec(compile(code, str(path), "exec"), mod.__dict__)
    return mod


def _load_package(name: str, directory: Path):
    spec = importlib.util.spec_from_file_location(name, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class Refs:
    """Lazily imported reference modules."""

    def __init__(self) -> None:
        self._llada_generate: dict[tuple[int, int], Any] = {}
        self._fd_llada = self._fd_llada_gen = self._fd_dream = self._fd_dream_block = None
        self._dc = self._dc_gen = None
        self._d2 = None

    # ML-GSAI/LLaDA generate.py, with the hard-coded EOS (126081) / EoT (126348) ids of the 8B
    # tokenizer re-parameterised to the tiny checkpoint's ids (a source substitution, in memory).
    def llada_generate(self, eos_id: int, eot_id: int):
        key = (eos_id, eot_id)
        if key not in self._llada_generate:
            path = REFS / "ML-GSAI+LLaDA" / "generate.py"
            src = path.read_text()
            assert src.count("[:, :, 126081]") == 2 and src.count("[:, :, 126348]") == 1, \
                "ML-GSAI/LLaDA generate.py changed: re-check the EOS/EoT patch"
            src = src.replace("[:, :, 126081]", f"[:, :, {eos_id}]").replace("[:, :, 126348]", f"[:, :, {eot_id}]")
            self._llada_generate[key] = _exec_module(f"ref_llada_generate_{eos_id}_{eot_id}", path, src)
        return self._llada_generate[key]

    @property
    def fd_llada(self):  # Fast-dLLM llada/model package (configuration_llada, modeling_llada)
        if self._fd_llada is None:
            self._fd_llada = _load_package("fastdllm_llada_model", REFS / "NVlabs+Fast-dLLM" / "llada" / "model")
        return self._fd_llada

    @property
    def fd_llada_gen(self):  # Fast-dLLM llada/generate.py (imports `model.modeling_llada`)
        if self._fd_llada_gen is None:
            pkg = self.fd_llada
            saved = {k: sys.modules.get(k) for k in ("model", "model.modeling_llada")}
            sys.modules["model"] = pkg
            sys.modules["model.modeling_llada"] = sys.modules["fastdllm_llada_model.modeling_llada"]
            try:
                self._fd_llada_gen = _exec_module("fastdllm_llada_generate",
                                                  REFS / "NVlabs+Fast-dLLM" / "llada" / "generate.py")
            finally:
                for k, v in saved.items():
                    if v is None:
                        sys.modules.pop(k, None)
                    else:
                        sys.modules[k] = v
        return self._fd_llada_gen

    @property
    def fd_dream(self):  # Fast-dLLM dream/model package (hub Dream model + generation_utils)
        if self._fd_dream is None:
            self._fd_dream = _load_package("fastdllm_dream_model", REFS / "NVlabs+Fast-dLLM" / "dream" / "model")
        return self._fd_dream

    @property
    def fd_dream_block(self):  # Fast-dLLM dream/model/generation_utils_block.py
        if self._fd_dream_block is None:
            self.fd_dream
            self._fd_dream_block = importlib.import_module("fastdllm_dream_model.generation_utils_block")
        return self._fd_dream_block

    @property
    def d2cache(self):  # Kamichanw/d2Cache src/ (imported as the `src` package, as its own entry points do)
        if self._d2 is None:
            # lm_eval is imported only by d2Cache's lm-eval adapters (src/models/*/eval_model.py,
            # eval_mdlm.py), which the recording never uses: stub the two names they import.
            for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.instance"):
                sys.modules.setdefault(name, types.ModuleType(name))
            sys.modules["lm_eval.api.model"].TemplateLM = type("TemplateLM", (), {})
            sys.modules["lm_eval.api.instance"].Instance = type("Instance", (), {})
            sys.path.insert(0, str(REFS / "Kamichanw+d2Cache"))
            import src  # noqa: F401
            import src.generation as gen
            import src.generation.utils as gen_utils
            from src.cache import d2Cache
            from src.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
            # prepare_logits_for_generation loads a token-frequency table of the 8B vocabularies for the
            # PC sampler's debiasing (unused here: debias=False); it cannot index a 262-token vocabulary.
            gen_utils.get_token_freq = lambda family, vocab_size: torch.ones(vocab_size)
            self._d2 = types.SimpleNamespace(generate=gen.generate, d2Cache=d2Cache, LLaDAConfig=LLaDAConfig,
                                             LLaDAModelLM=LLaDAModelLM, DreamConfig=DreamConfig,
                                             DreamModel=DreamModel)
        return self._d2

    @property
    def dllm_cache(self):  # maomaocun/dLLM-cache: dllm_cache package + utils/generate_function.py
        if self._dc is None:
            base = REFS / "maomaocun+dLLM-cache"
            sys.path.insert(0, str(base))
            import dllm_cache  # noqa: F401
            from dllm_cache.cache import dLLMCache, dLLMCacheConfig
            from dllm_cache.hooks import register_cache_Dream, register_cache_LLaDA
            self._dc = types.SimpleNamespace(dLLMCache=dLLMCache, dLLMCacheConfig=dLLMCacheConfig,
                                             register_cache_LLaDA=register_cache_LLaDA,
                                             register_cache_Dream=register_cache_Dream)
            self._dc_gen = _exec_module("dllmcache_generate_function", base / "utils" / "generate_function.py")
        return self._dc


REFS_ = Refs()

# ---------------------------------------------------------------------------------------------
# Checkpoints: the project's builder, loaded into the reference classes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ckpt:
    family: str
    seed: int
    std: float = 1.0
    overrides: tuple = ()

    def builder_args(self) -> dict:
        return {"family": self.family, "seed": self.seed, "std": self.std, "zero_mask_row": True,
                "config_overrides": dict(self.overrides)}


_CKPT_DIR = Path(tempfile.mkdtemp(prefix="golden_ckpt_"))
_ckpt_cache: dict[tuple, tuple[Path, dict, float]] = {}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def ref_llada_model(path: Path):
    m = REFS_.fd_llada
    cfg = m.configuration_llada.LLaDAConfig(**json.loads((path / "config.json").read_text()))
    model = m.modeling_llada.LLaDAModelLM(cfg, init_params=False)
    model.load_state_dict(_state(path), strict=True)
    return model.float().eval()


def ref_dream_model(path: Path):
    m = REFS_.fd_dream
    cfg = m.configuration_dream.DreamConfig(**json.loads((path / "config.json").read_text()))
    model = m.modeling_dream.DreamModel(cfg)
    model.load_state_dict(_state(path), strict=True)
    return model.float().eval()


def d2cache_model(family: str, path: Path):
    """d2Cache's own model classes (its cache hooks live in them), eager attention as it requires."""
    d2 = REFS_.d2cache
    cfg_cls, model_cls = (d2.LLaDAConfig, d2.LLaDAModelLM) if family == "llada" else (d2.DreamConfig, d2.DreamModel)
    cfg = cfg_cls(**json.loads((path / "config.json").read_text()))
    cfg._attn_implementation = "eager"
    model = model_cls(cfg)
    model.load_state_dict(_state(path), strict=True)
    return model.float().eval()


def ref_model(ck: Ckpt, path: Path, runner: str = ""):
    if runner == "d2cache":
        return d2cache_model(ck.family, path)
    return ref_llada_model(path) if ck.family == "llada" else ref_dream_model(path)


def checkpoint(ck: Ckpt, runner: str = "") -> tuple[Path, dict, float]:
    """(folder, config.json, max |ref logits - our logits|) for a builder argument set and the
    reference model classes that `runner` uses."""
    key = (ck, runner == "d2cache")
    if key not in _ckpt_cache:
        path = _CKPT_DIR / f"{ck.family}_{ck.seed}_{ck.std}_{abs(hash(ck.overrides))}"
        write_tiny_checkpoint(path, family=ck.family, seed=ck.seed, std=ck.std, zero_mask_row=True,
                              **dict(ck.overrides))
        cfg = json.loads((path / "config.json").read_text())
        ref = ref_model(ck, path, runner)
        with contextlib.redirect_stderr(io.StringIO()):
            ours, _ = load_ours(str(path), device="cpu", dtype="float32")
        g = torch.Generator().manual_seed(1234)
        V = cfg.get("embedding_size") or cfg["vocab_size"]
        ids = torch.randint(0, V, (2, 40), generator=g)
        ids[:, 20:] = cfg["mask_token_id"]
        ids[0, 25:30] = torch.randint(0, 256, (5,), generator=g)
        with torch.no_grad():
            a = ref(ids).logits.float()
            b = ours(ids).float()
        diff = float((a - b).abs().max())
        _ckpt_cache[key] = (path, cfg, diff)
        print(f"  checkpoint {ck} ({'d2Cache' if key[1] else 'Fast-dLLM'} model): logits max|ref-ours| = {diff:.3g}")
    return _ckpt_cache[key]


# ---------------------------------------------------------------------------------------------
# Monitor: rejects ambiguous runs (argmax = mask, near-ties in any top-k / threshold compare)
# ---------------------------------------------------------------------------------------------


class Ambiguous(Exception):
    pass


@dataclass
class Monitor:
    mask_id: int
    threshold: Optional[float] = None
    problems: list = field(default_factory=list)
    topk_calls: int = 0
    forwards: int = 0

    def logits(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """ids/logits exactly as the sampler sees them (after CFG, EOS -inf, Dream shift)."""
        self.forwards += 1
        masked = ids == self.mask_id
        if not masked.any():
            return
        l = logits[masked].float()
        top = l.topk(2, dim=-1)
        if (top.indices[:, 0] == self.mask_id).any():
            self.problems.append("mask token is the argmax at a masked position")
        if torch.isfinite(top.values[:, 0]).all() and float(l.max()) > 80:
            self.problems.append("logits > 80 (exp overflow in dLLM-Cache's noise function)")
        gap = top.values[:, 0] - top.values[:, 1]
        if (gap <= LOGIT_MARGIN).any():
            self.problems.append(f"top-2 logits within {LOGIT_MARGIN}")

    def topk(self, values: torch.Tensor, k, largest: bool) -> None:
        self.topk_calls += 1
        k = int(k)
        rows = values.detach().float().reshape(-1, values.shape[-1])
        for r in rows:
            v = r[torch.isfinite(r)]
            if v.numel() < 2:
                continue
            s = torch.sort(v, descending=largest).values
            scale = max(float(s.abs().max()), 1e-30)
            margin = REL_MARGIN if largest else SIM_MARGIN
            if 0 < k < s.numel() and abs(float(s[k - 1] - s[k])) <= margin * scale:
                self.problems.append(f"top-k boundary near-tie ({float(s[k - 1])!r} vs {float(s[k])!r})")
            if self.threshold is not None:
                if abs(float(s[0] - s[1])) <= REL_MARGIN * scale:
                    self.problems.append("top-1/top-2 near-tie in threshold mode")
                if bool(((v - self.threshold).abs() <= REL_MARGIN * max(scale, self.threshold)).any()):
                    self.problems.append("a confidence within margin of the threshold")


def _nucleus_check(mon: "Monitor", scores, top_p, mask) -> None:
    """d2Cache stage 2: keep the sorted prefix with cumulative share <= top_p: no share may sit
    near top_p, and no two shares may tie at the cut."""
    s = torch.where(mask, scores, 0.0) if mask is not None else scores
    probs = s / (s.sum(dim=-1, keepdim=True) + 1e-9)
    sp = torch.sort(probs, dim=-1, descending=True).values
    cum = torch.cumsum(sp, dim=-1)
    for r in range(sp.shape[0]):
        n = int((cum[r] <= top_p).sum())
        if bool(((cum[r] - top_p).abs() <= 1e-4).any()):
            mon.problems.append("rollout nucleus: a cumulative share within 1e-4 of top_p")
        if 0 < n < sp.shape[1] and abs(float(sp[r, n - 1] - sp[r, n])) <= REL_MARGIN * float(sp[r, 0]):
            mon.problems.append("rollout nucleus: tie at the cut")


Monitor.nucleus = lambda self, scores, top_p, mask: _nucleus_check(self, scores, top_p, mask)


@contextlib.contextmanager
def patched_topk(mon: Monitor):
    orig = torch.topk

    def topk(input, k, dim=-1, largest=True, sorted=True, **kw):
        assert dim in (-1, input.dim() - 1)
        mon.topk(input, k, largest)
        return orig(input, k, dim=dim, largest=largest, sorted=sorted, **kw)

    torch.topk = topk
    try:
        yield
    finally:
        torch.topk = orig


def shift(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def add_forward_monitor(model, mon: Monitor, transform: Callable):
    """forward hook: transform(ids, logits) -> (ids_seen, logits_seen) as the sampler uses them."""

    def hook(module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input_ids")
        logits = output.logits if hasattr(output, "logits") else output[0]
        i2, l2 = transform(ids, logits.detach())
        if i2 is not None:
            mon.logits(i2, l2)

    return model.register_forward_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------
# Reference runners: each returns (generated ids, reference nfe or None)
# ---------------------------------------------------------------------------------------------


def run_llada_ref(model, cfg, prompt, p, mon):
    """ML-GSAI/LLaDA generate.py: generate(model, prompt, attention_mask, steps, gen_length, ...)."""
    mod = REFS_.llada_generate(cfg["eos_token_id"], p["eot_id"])
    cfg_scale = p.get("cfg_scale", 0.0)
    eos = cfg["eos_token_id"]

    def seen(ids, logits):
        logits = logits.clone()
        if ids.shape[0] == 2:  # CFG batch [cond; uncond]
            cond, un = logits[:1], logits[1:]
            logits = un + (cfg_scale + 1) * (cond - un)
            ids = ids[:1]
        if p.get("logits_eos_inf"):
            logits[:, :, eos] = -torch.inf
        return ids, logits

    h = add_forward_monitor(model, mon, seen)
    orig_noise = mod.add_gumbel_noise
    if p.get("_no_alias"):  # only for the must-differ check: logits_with_noise a copy at temperature 0
        mod.add_gumbel_noise = lambda logits, temperature: (logits.clone() if temperature == 0
                                                            else orig_noise(logits, temperature))
    try:
        x = prompt.unsqueeze(0)
        # The reference's CFG branch reads `attention_mask_`, defined only when an attention_mask is
        # passed (NameError otherwise): pass a mask of ones (no padding; the model then builds no bias).
        am = torch.ones_like(x) if cfg_scale > 0 else None
        out = mod.generate(model, x, attention_mask=am, steps=p["steps"], gen_length=p["gen_length"],
                           block_length=p["block_length"], temperature=0.0, cfg_scale=cfg_scale,
                           remasking="low_confidence", mask_id=cfg["mask_token_id"],
                           logits_eos_inf=p.get("logits_eos_inf", False),
                           confidence_eos_eot_inf=p.get("confidence_eos_eot_inf", False))
    finally:
        h.remove()
        mod.add_gumbel_noise = orig_noise
    return out[0, x.shape[1]:].tolist(), None


def run_fastdllm_llada(model, cfg, prompt, p, mon):
    """Fast-dLLM llada/generate.py: generate / generate_with_prefix_cache / generate_with_dual_cache."""
    mod = REFS_.fd_llada_gen
    fn = {"none": mod.generate, "prefix": mod.generate_with_prefix_cache,
          "dual": mod.generate_with_dual_cache}[p["function"]]
    h = add_forward_monitor(model, mon, lambda ids, l: (ids, l))
    try:
        x = prompt.unsqueeze(0)
        out, nfe = fn(model, x, steps=p["steps"], gen_length=p["gen_length"], block_length=p["block_length"],
                      temperature=0.0, remasking="low_confidence", mask_id=cfg["mask_token_id"],
                      threshold=p.get("threshold"))
    finally:
        h.remove()
    return out[0, x.shape[1]:].tolist(), int(nfe)


def _dream_call(model, prompt, p, cfg, **extra):
    with contextlib.redirect_stdout(io.StringIO()):
        out = model.diffusion_generate(prompt.unsqueeze(0), max_new_tokens=p["gen_length"], steps=p["steps"],
                                       temperature=0.0, top_p=p.get("top_p"), top_k=p.get("top_k"),
                                       alg=p["alg"], alg_temp=0.0,
                                       eps=1e-3, mask_token_id=cfg["mask_token_id"], output_history=False,
                                       return_dict_in_generate=False, **extra)
    return out


def run_dream_ref(model, cfg, prompt, p, mon):
    """Dream hub diffusion_generate (Fast-dLLM dream/model/generation_utils.py), one block."""
    gu = REFS_.fd_dream.generation_utils
    model.diffusion_generate = types.MethodType(gu.DreamGenerationMixin.diffusion_generate, model)
    model._sample = types.MethodType(gu.DreamGenerationMixin._sample, model)
    h = add_forward_monitor(model, mon, lambda ids, l: (ids, shift(l)))
    try:
        out = _dream_call(model, prompt, p, cfg)
    finally:
        h.remove()
    return out[0, len(prompt):].tolist(), None


def run_fastdllm_dream_block(model, cfg, prompt, p, mon):
    """Fast-dLLM dream/model/generation_utils_block.py (prefix cache, or dual with dual_cache=True)."""
    gb = REFS_.fd_dream_block
    model.diffusion_generate = types.MethodType(gb.DreamGenerationMixin.diffusion_generate, model)
    model._sample = types.MethodType(gb.DreamGenerationMixin._sample, model)
    calls = []

    def seen(ids, logits):
        calls.append(1)
        return ids, shift(logits)

    h = add_forward_monitor(model, mon, seen)
    try:
        out = _dream_call(model, prompt, p, cfg, block_length=p["block_length"],
                          threshold=p.get("threshold", 0.9), dual_cache=p["function"] == "dual")
    finally:
        h.remove()
    return out[0, len(prompt):].tolist(), len(calls)


def run_dllm_cache(model, cfg, prompt, p, mon):
    """maomaocun/dLLM-cache: hooks on the reference model + its LLaDA generate / Dream diffusion_generate."""
    dc = REFS_.dllm_cache
    dc.dLLMCache.new_instance(**{"prompt_interval_steps": p["kp"], "gen_interval_steps": p["kr"],
                                 "transfer_ratio": p["rou"], "cfg_interval_steps": 1})
    P = len(prompt)
    if p["family"] == "llada":
        dc.register_cache_LLaDA(model, "model.transformer.blocks")
        # Fast-dLLM's LLaDAModel calls every block with an extra `replace_position` keyword (None on this
        # path); the dLLM-Cache hook has the hub block signature, so drop it.
        for blk in model.model.transformer.blocks:
            hooked = blk.forward
            blk.forward = (lambda f: (lambda *a, replace_position=None, **k: f(*a, **k)))(hooked)
        h = add_forward_monitor(model, mon, lambda ids, l: (ids, l))
        try:
            x = prompt.unsqueeze(0)
            out = REFS_._dc_gen.generate(x, None, model, steps=p["steps"], gen_length=p["gen_length"],
                                         block_length=p["block_length"], temperature=0.0, cfg_scale=0.0,
                                         remasking="low_confidence", mask_id=cfg["mask_token_id"])
        finally:
            h.remove()
        return out[0].tolist(), None
    dc.register_cache_Dream(model, "model.layers")
    dc.dLLMCache().reset_cache(P)  # as dLLM-cache's eval_model/Dream.py does before diffusion_generate
    return run_dream_ref(model, cfg, prompt, p, mon)


def run_d2cache(model, cfg, prompt, p, mon):
    """Kamichanw/d2Cache src/generation/vanilla.py (strategy "vanilla"), optionally with its d2Cache."""
    d2 = REFS_.d2cache
    mask = cfg["mask_token_id"]
    os.environ["MASK_TOKEN_ID"] = str(mask)  # d2Cache's caches read the mask id from the environment
    cache_cls = None
    if p["cache"] is not None:
        cache_cls = lambda model_config: d2.d2Cache(model_config, **p["cache"])  # noqa: E731
    dream = p["family"] == "dream"
    h = add_forward_monitor(model, mon, lambda ids, l: (ids, shift(l) if dream else l))
    import src.cache.d2cache as d2mod
    orig_nucleus = d2mod.nucleus_select

    def nucleus(scores, top_p, min_k=1, mask=None):
        mon.nucleus(scores, top_p, mask)
        return orig_nucleus(scores, top_p, min_k=min_k, mask=mask)

    d2mod.nucleus_select = nucleus
    try:
        rec = d2.generate(model, prompt.unsqueeze(0), strategy="vanilla", ignore_unknown_args="forbid",
                          alg=p["alg"], block_length=p["block_length"], gen_length=p["gen_length"],
                          num_transfer_tokens=p["num_transfer_tokens"], temperature=0.0, sigma=p["sigma"],
                          mask_token_id=mask, cache_cls=cache_cls)
    finally:
        h.remove()
        d2mod.nucleus_select = orig_nucleus
    return rec.frames[-1].generated_tokens.reshape(-1).tolist(), len(rec.deltas)


RUNNERS = {"llada_ref": run_llada_ref, "fastdllm_llada": run_fastdllm_llada, "dream_ref": run_dream_ref,
           "fastdllm_dream_block": run_fastdllm_dream_block, "dllm_cache": run_dllm_cache, "d2cache": run_d2cache}

REFERENCE_INFO = {
    "llada_ref": ("ML-GSAI/LLaDA", "generate.py: generate"),
    "fastdllm_llada": ("NVlabs/Fast-dLLM", "llada/generate.py: {function}"),
    "dream_ref": ("NVlabs/Fast-dLLM", "dream/model/generation_utils.py: DreamGenerationMixin.diffusion_generate "
                                      "(Dream hub generation code)"),
    "fastdllm_dream_block": ("NVlabs/Fast-dLLM", "dream/model/generation_utils_block.py: "
                                                 "DreamGenerationMixin.diffusion_generate"),
    "dllm_cache": ("maomaocun/dLLM-cache", "{hook} + {generate}"),
    "d2cache": ("Kamichanw/d2Cache", "src/generation/vanilla.py: vanilla_generate{with_cache}"),
}

# ---------------------------------------------------------------------------------------------
# Fixture specifications
# ---------------------------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    runner: str
    family: str
    params: dict                       # reference call parameters
    generation: dict                   # OUR GenerationConfig fields
    cache: dict = field(default_factory=lambda: {"policy": "none"})
    overrides: tuple = ()
    std: float = 1.0
    must_differ: list = field(default_factory=list)  # param changes whose runs the result must differ from
    prompt_len: tuple = (8, 20)
    seed_base: Optional[int] = None     # candidates are seed_base, seed_base + 1, ... (default: from the name)
    forwards_range: Optional[tuple] = None  # threshold fixtures: require some, not all, parallel commits


def llada_ref(name, gen, steps, block, **kw):
    p = {"gen_length": gen, "steps": steps, "block_length": block, "eot_id": 261}
    g = {"gen_length": gen, "steps": steps, "block_length": block, "remasking": "low_confidence"}
    plain = {}
    for opt in ("cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf"):
        if opt in kw:
            p[opt] = g[opt] = kw.pop(opt)
            plain[opt] = 0.0 if opt == "cfg_scale" else False
    differ = [plain] if plain else []
    if p.get("confidence_eos_eot_inf") and not p.get("logits_eos_inf"):
        # at temperature 0 add_gumbel_noise returns `logits` itself, so the chained assignment also puts
        # -inf on EOS in the confidence softmax: pick a case where that aliasing changes the result
        differ.append({"_no_alias": True})
    return Spec(name, "llada_ref", "llada", p, g, must_differ=differ, **kw)


def fd_llada(name, function, gen, steps, block, threshold=None, **kw):
    p = {"function": function, "gen_length": gen, "steps": steps, "block_length": block, "threshold": threshold}
    g = {"gen_length": gen, "steps": steps, "block_length": block, "remasking": "low_confidence",
         "threshold": threshold}
    if threshold is not None and threshold < 0.9:
        kw.setdefault("forwards_range", (gen // 8, gen * 3 // 4))
    return Spec(name, "fastdllm_llada", "llada", p, g, cache={"policy": function}, **kw)


def dream_ref(name, alg, gen, steps, top_p=None, top_k=None, **kw):
    p = {"alg": alg, "gen_length": gen, "steps": steps}
    g = {"gen_length": gen, "steps": steps, "block_length": gen, "remasking": alg}
    differ = []
    if top_p is not None or top_k is not None:
        # Dream's sample_tokens filters top_p / top_k even at temperature 0: the confidences come from
        # the filtered, renormalised distribution. Pick cases where that changes the result.
        p.update(top_p=top_p, top_k=top_k)
        g.update(top_p=top_p, top_k=top_k)
        differ.append({"top_p": None, "top_k": None})
    return Spec(name, "dream_ref", "dream", p, g, must_differ=differ, **kw)


def d2(name, family, gen, block, sigma=10.0, cache=None, alg="maskgit_plus", **kw):
    """d2Cache `vanilla` generation: one token per step, certainty-prior decoding with `sigma`;
    `cache` = d2Cache arguments (rollout_p, current_k, sigma, inflate_w) or None (no cache)."""
    p = {"family": family, "alg": alg, "gen_length": gen, "block_length": block, "num_transfer_tokens": 1,
         "sigma": sigma, "cache": cache}
    g = {"gen_length": gen, "steps": gen, "block_length": block, "certainty_prior_sigma": sigma,
         "remasking": ("low_confidence" if family == "llada" else alg)}
    if family == "dream":
        g["schedule"] = "llada"  # d2Cache commits exactly num_transfer_tokens=1 per step
    c = {"policy": "none"} if cache is None else dict({"policy": "d2cache"}, **cache)
    return Spec(name, "d2cache", family, p, g, cache=c, **kw)


def fd_dream(name, function, gen, steps, block, threshold=None, **kw):
    alg = "entropy" if threshold is None else "confidence_threshold"
    p = {"function": function, "alg": alg, "gen_length": gen, "steps": steps, "block_length": block}
    if threshold is not None:
        p["threshold"] = threshold
    # fixed mode ranks by negative entropy whatever alg says; threshold mode uses the top-1 probability
    g = {"gen_length": gen, "steps": steps, "block_length": block,
         "remasking": "entropy" if threshold is None else "maskgit_plus", "threshold": threshold}
    if threshold is not None and threshold < 0.9:
        kw.setdefault("forwards_range", (gen // 8, gen * 3 // 4))
    return Spec(name, "fastdllm_dream_block", "dream", p, g, cache={"policy": function}, **kw)


def dllm(name, family, gen, steps, block, kp, kr, rou, alg="entropy", **kw):
    p = {"family": family, "gen_length": gen, "steps": steps, "block_length": block, "kp": kp, "kr": kr, "rou": rou}
    if family == "llada":
        g = {"gen_length": gen, "steps": steps, "block_length": block, "remasking": "low_confidence"}
    else:
        assert block == gen, "dLLM-Cache's Dream path is diffusion_generate: one block"
        p["alg"] = alg
        g = {"gen_length": gen, "steps": steps, "block_length": gen, "remasking": alg}
    return Spec(name, "dllm_cache", family, p, g, cache={"policy": "dllm_cache", "kp": kp, "kr": kr, "rou": rou}, **kw)


DREAM_7X = (("hidden_size", 56), ("num_attention_heads", 7), ("num_key_value_heads", 1))
LLADA_GQA = (("n_kv_heads", 2),)
# Thresholds: the builder's random models are nearly flat (top-1 probabilities ~0.02-0.06 over the
# 262-token vocabulary, whatever `std` is), so 0.9 never passes beyond the forced top-1; the low
# thresholds below sit inside the models' confidence range so several tokens pass per step.
LLADA_THR, DREAM_THR = 0.04, 0.028

SPECS: list[Spec] = [
    # (a) ML-GSAI/LLaDA generate.py  -> policy none
    llada_ref("llada_ref_single_block", 32, 32, 32),
    llada_ref("llada_ref_single_block_4_per_step", 32, 8, 32),
    llada_ref("llada_ref_semi_ar", 64, 64, 16),
    llada_ref("llada_ref_semi_ar_remainder", 48, 15, 16),          # 16 tokens in 5 steps: 4,3,3,3,3
    llada_ref("llada_ref_semi_ar_2_per_step", 64, 32, 16),
    llada_ref("llada_ref_gqa", 32, 16, 8, overrides=LLADA_GQA),
    llada_ref("llada_ref_cfg", 32, 16, 16, cfg_scale=1.0),
    llada_ref("llada_ref_cfg_single_block", 32, 32, 32, cfg_scale=0.5),
    llada_ref("llada_ref_logits_eos_inf", 32, 32, 32, logits_eos_inf=True),
    llada_ref("llada_ref_confidence_eos_eot_inf", 64, 64, 64, confidence_eos_eot_inf=True),
    llada_ref("llada_ref_confidence_eos_eot_inf_semi_ar", 64, 64, 16, confidence_eos_eot_inf=True),
    llada_ref("llada_ref_both_eos_options_cfg", 32, 32, 16, cfg_scale=1.0, logits_eos_inf=True,
              confidence_eos_eot_inf=True),
    # (b) Dream diffusion_generate (one block) -> policy none
    *[dream_ref(f"dream_ref_{alg}", alg, 32, 32) for alg in ("maskgit_plus", "topk_margin", "entropy")],
    *[dream_ref(f"dream_ref_{alg}_8_steps", alg, 32, 8) for alg in ("maskgit_plus", "topk_margin", "entropy")],
    dream_ref("dream_ref_entropy_gen64", "entropy", 64, 64),
    dream_ref("dream_ref_maskgit_plus_top_p0.9", "maskgit_plus", 32, 16, top_p=0.9),
    dream_ref("dream_ref_entropy_top_k8", "entropy", 32, 16, top_k=8),
    # (c) Fast-dLLM LLaDA: generate / prefix / dual, fixed schedule and threshold
    *[s for fn in ("none", "prefix", "dual") for s in (
        fd_llada(f"fastdllm_llada_{fn}_fixed", fn, 64, 64, 16),
        fd_llada(f"fastdllm_llada_{fn}_fixed_2_per_step", fn, 64, 32, 16),
        fd_llada(f"fastdllm_llada_{fn}_threshold_0.9", fn, 64, 4, 16, threshold=0.9),
        fd_llada(f"fastdllm_llada_{fn}_threshold_{LLADA_THR}", fn, 64, 4, 16, threshold=LLADA_THR),
        fd_llada(f"fastdllm_llada_{fn}_single_block", fn, 32, 32, 32),
        fd_llada(f"fastdllm_llada_{fn}_single_block_threshold_{LLADA_THR}", fn, 32, 1, 32, threshold=LLADA_THR),
        fd_llada(f"fastdllm_llada_{fn}_gqa", fn, 32, 16, 8, overrides=LLADA_GQA),
    )],
    # (d) Fast-dLLM Dream block sampler: prefix / dual, fixed (entropy) and threshold
    *[s for fn in ("prefix", "dual") for s in (
        fd_dream(f"fastdllm_dream_{fn}_fixed", fn, 64, 64, 16),
        fd_dream(f"fastdllm_dream_{fn}_fixed_2_per_step", fn, 64, 32, 16),
        fd_dream(f"fastdllm_dream_{fn}_threshold_0.9", fn, 64, 4, 16, threshold=0.9),
        fd_dream(f"fastdllm_dream_{fn}_threshold_{DREAM_THR}", fn, 64, 4, 16, threshold=DREAM_THR),
        fd_dream(f"fastdllm_dream_{fn}_blocks_of_8", fn, 32, 16, 8),
    )],
    # (e) dLLM-Cache hooks: LLaDA (MHA) with its generate(); Dream (n_heads = 7 x n_kv_heads) with diffusion_generate
    dllm("dllm_cache_llada_kp1_kr1_rou0", "llada", 32, 32, 8, 1, 1, 0.0),
    dllm("dllm_cache_llada_kp5_kr2_rou0.25", "llada", 32, 32, 8, 5, 2, 0.25),
    dllm("dllm_cache_llada_kp50_kr2_rou0.25", "llada", 32, 32, 8, 50, 2, 0.25),
    dllm("dllm_cache_llada_kp4_kr3_rou0", "llada", 32, 32, 8, 4, 3, 0.0),
    dllm("dllm_cache_llada_kp3_kr2_rou0.5_single_block", "llada", 32, 16, 32, 3, 2, 0.5),
    dllm("dllm_cache_dream_kp1_kr1_rou0", "dream", 32, 32, 32, 1, 1, 0.0, overrides=DREAM_7X),
    # Dream with steps == gen_length commits 0 tokens at its first step, so the second forward sees the
    # same input: every cosine similarity is 1 and dLLM-Cache's top-k is a pure tie -> use fewer steps.
    dllm("dllm_cache_dream_kp5_kr2_rou0.25_16_steps", "dream", 32, 16, 32, 5, 2, 0.25, overrides=DREAM_7X),
    dllm("dllm_cache_dream_kp50_kr2_rou0.25_16_steps", "dream", 32, 16, 32, 50, 2, 0.25, overrides=DREAM_7X),
    dllm("dllm_cache_dream_kp4_kr3_rou0_maskgit", "dream", 32, 32, 32, 4, 3, 0.0, alg="maskgit_plus",
         overrides=DREAM_7X),
    dllm("dllm_cache_dream_kp3_kr2_rou0.5_8_steps", "dream", 32, 8, 32, 3, 2, 0.5, overrides=DREAM_7X),
    # (f) d2Cache: certainty-prior decoding (no cache), and the d2Cache policy with current_k >= gen_length
    # (every masked position is recomputed each step, so the reference's two selection quirks -- the
    # frozen confidence cache and the no-op restriction to computed positions -- cannot act; the
    # attention-rollout stage still selects only the top-p of the other tokens)
    d2("d2cache_vanilla_llada_sigma10", "llada", 32, 32),
    d2("d2cache_vanilla_llada_sigma10_semi_ar", "llada", 32, 8),
    d2("d2cache_vanilla_llada_sigma3", "llada", 48, 48, sigma=3.0),
    d2("d2cache_vanilla_dream_sigma10", "dream", 32, 32),
    d2("d2cache_llada_defaults", "llada", 32, 32,
       cache={"rollout_p": 0.1, "current_k": 32, "sigma": 10.0, "inflate_w": 0}),
    d2("d2cache_llada_rollout0.3_semi_ar_inflate4", "llada", 32, 8,
       cache={"rollout_p": 0.3, "current_k": 32, "sigma": 10.0, "inflate_w": 4}),
    d2("d2cache_dream_defaults", "dream", 32, 32,
       cache={"rollout_p": 0.1, "current_k": 32, "sigma": 10.0, "inflate_w": 0}),
    d2("d2cache_dream_rollout0.3_inflate4", "dream", 32, 32,
       cache={"rollout_p": 0.3, "current_k": 32, "sigma": 10.0, "inflate_w": 4}),
    # No Dream semi-AR d2Cache fixtures: d2Cache's Dream blocks have no first-position rule, while our
    # Dream blocks follow Fast-dLLM's block sampler for every policy (the engine's semantics).
]

# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


def run_once(spec: Spec, ck: Ckpt, prompt: torch.Tensor, params: dict, mon: Optional[Monitor]):
    path, cfg, _ = checkpoint(ck, spec.runner)
    model = ref_model(ck, path, spec.runner)  # fresh model per run (hooks / bound methods do not leak)
    mon = mon or Monitor(cfg["mask_token_id"])
    with patched_topk(mon), torch.no_grad():
        ids, nfe = RUNNERS[spec.runner](model, cfg, prompt, params, mon)
    return ids, nfe, mon


def make_prompt(seed: int, lo: int, hi: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    n = int(torch.randint(lo, hi + 1, (1,), generator=g))
    return torch.randint(0, 256, (n,), generator=g)  # byte tokens only: no special ids


def reference_block(spec: Spec) -> dict:
    repo, what = REFERENCE_INFO[spec.runner]
    p = spec.params
    if spec.runner == "dllm_cache":
        what = what.format(
            hook="dllm_cache/hooks/cache_hook_LLaDA.py: register_cache_LLaDA" if p["family"] == "llada"
            else "dllm_cache/hooks/cache_hook_Dream.py: register_cache_Dream",
            generate="utils/generate_function.py: generate" if p["family"] == "llada"
            else "NVlabs/Fast-dLLM@" + COMMITS["NVlabs/Fast-dLLM"][:8]
                 + " dream/model/generation_utils.py: diffusion_generate")
    elif spec.runner == "d2cache":
        what = what.format(with_cache="" if p["cache"] is None else " + src/cache/d2cache.py: d2Cache")
    else:
        what = what.format(**p)
    info = {"repo": repo, "commit": COMMITS[repo], "entry": what, "call": p,
            "model_code": "NVlabs/Fast-dLLM " + COMMITS["NVlabs/Fast-dLLM"]
                          + (" llada/model/modeling_llada.py" if spec.family == "llada"
                             else " dream/model/modeling_dream.py")}
    if spec.runner == "d2cache":
        info["model_code"] = (f"Kamichanw/d2Cache {COMMITS['Kamichanw/d2Cache']} src/models/{spec.family}/"
                              f"modeling_{spec.family}.py (attn_implementation=eager)")
    return info


def dump(fx: dict) -> str:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(fx, indent=1)
    return re.sub(r"\[\s*([-0-9.e, \n]+?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def record(spec: Spec, dry_run: bool) -> Optional[dict]:
    rejected = []
    base = zlib.crc32(spec.name.encode()) % 1000 if spec.seed_base is None else spec.seed_base
    for t in range(MAX_TRIES):
        seed = base + t
        ck = Ckpt(spec.family, seed, spec.std, spec.overrides)
        path, cfg, diff = checkpoint(ck, spec.runner)
        if diff > LOGITS_TOL:
            raise SystemExit(f"{spec.name}: reference vs project logits differ by {diff} on {ck}")
        prompt = make_prompt(seed, *spec.prompt_len)
        mon = Monitor(cfg["mask_token_id"], threshold=spec.params.get("threshold"))
        ids, nfe, mon = run_once(spec, ck, prompt, spec.params, mon)
        probs = sorted(set(mon.problems))
        if cfg["mask_token_id"] in ids:
            probs.append("mask id in the output")
        if len(ids) != spec.params["gen_length"]:
            probs.append(f"output has {len(ids)} tokens")
        n_fw = nfe if nfe is not None else mon.forwards
        if spec.forwards_range is not None and not spec.forwards_range[0] <= n_fw <= spec.forwards_range[1]:
            probs.append(f"{n_fw} forwards, outside {spec.forwards_range}")
        for change in ([] if probs else spec.must_differ):
            other, _, _ = run_once(spec, ck, prompt, dict(spec.params, **change), None)
            if other == ids:
                probs.append(f"same result with {change}")
        if probs:
            rejected.append((seed, probs[:3]))
            continue
        fx = {
            "name": spec.name,
            "reference": reference_block(spec),
            "checkpoint": ck.builder_args(),
            "prompt_ids": prompt.tolist(),
            "generation": dict(spec.generation, temperature=0.0),
            "cache": spec.cache,
            "expected": ids,
            "reference_forward_calls": nfe if nfe is not None else mon.forwards,
            "logits_max_abs_diff": diff,
            "checks": {"forwards_seen": mon.forwards, "topk_calls_checked": mon.topk_calls,
                       "rejected_candidates": len(rejected)},
        }
        print(f"OK   {spec.name}: seed {seed} (rejected {len(rejected)}), nfe={nfe}, "
              f"first tokens {ids[:8]}")
        if not dry_run:
            (FIXTURES / f"{spec.name}.json").write_text(dump(fx))
        return fx
    print(f"FAIL {spec.name}: no acceptable candidate in {MAX_TRIES}: {rejected[:5]}")
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="record only fixtures whose name contains this")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    done, failed = 0, []
    for spec in SPECS:
        if args.only and args.only not in spec.name:
            continue
        if record(spec, args.dry_run) is None:
            failed.append(spec.name)
        else:
            done += 1
    print(f"\n{done} fixtures recorded, {len(failed)} failed: {failed}")
    print("checkpoints:")
    for ck, (_, _, diff) in _ckpt_cache.items():
        print(f"  {ck}: logits max|ref-ours| = {diff:.3g}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
