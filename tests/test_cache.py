"""Cache policies: registry and CacheConfig validation, batch invariance for every registered policy,
and token-for-token exactness against `none` where the method is exact."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from dllm_cache_core import CacheConfig, GenerationConfig, generate  # noqa: E402
from dllm_cache_core.cache import CachePolicy, policy_names, register  # noqa: E402
from dllm_cache_core.cache import registry as registry_mod  # noqa: E402
from engine_fixtures import (FAMILIES, KNOWN_POLICIES, PROMPTS, REQUIRED_POLICIES,  # noqa: E402,F401
                             _one_torch_thread, decode_model, require_policy)

# the policy's parameters with every default filled in (CacheConfig is flat)
DEFAULTS = {
    "none": {},
    "prefix": {"refresh_interval": None},
    "dual": {"refresh_interval": None},
    "dllm_cache": {"kp": 50, "kr": 2, "rou": 0.25},
    "d2cache": {"rollout_p": 0.1, "current_k": 32, "sigma": 10.0, "inflate_w": None},
}

# generation modes every policy is run in (gen 32: fast on 2 cores, still 4 blocks of 8)
MODES = {
    "single_block": dict(gen_length=32, steps=16),
    "semi_ar": dict(gen_length=32, block_length=8, steps=16),
    "threshold": dict(gen_length=32, block_length=8, steps=4, threshold=0.5),
    "threshold_single": dict(gen_length=32, steps=1, threshold=0.6),
}


def _gen(mode: str, **extra) -> GenerationConfig:
    return GenerationConfig(stop_at_eos=False, **MODES[mode], **extra)


# ================================================================================================
# Registry and CacheConfig
# ================================================================================================
def test_required_policies_registered():
    names = policy_names()
    for p in REQUIRED_POLICIES:
        assert p in names, names


@pytest.mark.parametrize("policy", KNOWN_POLICIES)
def test_policy_defaults(policy):
    require_policy(policy)
    assert CacheConfig(policy=policy).params() == DEFAULTS[policy]


def test_cache_config_is_frozen_and_flat():
    c = CacheConfig(policy="dual", refresh_interval=3)
    assert c.params() == {"refresh_interval": 3}
    assert c.to_dict() == {"policy": "dual", "refresh_interval": 3}
    with pytest.raises(Exception):
        c.policy = "none"  # frozen


def test_unknown_policy_lists_allowed():
    with pytest.raises(ValueError) as e:
        CacheConfig(policy="dualcache")
    msg = str(e.value)
    assert "cache.policy" in msg and "dualcache" in msg
    for name in policy_names():
        assert name in msg


# a parameter of another policy -> (config, the parameter named, a parameter the message must list)
FOREIGN = [
    (dict(policy="dual", kp=3), "kp", "refresh_interval"),
    (dict(policy="prefix", rou=0.5), "rou", "refresh_interval"),
    (dict(policy="none", refresh_interval=1), "refresh_interval", None),
    (dict(policy="dual", current_k=4), "current_k", "refresh_interval"),
    (dict(policy="dllm_cache", refresh_interval=1), "refresh_interval", "kp"),
    (dict(policy="dllm_cache", sigma=1.0), "sigma", "rou"),
    (dict(policy="d2cache", kr=1), "kr", "current_k"),
    (dict(policy="d2cache", refresh_interval=2), "refresh_interval", "rollout_p"),
]


@pytest.mark.parametrize("kw,param,listed", FOREIGN)
def test_parameter_of_another_policy(kw, param, listed):
    require_policy(kw["policy"])
    with pytest.raises(ValueError, match=param) as e:
        CacheConfig(**kw)
    if listed:
        assert listed in str(e.value)


BAD_VALUES = [
    dict(policy="prefix", refresh_interval=0),
    dict(policy="dual", refresh_interval=-2),
    dict(policy="dual", refresh_interval=1.5),
    dict(policy="dllm_cache", kp=0),
    dict(policy="dllm_cache", kr=-1),
    dict(policy="dllm_cache", rou=1.5),
    dict(policy="d2cache", rollout_p=1.5),
    dict(policy="d2cache", current_k=-1),
    dict(policy="d2cache", current_k=2.5),
    dict(policy="d2cache", sigma=0.0),
    dict(policy="d2cache", inflate_w=-1),
]


@pytest.mark.parametrize("kw", BAD_VALUES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_out_of_range_parameter_named(kw):
    require_policy(kw["policy"])
    param = next(k for k in kw if k != "policy")
    with pytest.raises(ValueError, match=param):
        CacheConfig(**kw)


def test_new_policy_is_one_class():
    """A policy registered from outside the package needs no change to the models or the loop."""

    class EveryOtherFull(CachePolicy):
        name = "test_every_other_full"
        defaults = {"period": 2}

        def __init__(self, ctx, **params):
            super().__init__(ctx, **params)
            self.kv = self.kv_buffers()

        def forward(self, x, step):
            # rows sit at their own steps: refresh those whose step is due, the others reuse the cache
            full = [s % self.params["period"] == 0 for s in step.steps]
            if all(full):
                return self.full_forward(x, step, store=self.kv)
            out = self.cached_range_forward(x, step.subset([not f for f in full]), step.block_length, self.kv)
            if not any(full):
                return out
            logits = torch.empty(step.n, *out.shape[1:], dtype=out.dtype)
            logits[torch.tensor([not f for f in full])] = out
            logits[torch.tensor(full)] = self.full_forward(x, step.subset(full), store=self.kv)
            return logits

    register(EveryOtherFull)
    try:
        cfg = CacheConfig(policy="test_every_other_full", extra={"period": 1})
        assert cfg.params() == {"period": 1}
        model = decode_model("llada")[0]
        gen = _gen("semi_ar")
        assert ([o.token_ids for o in generate(model, PROMPTS, gen, cfg)]
                == [o.token_ids for o in generate(model, PROMPTS, gen, CacheConfig())])
        with pytest.raises(ValueError, match="bogus"):
            CacheConfig(policy="test_every_other_full", extra={"bogus": 1})
    finally:
        registry_mod._POLICIES.pop("test_every_other_full", None)


# ================================================================================================
# Batch invariance: a prompt alone == the same prompt inside a mixed-length (left-padded) batch
# ================================================================================================
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("policy", KNOWN_POLICIES)
def test_batch_invariance(policy, fam, mode):
    require_policy(policy)
    model = decode_model(fam)[0]
    gen, cache = _gen(mode), CacheConfig(policy=policy)
    batch = generate(model, PROMPTS, gen, cache)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], gen, cache)[0]
        assert alone.token_ids == batch[i].token_ids, (i, alone.token_ids, batch[i].token_ids)
        assert alone.stats.nfe == batch[i].stats.nfe
        assert alone.stats.num_prompt_tokens == batch[i].stats.num_prompt_tokens == len(p)
    # a different batch composition and order
    swapped = generate(model, [PROMPTS[2], PROMPTS[0]], gen, cache)
    assert swapped[0].token_ids == batch[2].token_ids and swapped[1].token_ids == batch[0].token_ids
    for o in batch:
        assert model.config.mask_id not in o.token_ids and len(o.token_ids) == 32


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("policy", KNOWN_POLICIES)
def test_batch_invariance_sampled(policy, fam):
    """temperature > 0: each row draws from its own generator seeded from (seed, row id)."""
    require_policy(policy)
    model = decode_model(fam)[0]
    gen = GenerationConfig(gen_length=32, block_length=8, steps=16, temperature=0.9, stop_at_eos=False)
    cache = CacheConfig(policy=policy)
    batch = generate(model, PROMPTS, gen, cache, seed=11, row_ids=[10, 20, 30])
    alone = generate(model, [PROMPTS[1]], gen, cache, seed=11, row_ids=[20])[0]
    assert alone.token_ids == batch[1].token_ids


@pytest.mark.parametrize("policy", KNOWN_POLICIES)
def test_batch_invariance_cfg(policy):
    """Classifier-free guidance doubles the batch (unconditional rows with the prompt masked); a row's
    result still must not depend on the others."""
    require_policy(policy)
    model = decode_model("llada")[0]
    gen = GenerationConfig(gen_length=32, block_length=8, steps=16, cfg_scale=1.0, stop_at_eos=False)
    cache = CacheConfig(policy=policy)
    batch = generate(model, PROMPTS, gen, cache)
    for i, p in enumerate(PROMPTS):
        assert generate(model, [p], gen, cache)[0].token_ids == batch[i].token_ids, i


# ================================================================================================
# Exactness against `none` (each policy declares the settings that are exact)
# ================================================================================================
# (policy, parameters); CURRENT_K_ALL is replaced by the generation length (current_k >= gen_length)
CURRENT_K_ALL = "gen_length"
EXACT = [
    ("prefix", dict(refresh_interval=1)),
    ("dual", dict(refresh_interval=1)),
    ("dllm_cache", dict(kp=1, kr=1)),
    ("dllm_cache", dict(kp=1, rou=1.0)),
    ("d2cache", dict(current_k=CURRENT_K_ALL, rollout_p=1.0)),
]


def _exact_id(p):
    policy, kw = p
    return policy + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("entry", EXACT, ids=_exact_id)
def test_exact_equals_none(entry, fam, mode):
    policy, kw = entry
    require_policy(policy)
    model = decode_model(fam)[0]
    gen = _gen(mode)
    params = {k: (gen.gen_length if v == CURRENT_K_ALL else v) for k, v in kw.items()}
    ref = generate(model, PROMPTS, gen, CacheConfig())
    got = generate(model, PROMPTS, gen, CacheConfig(policy=policy, **params))
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids
        assert g.stats.nfe == r.stats.nfe and g.stats.steps == r.stats.steps
    # batch 1, no padding: the references' setting
    alone_ref = generate(model, [PROMPTS[0]], gen, CacheConfig())[0]
    alone = generate(model, [PROMPTS[0]], gen, CacheConfig(policy=policy, **params))[0]
    assert alone.token_ids == alone_ref.token_ids


@pytest.mark.parametrize("entry", EXACT, ids=_exact_id)
def test_exact_equals_none_with_cfg(entry):
    policy, kw = entry
    require_policy(policy)
    model = decode_model("llada")[0]
    gen = GenerationConfig(gen_length=32, block_length=8, steps=16, cfg_scale=1.0, stop_at_eos=False)
    params = {k: (gen.gen_length if v == CURRENT_K_ALL else v) for k, v in kw.items()}
    ref = generate(model, PROMPTS, gen, CacheConfig())
    got = generate(model, PROMPTS, gen, CacheConfig(policy=policy, **params))
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]


@pytest.mark.parametrize("fam", FAMILIES)
def test_exact_also_with_stop_tokens_and_sampling(fam):
    """Exact settings stay exact when rows stop early and when sampling (per-row generators)."""
    model = decode_model(fam)[0]
    base = generate(model, PROMPTS, GenerationConfig(gen_length=32, block_length=8, steps=16, stop_at_eos=False))
    stop = base[0].token_ids[3]
    gen = GenerationConfig(gen_length=32, block_length=8, steps=16, temperature=0.7, stop_token_ids=[stop])
    ref = generate(model, PROMPTS, gen, CacheConfig(), seed=5)
    for policy, kw in EXACT:
        if policy not in policy_names():
            continue
        params = {k: (gen.gen_length if v == CURRENT_K_ALL else v) for k, v in kw.items()}
        got = generate(model, PROMPTS, gen, CacheConfig(policy=policy, **params), seed=5)
        assert [g.token_ids for g in got] == [r.token_ids for r in ref], (policy, kw)
        assert [g.stats.finish_reason for g in got] == [r.stats.finish_reason for r in ref]


@pytest.mark.parametrize("fam", FAMILIES)
def test_default_policies_are_approximations_that_run(fam):
    """Defaults are allowed to differ from `none` but must produce full, mask-free outputs and not
    compute more than `none`."""
    model = decode_model(fam)[0]
    gen = _gen("semi_ar")
    ref = generate(model, PROMPTS, gen, CacheConfig())
    for policy in policy_names():
        out = generate(model, PROMPTS, gen, CacheConfig(policy=policy))
        for o, r in zip(out, ref):
            assert len(o.token_ids) == 32 and model.config.mask_id not in o.token_ids, policy
            assert o.stats.token_layers_computed <= r.stats.token_layers_computed, policy
            assert torch.isfinite(torch.tensor(o.stats.flops)) and o.stats.flops > 0


# ------------------------------------------------------------------------------------------------
# Static steps (CUDA graphs on GPUs): lifetime and the eager fallback
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["none", "prefix", "dual", "dllm_cache", "d2cache"])
def test_static_steps_are_freed_without_the_garbage_collector(policy, monkeypatch):
    """A generate() call's steps (on GPUs: graphs and their memory pool) are freed when it returns,
    by reference counting: left to the cyclic collector, an old graph could be destroyed while a new
    one is being captured, which CUDA forbids."""
    import gc
    import weakref

    from dllm_cache_core.cache import base

    refs = []
    init = base.StaticStep.__init__

    def tracking_init(self, *a, **k):
        init(self, *a, **k)
        refs.append(weakref.ref(self))

    monkeypatch.setattr(base.StaticStep, "__init__", tracking_init)
    model = decode_model("llada")[0]
    gc.disable()
    try:
        generate(model, [PROMPTS[0]], GenerationConfig(gen_length=32, block_length=16, steps=16,
                                                       stop_at_eos=False), CacheConfig(policy))
        assert refs, "the policy made no static steps"
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_failed_capture_falls_back_to_eager(monkeypatch):
    """If capturing a step fails (say, no memory left for its graph), it warns and runs eagerly:
    same tokens as the eager run."""
    import contextlib

    from dllm_cache_core.cache import base

    model = decode_model("llada")[0]
    gen = GenerationConfig(gen_length=32, block_length=16, steps=16, stop_at_eos=False)
    want = generate(model, PROMPTS[:2], gen, CacheConfig("dual"))

    @contextlib.contextmanager
    def failing_graph(*a, **k):
        raise torch.OutOfMemoryError("no memory for the graph pool")
        yield  # pragma: no cover

    monkeypatch.setattr(base, "use_cuda_graphs", lambda x: True)
    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.warns(RuntimeWarning, match="no memory for the graph pool"):
        got = generate(model, PROMPTS[:2], gen, CacheConfig("dual"))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_declared_exact_setting_equals_none(fam):
    """Each policy module's `exact` settings (its declaration) return the tokens of `none`."""
    from dllm_cache_core.cache.registry import declarations

    model = decode_model(fam)[0]
    checked = 0
    for mode in ("semi_ar", "threshold"):
        gen = _gen(mode)
        ref = [o.token_ids for o in generate(model, PROMPTS, gen, CacheConfig())]
        for decl in declarations():
            for setting in decl.exact:
                got = [o.token_ids for o in generate(model, PROMPTS, gen, CacheConfig(policy=decl.name, **setting))]
                assert got == ref, (decl.name, setting, mode)
                checked += 1
    assert checked >= 2 * 6  # none, prefix, dual, dllm_cache x2, d2cache
