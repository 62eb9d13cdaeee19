"""d2cache policy: exactness limit, batch invariance (idle rows included), selection helpers, cache
writes, stats. The tables in test_cache.py / test_stats.py cover it too; these are its own."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from dllm_cache_core import CacheConfig, GenerationConfig, generate, token_agreement  # noqa: E402

import dllm_cache_core.cache.d2cache as d2  # noqa: E402
from dllm_cache_core.cache.d2cache import D2Cache, inflate, nucleus, rollout_importance, stage1_pick  # noqa: E402
from dllm_cache_core.decoding.generate import DecodeLoop  # noqa: E402
from engine_fixtures import FAMILIES, PROMPTS, _one_torch_thread, decode_model  # noqa: E402,F401

EXACT = dict(current_k=64, rollout_p=1.0)


@pytest.fixture(scope="module")
def models():
    return {fam: decode_model(fam)[0] for fam in FAMILIES}


def tokens(outs):
    return [o.token_ids for o in outs]


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [("rollout_p", 1.5), ("rollout_p", 0.0), ("current_k", 0),
                                        ("current_k", 2.5), ("sigma", 0.0), ("inflate_w", -1),
                                        ("inflate_w", True)])
def test_bad_param_names_the_field(name, value):
    with pytest.raises(ValueError, match=f"cache.{name}"):
        CacheConfig(policy="d2cache", **{name: value})


def test_foreign_param_is_rejected_with_allowed_list():
    with pytest.raises(ValueError, match="refresh_interval.*rollout_p, current_k, sigma, inflate_w"):
        CacheConfig(policy="d2cache", refresh_interval=1)


def test_defaults():
    p = CacheConfig(policy="d2cache").params()
    assert p == {"rollout_p": 0.1, "current_k": 32, "sigma": 10.0, "inflate_w": None}


# -- exactness: everything recomputed every step == none ----------------------------------------
GEN_CASES = [
    dict(gen_length=32, steps=32),
    dict(gen_length=32, steps=16, block_length=8),
    dict(gen_length=32, threshold=0.05),
    dict(gen_length=32, block_length=8, threshold=0.05),
    dict(gen_length=32, steps=32, certainty_prior_sigma=10.0),
]


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("gkw", GEN_CASES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_full_selection_equals_none(models, fam, gkw):
    g = GenerationConfig(stop_at_eos=False, **gkw)
    ref = tokens(generate(models[fam], PROMPTS, g, CacheConfig("none")))
    got = tokens(generate(models[fam], PROMPTS, g, CacheConfig("d2cache", **EXACT)))
    assert got == ref


def test_full_selection_equals_none_sampling_and_cfg(models):
    g = GenerationConfig(gen_length=32, steps=16, block_length=16, cfg_scale=1.0, temperature=0.7,
                         stop_at_eos=False)
    m = models["llada"]
    assert tokens(generate(m, PROMPTS, g, CacheConfig("d2cache", **EXACT), seed=3)) == \
        tokens(generate(m, PROMPTS, g, CacheConfig("none"), seed=3))


# -- batch invariance with the default parameters ------------------------------------------------
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("gkw,k", [(dict(gen_length=64, certainty_prior_sigma=10.0), 8),
                                   (dict(gen_length=64, steps=32, block_length=16, threshold=0.3), 8),
                                   (dict(gen_length=32, steps=4, block_length=8, threshold=0.5), 32)],
                         ids=["one-block-prior", "semi-ar-threshold", "idle-rows"])
def test_batch_invariance(models, fam, gkw, k):
    """current_k 8 < block: stage-1 windows, block preference and stage 2 all matter. Threshold
    decoding with blocks: a row whose block is done idles while the others finish theirs (a step
    count that depends on the batch); an idle row must keep its state."""
    g, c = GenerationConfig(stop_at_eos=False, **gkw), CacheConfig("d2cache", current_k=k)
    batch = tokens(generate(models[fam], PROMPTS, g, c))
    alone = [tokens(generate(models[fam], [p], g, c))[0] for p in PROMPTS]
    assert batch == alone


# -- the K/V cache: preallocated, and only the selected positions are written ---------------------
def test_only_selected_positions_write_kv(models):
    m = models["dream"]
    g = GenerationConfig(gen_length=32, steps=16, block_length=8, stop_at_eos=False)
    loop = DecodeLoop(m, g, CacheConfig("d2cache", current_k=4), 0, slots=len(PROMPTS),
                      prompt_len=max(len(p) for p in PROMPTS))
    pol = loop.runner.policy
    assert isinstance(pol, D2Cache)
    ptrs = [(k.data_ptr(), v.data_ptr()) for k, v in pol.kv] + [pol.sel.data_ptr(), pol.conf.data_ptr()]
    checked, uneven = [], []
    orig = pol.forward

    def forward(x, step):
        sel = pol.sel.clone() if bool(pol.started.all()) else None
        before = [k.clone() for k, _ in pol.kv]
        out = orig(x, step)
        if sel is not None:
            counts = sel.sum(1)
            uneven.append(int(counts.min()) < int(counts.max()))  # some rows have invalid slots
            for b0, (k, _) in zip(before, pol.kv):
                assert torch.equal(k[~sel], b0[~sel])  # padding and unselected positions untouched
            # block positions whose prediction was not computed have zero logits
            q = step.starts.unsqueeze(1) + torch.arange(step.block_length) - pol.ctx.shift
            computed = sel[step.rows].gather(1, q)
            assert torch.all(out[~computed] == 0)
            checked.append(True)
        return out

    pol.forward = forward
    list(loop.run((i, i, p) for i, p in enumerate(PROMPTS)))
    assert len(checked) == 15 and any(uneven)
    assert ptrs == [(k.data_ptr(), v.data_ptr()) for k, v in pol.kv] + [pol.sel.data_ptr(), pol.conf.data_ptr()]


# -- helpers -------------------------------------------------------------------------------------
def dense_rollout(rows: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """The reference's T x T construction: rows (layers, T, T) attention rows, sel (layers, T) bool."""
    T = rows.shape[-1]
    eye = torch.eye(T, dtype=torch.float64)
    R = eye.clone()
    for a, s in zip(rows, sel):
        A = torch.where(s.unsqueeze(1), a, eye)
        M = A + eye
        M = M / M.sum(1, keepdim=True)
        R = M @ R
    return R.sum(0)


