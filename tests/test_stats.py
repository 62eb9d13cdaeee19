"""Per-sample stats: speedups, nfe against the forwards actually made, token_layers, and the FLOPs model
against the matmul FLOPs counted on a real run."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

from dllm_cache_core import CacheConfig, GenerationConfig, SampleStats, generate, token_agreement  # noqa: E402
from dllm_cache_core.cache import policy_names  # noqa: E402
from engine_fixtures import (FAMILIES, KNOWN_POLICIES, PROMPTS, ForwardRecorder,  # noqa: E402,F401
                             _one_torch_thread, decode_model, require_policy)

COLUMNS = ["num_prompt_tokens", "num_generated_tokens", "steps", "nfe", "tokens_per_step",
           "token_layers_computed", "flops", "flops_vanilla", "flops_speedup", "flops_speedup_total",
           "latency_s", "finish_reason"]


def test_stats_columns_are_the_design_table():
    assert [f.name for f in dataclasses.fields(SampleStats)] == COLUMNS
    assert list(SampleStats().to_dict()) == COLUMNS


def test_token_agreement():
    assert token_agreement([], []) == 1.0
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 9, 3]) == 0.5  # over the longer of the two
    assert token_agreement([1], []) == 0.0
    assert token_agreement([5, 6], [6, 5]) == 0.0


def _full_forward_flops(cfg, L: int, head_rows: int) -> float:
    """One uncached forward over L real tokens, written from the architecture (not from stats.py):
    per layer q/k/v/o projections and the three MLP matmuls per token, QK^T and AV per (query, key)
    pair and head, plus the LM head on the rows the sampler reads."""
    d, H, G, D, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size
    per_token = 2 * (d * H * D + 2 * d * G * D + H * D * d) + 2 * 3 * d * F
    attn = 2 * 2 * H * D * L * L
    return cfg.n_layers * (L * per_token + attn) + 2 * d * V * head_rows


# ================================================================================================
# `none`: the baseline columns
# ================================================================================================
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("gen_kw", [dict(gen_length=32, steps=32), dict(gen_length=32, block_length=8, steps=16),
                                    dict(gen_length=32, block_length=8, steps=4, threshold=0.5)],
                         ids=["steps=gen", "semi_ar", "threshold"])
def test_none_stats(fam, gen_kw):
    model = decode_model(fam)[0]
    cfg = model.config
    gen = GenerationConfig(stop_at_eos=False, **gen_kw)
    with ForwardRecorder(model, keep_inputs=False) as rec:
        outs = generate(model, PROMPTS, gen)
    BL = gen.block_len
    for p, o in zip(PROMPTS, outs):
        s = o.stats
        real = len(p) + 32
        assert s.num_prompt_tokens == len(p) and s.num_generated_tokens == 32
        assert s.flops_speedup == 1.0
        assert s.steps == s.nfe <= rec.calls
        assert s.tokens_per_step == pytest.approx(32 / s.steps)
        assert s.token_layers_computed == s.nfe * cfg.n_layers * real
        assert s.flops == pytest.approx(s.nfe * _full_forward_flops(cfg, real, BL), rel=1e-12)
        assert s.flops_vanilla == pytest.approx(s.flops, rel=1e-12)
        # flops_speedup_total: none at one token per step (steps = gen_length) over this run
        total = 32 * _full_forward_flops(cfg, real, BL)
        assert s.flops_speedup_total == pytest.approx(total / s.flops, rel=1e-12)
        if gen.threshold is None:
            assert s.nfe == gen.total_steps
        if gen.total_steps == 32 and gen.threshold is None:
            assert s.flops_speedup_total == pytest.approx(1.0)
        assert s.finish_reason == "length" and s.latency_s > 0
    if gen.threshold is not None:
        # the batch runs max-over-rows forwards per block; a row counts only those it took part in
        assert max(o.stats.nfe for o in outs) <= rec.calls
        assert any(o.stats.flops_speedup_total > 1 for o in outs)


def test_latency_share_follows_token_layers():
    model = decode_model("llada")[0]
    outs = generate(model, PROMPTS, GenerationConfig(gen_length=16, steps=8, stop_at_eos=False))
    tl = [o.stats.token_layers_computed for o in outs]
    lat = [o.stats.latency_s for o in outs]
    for i in range(1, 3):
        assert lat[i] / lat[0] == pytest.approx(tl[i] / tl[0], rel=1e-6)


def test_row_stats_do_not_depend_on_batch():
    """Padding is never counted: a row's counters are the same alone and in a padded batch."""
    model = decode_model("dream")[0]
    gen = GenerationConfig(gen_length=32, block_length=8, steps=16, stop_at_eos=False)
    for policy in policy_names():
        batch = generate(model, PROMPTS, gen, CacheConfig(policy=policy))
        for i, p in enumerate(PROMPTS):
            alone = generate(model, [p], gen, CacheConfig(policy=policy))[0].stats
            b = batch[i].stats
            assert (alone.nfe, alone.steps, alone.token_layers_computed) == (b.nfe, b.steps, b.token_layers_computed), policy
            assert alone.flops == pytest.approx(b.flops, rel=1e-9), policy
            assert alone.flops_vanilla == pytest.approx(b.flops_vanilla, rel=1e-12), policy