def test_rollout_vector_equals_dense_rollout():
    torch.manual_seed(0)
    T, nl = 12, 3
    rows = torch.rand(nl, T, T, dtype=torch.float64).softmax(-1)
    sel = torch.rand(T) < 0.4
    sel[3] = True
    slots = torch.nonzero(sel).squeeze(1)
    n = len(slots)
    # an extra invalid slot (weight 0) pointing at an unselected position must change nothing
    pad = int(torch.nonzero(~sel)[0])
    slots_p = torch.cat([slots, torch.tensor([pad])]).unsqueeze(0)
    weight = torch.cat([torch.ones(n), torch.zeros(1)]).unsqueeze(0)
    probs = [torch.cat([rows[i][slots], torch.rand(1, T, dtype=torch.float64)]).unsqueeze(0).float()
             for i in range(nl)]
    got = rollout_importance(probs, slots_p, weight, T)[0].double()
    ref = dense_rollout(rows, sel.expand(nl, T))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_nucleus_keeps_prefix_within_p_and_at_least_one():
    s = torch.tensor([[0.5, 0.3, 0.15, 0.05, 9.0]])
    cand = torch.tensor([[True, True, True, True, False]])
    assert nucleus(s, cand, 0.85).tolist() == [[True, True, False, False, False]]
    assert nucleus(s, cand, 0.1).tolist() == [[True, False, False, False, False]]
    assert nucleus(s, cand, 1.0).tolist() == cand.tolist()


def test_inflate_fills_gaps_up_to_w():
    sel = torch.tensor([[True, False, False, True, False, False, False, False, True]])
    assert inflate(sel, 3).tolist() == [[True] * 4 + [False] * 4 + [True]]
    assert inflate(sel, 5).tolist() == [[True] * 9]
    assert torch.equal(inflate(sel, 0), sel)


def test_stage1_window_and_block_preference():
    # G=8, blocks of 4; row 0 decodes block 0 (1 masked left), row 1 has block 0 done
    remaining = torch.tensor([[False, False, False, True, True, True, True, True],
                              [False, False, False, False, True, True, True, True]])
    score = torch.tensor([[0.0, 0.0, 0.0, 0.01, 0.9, 0.8, 0.1, 0.2]] * 2)
    pick = stage1_pick(remaining, score, k=2, block_length=4)
    # row 0: the block's masked token first, then the best of the next block (window ends there)
    assert pick[0].tolist() == [False, False, False, True, True, False, False, False]
    # row 1: the current block is block 1
    assert pick[1].tolist() == [False, False, False, False, True, True, False, False]
    # a row's pick does not depend on the other rows
    assert torch.equal(stage1_pick(remaining[1:], score[1:], 2, 4), pick[1:])