# ================================================================================================
# nfe == forwards actually made
# ================================================================================================
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("policy", KNOWN_POLICIES)
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_nfe_counts_real_forwards(policy, fam, threshold):
    require_policy(policy)
    model = decode_model(fam)[0]
    gen = GenerationConfig(gen_length=32, block_length=8, steps=16, threshold=threshold, stop_at_eos=False)
    with ForwardRecorder(model, keep_inputs=False) as rec:
        out = generate(model, [PROMPTS[0]], gen, CacheConfig(policy=policy))[0]
    assert out.stats.nfe == rec.calls
    assert out.stats.steps == rec.calls


def test_nfe_counts_both_cfg_passes():
    model = decode_model("llada")[0]
    gen = GenerationConfig(gen_length=16, steps=8, cfg_scale=1.0, stop_at_eos=False)
    with ForwardRecorder(model, keep_inputs=False) as rec:
        out = generate(model, [PROMPTS[0]], gen)[0]
    assert rec.calls == 8
    assert out.stats.nfe == 2 * rec.calls and out.stats.steps == 8
    real = len(PROMPTS[0]) + 16
    assert out.stats.token_layers_computed == 2 * 8 * model.config.n_layers * real
    assert out.stats.flops_speedup == pytest.approx(1.0)


# ================================================================================================
# Speedups on a gen-256 / block-32 generation
# ================================================================================================
# policy -> (cache parameters, generation overrides); "d2cache_paper" is the d2Cache paper's setting
SPEEDUP = {
    "prefix": ({}, {}),
    "dual": ({}, {}),
    "dllm_cache": ({}, {}),
    "d2cache": ({}, {}),                                                   # semi-AR, inflate_w 4
    "d2cache_paper": ({}, dict(block_length=None, certainty_prior_sigma=10.0)),  # one block
}


@pytest.fixture(scope="module")
def gen256_none():
    out = {}
    for fam in FAMILIES:
        model = decode_model(fam)[0]
        gen = GenerationConfig(gen_length=256, block_length=32, steps=256, stop_at_eos=False)
        out[fam] = generate(model, [PROMPTS[1]], gen)[0]
    return out


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("entry", list(SPEEDUP))
def test_cached_policies_speed_up_gen256(entry, fam, gen256_none):
    policy = entry.replace("_paper", "")
    require_policy(policy)
    params, over = SPEEDUP[entry]
    model = decode_model(fam)[0]
    gen_kw = dict(gen_length=256, block_length=32, steps=256, stop_at_eos=False)
    gen_kw.update(over)
    out = generate(model, [PROMPTS[1]], GenerationConfig(**gen_kw), CacheConfig(policy=policy, **params))[0]
    s = out.stats
    assert s.nfe == 256
    assert s.flops_speedup > 1.0, (entry, s)
    assert s.flops_speedup == pytest.approx(s.flops_vanilla / s.flops)
    assert s.token_layers_computed < gen256_none[fam].stats.token_layers_computed
    if gen_kw["block_length"] == 32:
        # same schedule as `none`: the same vanilla cost
        assert s.flops_vanilla == pytest.approx(gen256_none[fam].stats.flops_vanilla, rel=1e-12)
    n = gen256_none[fam].stats
    assert n.flops_speedup == 1.0


# ================================================================================================
# The FLOPs model against counted matmul FLOPs
# ================================================================================================
def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA SDPA kernels but not the CPU flash kernel; teach it that one
CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}

# Tolerance per policy. Both sides count the same operations: every nn.Linear matmul (bias adds are
# not matmuls and are excluded by both), QK^T and AV as 2 * head_dim FLOPs per (query, key, head)
# each, and the LM head on the rows read. RMSNorm, RoPE, softmax, SiLU and residual adds are
# elementwise, in neither count. At batch 1 there is no padding, so for none/prefix/dual the two
# numbers must agree to float64 rounding.
# dllm_cache: the model prices its selection overhead as the V projection of the response tokens not
# recomputed plus the cosine similarity (6 FLOPs per V element, elementwise, so not counted), while the
# code projects V of every response token and then runs the full q/k/v of the selected ones again:
# the model is n_sel * 2 * d * kv_dim per layer and forward below the count (measured -0.24% .. -0.41%
# on these runs); allow 1%.
# d2cache: the model adds the fp32 attention-probability recomputation (QK^T is a counted matmul;
# scale/exp/sum/div/head-mean are priced at 5 FLOPs per pair and head but are elementwise) and the
# rollout vector products (counted bmm): measured +0.5% .. +1.0% over the count; allow 3%.
FLOPS_TOL = {"none": 1e-9, "prefix": 1e-9, "dual": 1e-9, "dllm_cache": 0.01, "d2cache": 0.03}


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("policy", KNOWN_POLICIES)
def test_flops_model_matches_counted_matmuls(policy, fam, monkeypatch):
    require_policy(policy)
    if policy == "d2cache":  # the stats count real queries; slot padding (tested inert elsewhere) off
        import dllm_cache_core.cache.d2cache as d2
        monkeypatch.setattr(d2, "QUANTUM", 1)
    model = decode_model(fam)[0]
    gen = GenerationConfig(gen_length=64, block_length=16, steps=32, stop_at_eos=False)
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM)
    with counter:
        out = generate(model, [PROMPTS[0]], gen, CacheConfig(policy=policy))[0]
    counted = counter.get_total_flops()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert any("attention" in k for k in by_op), by_op  # the attention kernel was counted
    assert out.stats.flops == pytest.approx(counted, rel=FLOPS_TOL[policy]), (by_op, out.stats.flops)
    if policy == "none":
        assert out.stats.flops_vanilla == pytest.approx(counted, rel=1e-9)


def test_flops_counted_threshold_and_cfg():
    """The same check with data-dependent step counts and with CFG's unconditional pass."""
    model = decode_model("llada")[0]
    for gen in (GenerationConfig(gen_length=32, block_length=8, steps=4, threshold=0.5, stop_at_eos=False),
                GenerationConfig(gen_length=32, steps=16, cfg_scale=1.0, stop_at_eos=False)):
        for policy in ("none", "dual"):
            counter = FlopCounterMode(display=False, custom_mapping=CUSTOM)
            with counter:
                out = generate(model, [PROMPTS[1]], gen, CacheConfig(policy=policy))[0]
            assert out.stats.flops == pytest.approx(counter.get_total_flops(), rel=1e-9), (gen, policy)