# -- stats -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", FAMILIES)
def test_flops_model_matches_counted_matmuls(models, fam):
    m = models[fam]
    cfg = m.config
    prompt = PROMPTS[0]
    g = GenerationConfig(gen_length=32, steps=16, block_length=16, stop_at_eos=False)
    lin_flops, layer_rows, forwards = [0.0], [], [0]
    hooks = [mod.register_forward_hook(
        lambda mod, i, o: lin_flops.__setitem__(0, lin_flops[0] + 2.0 * i[0][..., 0].numel() * mod.in_features
                                                * mod.out_features))
        for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    q_projs = [mod for name, mod in m.named_modules() if name.endswith("q_proj")]
    hooks += [q.register_forward_hook(lambda mod, i, o: layer_rows.append(i[0].shape[1])) for q in q_projs]
    hooks.append(m.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1)))
    try:
        with unpadded_slots():  # count exactly the real queries' matmuls
            st = generate(m, [prompt], g, CacheConfig("d2cache", current_k=4))[0].stats
    finally:
        for h in hooks:
            h.remove()
    L = len(prompt) + g.gen_length
    H, D = cfg.n_heads, cfg.head_dim
    r = torch.tensor(layer_rows, dtype=torch.float64)
    attn = (r * L * 4.0 * H * D).sum()
    overhead = (r * L * (2.0 * H * D + 5.0 * H) + 2.0 * r * L + 3.0 * r).sum()
    assert st.nfe == forwards[0] == 16
    assert st.token_layers_computed == int(r.sum())
    assert st.token_layers_computed < st.nfe * L * cfg.n_layers
    assert st.flops == pytest.approx(lin_flops[0] + float(attn + overhead), rel=1e-12)


@contextlib.contextmanager
def unpadded_slots():
    """Slot counts not rounded up (QUANTUM 1)."""
    old = d2.QUANTUM
    d2.QUANTUM = 1
    try:
        yield
    finally:
        d2.QUANTUM = old


@pytest.mark.parametrize("fam", FAMILIES)
def test_slot_padding_is_inert(models, fam):
    """Rounding the slot count up to QUANTUM (so that a few CUDA graphs serve every step) adds query
    slots that write only the trash row, produce no logits and carry no rollout weight: same tokens,
    same stats, for a batch with padding and different per-row counts."""
    g = GenerationConfig(gen_length=64, block_length=16, steps=32, stop_at_eos=False)
    prompts = [PROMPTS[0], PROMPTS[1][:5]]
    padded = generate(models[fam], prompts, g, CacheConfig("d2cache", current_k=4))
    with unpadded_slots():
        exact = generate(models[fam], prompts, g, CacheConfig("d2cache", current_k=4))
    for a, b in zip(padded, exact):
        assert a.token_ids == b.token_ids
        assert a.stats.token_layers_computed == b.stats.token_layers_computed
        assert a.stats.flops == pytest.approx(b.stats.flops, rel=1e-12)


@pytest.mark.parametrize("fam", FAMILIES)
def test_defaults_gen256_speedup_and_agreement(models, fam):
    """The paper's setting: one block, certainty-prior decoding (sigma 10), d2cache defaults; Dream
    ranks by top-1 probability (maskgit_plus) as the paper's evaluation does."""
    rem = "maskgit_plus" if fam == "dream" else None
    g = GenerationConfig(gen_length=256, certainty_prior_sigma=10.0, remasking=rem, stop_at_eos=False)
    ref = generate(models[fam], PROMPTS[:1], g, CacheConfig("none"))[0]
    out = generate(models[fam], PROMPTS[:1], g, CacheConfig("d2cache"))[0]
    agree = token_agreement(ref.token_ids, out.token_ids)
    print(f"\n{fam} d2cache defaults gen256: flops_speedup={out.stats.flops_speedup:.2f} "
          f"token_agreement_vs_none={agree:.3f}")
    assert ref.stats.flops_speedup == pytest.approx(1.0)
    assert out.stats.flops_speedup > 1
    assert out.stats.nfe == ref.stats.nfe == 256
