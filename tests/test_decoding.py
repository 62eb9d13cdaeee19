"""Decoding loop: schedules, commit rules (fixed, threshold, blocks), bad inputs, stop tokens, sampling
with per-row generators, CFG, and the text-level Engine."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dllm_cache_core import CacheConfig, Engine, GenerationConfig, generate  # noqa: E402
from dllm_cache_core.decoding.schedule import (  # noqa: E402
    certainty_density, dream_timesteps, dream_transfer_count, llada_transfer_counts)
from engine_fixtures import (PROMPTS, ForwardRecorder, _one_torch_thread, ckpt, decode_model,  # noqa: E402,F401
                             family, load_forced)


def run(family, prompts=PROMPTS, **gen_kw):
    model = decode_model(family)[0]
    gen_kw.setdefault("stop_at_eos", False)
    return generate(model, prompts, GenerationConfig(**gen_kw), seed=0)


# ================================================================================================
# Schedules
# ================================================================================================
def test_llada_counts_remainder_on_earliest_steps():
    assert llada_transfer_counts(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]
    got = llada_transfer_counts(torch.tensor([10, 7, 0, 4, 32]), 4).tolist()
    assert got == [[3, 3, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0], [1, 1, 1, 1], [8, 8, 8, 8]]
    assert llada_transfer_counts(torch.tensor([5]), 1).tolist() == [[5]]
    assert llada_transfer_counts(torch.tensor([3]), 5).tolist() == [[1, 1, 1, 0, 0]]
    for n in range(0, 40):
        for steps in (1, 2, 3, 7, 8, 16):
            c = llada_transfer_counts(torch.tensor([n]), steps)[0].tolist()
            assert sum(c) == n and max(c) - min(c) <= 1 and c == sorted(c, reverse=True)


def _dream_k_ref(n: int, i: int, steps: int, eps: float) -> int:
    """int(n * (1 - s / t)) in float32 (diffusion_generate), all that is left at the last step."""
    ts = np.linspace(1, eps, steps + 1).astype(np.float32)
    if i == steps - 1:
        return n
    t, s = np.float32(ts[i]), np.float32(ts[i + 1])
    return int(np.float32(n) * (np.float32(1) - s / t))


def test_dream_timesteps_and_counts():
    ts = dream_timesteps(8, 1e-3)
    assert ts.dtype == torch.float32 and ts.shape == (9,)
    assert float(ts[0]) == 1.0 and abs(float(ts[-1]) - 1e-3) < 1e-9
    torch.testing.assert_close(ts, torch.linspace(1, 1e-3, 9))
    for steps, n0 in ((8, 16), (16, 16), (5, 32), (4, 7), (12, 64)):
        ts = dream_timesteps(steps, 1e-3)
        n, ks = n0, []
        for i in range(steps):
            k = int(dream_transfer_count(torch.tensor([n]), i, steps, ts)[0])
            assert k == _dream_k_ref(n, i, steps, 1e-3), (steps, n0, i)
            ks.append(k)
            n -= k
        assert n == 0 and sum(ks) == n0
    # steps == gen_length: the first step commits 0 tokens, the last 2 (the reference's arithmetic)
    ts = dream_timesteps(16, 1e-3)
    n, ks = 16, []
    for i in range(16):
        k = int(dream_transfer_count(torch.tensor([n]), i, 16, ts)[0])
        ks.append(k)
        n -= k
    assert ks[0] == 0 and ks[-1] == 2


def test_dream_counts_are_per_row():
    """A row's count depends on its own masks only (not the batch mean, unlike the reference)."""
    ts = dream_timesteps(6, 1e-3)
    rows = torch.tensor([16, 3, 9, 0])
    for i in range(6):
        both = dream_transfer_count(rows, i, 6, ts).tolist()
        alone = [int(dream_transfer_count(rows[j:j + 1], i, 6, ts)[0]) for j in range(4)]
        assert both == alone


def _density_ref(decoded: list[bool], sigma: float) -> list[float]:
    """Direct sum: Gaussian-weighted indicator over [G ones (prompt side) | indicator | G copies of the
    last token's indicator], normalised by the kernel sum over offsets [-3G, 3G)."""
    G = len(decoded)
    ext = [1.0] * G + [float(d) for d in decoded] + [float(decoded[-1])] * G
    z = sum(np.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-3 * G, 3 * G))
    out = []
    for i in range(G):
        c = i + G
        out.append(sum(np.exp(-((c - j) ** 2) / (2 * sigma * sigma)) * ext[j] for j in range(3 * G)) / z)
    return out


@pytest.mark.parametrize("sigma", [1.0, 3.0, 10.0])
def test_certainty_density_direct_formula(sigma):
    g = torch.Generator().manual_seed(0)
    rows = [torch.rand(24, generator=g) < p for p in (0.0, 0.3, 0.7, 1.0)]
    rows[1][-1] = True
    rows[2][-1] = False
    dec = torch.stack(rows)
    got = certainty_density(dec, sigma)
    assert got.shape == (4, 24)
    for b in range(4):
        want = torch.tensor(_density_ref(dec[b].tolist(), sigma), dtype=torch.float32)
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-5)


def test_certainty_density_shape_semantics():
    G = 32
    none = certainty_density(torch.zeros(1, G, dtype=torch.bool), 2.0)[0]
    # nothing decoded: only the prompt side contributes; falls off left to right
    assert abs(float(none[0]) - 0.5) < 0.15 and float(none[-1]) < 1e-3
    assert torch.all(none[1:] <= none[:-1])
    full = certainty_density(torch.ones(1, G, dtype=torch.bool), 2.0)[0]
    torch.testing.assert_close(full, torch.ones(G), rtol=0, atol=1e-3)


# ================================================================================================
# Commit rules, observed through the canvas each forward receives (policy none, batch 1)
# ================================================================================================
def _canvases(family, prompt, **gen_kw):
    model = decode_model(family)[0]
    gen_kw.setdefault("stop_at_eos", False)
    with ForwardRecorder(model) as rec:
        out = generate(model, [prompt], GenerationConfig(**gen_kw))[0]
    final = torch.cat([torch.tensor(prompt), torch.tensor(out.token_ids)])
    return model, [x[0] for x in rec.inputs] + [final], out


@pytest.mark.parametrize("gen_length,block,steps", [(10, 10, 4), (20, 10, 8), (32, 8, 16)])
def test_llada_fixed_schedule_counts_and_block_order(gen_length, block, steps):
    prompt = PROMPTS[0]
    P = len(prompt)
    model, xs, out = _canvases("llada", prompt, gen_length=gen_length, block_length=block, steps=steps)
    mid = model.config.mask_id
    nb, spb = gen_length // block, steps // (gen_length // block)
    assert len(xs) == steps + 1
    want = llada_transfer_counts(torch.tensor([block]), spb)[0].tolist()
    for f in range(steps):
        b = f // spb
        s, e = P + b * block, P + (b + 1) * block
        committed = ((xs[f] == mid) & (xs[f + 1] != mid)).nonzero().flatten()
        assert committed.numel() == want[f % spb], (f, committed)
        assert all(s <= int(j) < e for j in committed), "committed outside the current block"
        assert bool((xs[f][e:] == mid).all()), "a later block holds a committed token"
        assert bool((xs[f][:P] == torch.tensor(prompt)).all())
    assert mid not in out.token_ids and len(out.token_ids) == gen_length


@pytest.mark.parametrize("gen_length,block,steps", [(16, 16, 8), (16, 16, 5), (24, 8, 9)])
def test_dream_fixed_schedule_counts(gen_length, block, steps):
    prompt = PROMPTS[1]
    P = len(prompt)
    model, xs, out = _canvases("dream", prompt, gen_length=gen_length, block_length=block, steps=steps,
                               remasking="maskgit_plus")
    mid = model.config.mask_id
    nb = gen_length // block
    spb = steps // nb
    f = 0
    for b in range(nb):
        s, e = P + b * block, P + (b + 1) * block
        n = block
        ks = []
        if nb > 1:  # block sampler: the first forward commits only the block's first position
            ks.append(1)
            n -= 1
            rng = range(1, spb)
        else:
            rng = range(spb)
        for i in rng:
            k = _dream_k_ref(n, i, spb, 1e-3)
            ks.append(k)
            n -= k
        for k in ks:
            committed = ((xs[f] == mid) & (xs[f + 1] != mid)).nonzero().flatten()
            assert committed.numel() == k, (b, f, ks)
            assert all(s <= int(j) < e for j in committed)
            f += 1
    assert f == len(xs) - 1
    assert mid not in out.token_ids


def _conf(family, model, x, s, e):
    """Token and confidence per block position from one full forward (Dream: shifted)."""
    with torch.no_grad():
        logits = model(x.unsqueeze(0))[0].float()
    if family == "dream":
        logits = torch.cat([logits[:1], logits[:-1]])
    lg = logits[s:e]
    probs = lg.softmax(-1)
    pick = lg.clone()
    pick[:, model.config.mask_id] = float("-inf")
    tok = pick.argmax(-1)
    return tok, probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("fam,gen_length,block,threshold", [
    ("llada", 16, 8, 0.5), ("llada", 16, 16, 0.45), ("dream", 16, 16, 0.7), ("dream", 12, 12, 0.85)])
def test_threshold_commit_rule(fam, gen_length, block, threshold):
    """Each step commits every masked block position with confidence >= threshold, and always the most
    confident one; each block runs until it has no mask; nothing beyond the block."""
    prompt = PROMPTS[2]
    P = len(prompt)
    model, xs, out = _canvases(fam, prompt, gen_length=gen_length, block_length=block,
                               steps=gen_length // block, threshold=threshold)
    mid = model.config.mask_id
    multi = 0
    for f in range(len(xs) - 1):
        b = next(b for b in range(gen_length // block) if bool((xs[f][P + b * block:P + (b + 1) * block] == mid).any()))
        s, e = P + b * block, P + (b + 1) * block
        tok, conf = _conf(fam, model, xs[f], s, e)
        masked = xs[f][s:e] == mid
        want = masked & (conf >= threshold)
        want[int(conf.masked_fill(~masked, -1).argmax())] = True
        got = (xs[f][s:e] == mid) & (xs[f + 1][s:e] != mid)
        assert torch.equal(got, want), (f, got, want, conf)
        assert torch.equal(xs[f + 1][s:e][got], tok[got])
        assert torch.equal(xs[f + 1][e:], xs[f][e:])
        multi += int(got.sum() > 1)
    assert multi >= 1, "no step committed more than one token: pick a lower threshold"
    assert mid not in out.token_ids and len(out.token_ids) == gen_length


# ================================================================================================
# Bad inputs
# ================================================================================================
@pytest.mark.parametrize("kw,field", [
    (dict(gen_length=30, block_length=8), "block_length"),
    (dict(gen_length=32, block_length=8, steps=6), "steps"),
    (dict(remasking="lowest"), "remasking"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=-0.5), "threshold"),
    (dict(threshold=1.01), "threshold"),
    (dict(gen_length=0), "gen_length"),
    (dict(steps=0), "steps"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(schedule="cosine"), "schedule"),
])
def test_generation_config_errors_name_field(kw, field):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**kw)


def test_generation_config_messages_list_allowed_values():
    with pytest.raises(ValueError) as e:
        GenerationConfig(remasking="lowest")
    assert "low_confidence" in str(e.value) and "entropy" in str(e.value)
    GenerationConfig(threshold=1.0)  # 1 is allowed
    assert GenerationConfig(gen_length=32, block_length=8, steps=8).steps_per_block == 2


def test_remasking_of_other_family(family):
    other = "entropy" if family == "llada" else "low_confidence"
    with pytest.raises(ValueError, match="remasking"):
        run(family, [PROMPTS[0]], gen_length=16, remasking=other)


def test_prompt_errors(family):
    model = decode_model(family)[0]
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[]], GenerationConfig(gen_length=16))
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(model, [PROMPTS[0], []], GenerationConfig(gen_length=16))
    too_long = [65] * (model.config.max_len - 16 + 1)
    with pytest.raises(ValueError, match="max") as e:
        generate(model, [too_long], GenerationConfig(gen_length=16))
    assert "gen_length" in str(e.value)
    generate(model, [[65] * (model.config.max_len - 16 - 8)], GenerationConfig(gen_length=16, steps=2))  # fits


def test_cache_config_errors():
    with pytest.raises(ValueError, match="cache.policy") as e:
        CacheConfig(policy="turbo")
    for name in ("none", "prefix", "dual"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="kp") as e:
        CacheConfig(policy="dual", kp=3)
    assert "refresh_interval" in str(e.value)
    with pytest.raises(ValueError, match="refresh_interval"):
        CacheConfig(policy="none", refresh_interval=2)
    with pytest.raises(ValueError, match="refresh_interval"):
        CacheConfig(policy="prefix", refresh_interval=0)


# ================================================================================================
# Stop tokens
# ================================================================================================
def test_stop_token_cut_and_finish_reason(family):
    gen = dict(gen_length=32, block_length=8, steps=16)
    base = run(family, **gen)
    # a token t and two rows i, j: t occurs in row i's output, nowhere in row j's (earliest such cut)
    picks = [(base[i].token_ids.index(t), i, j, t)
             for i in range(3) for j in range(3) if i != j
             for t in set(base[i].token_ids) - set(base[j].token_ids)]
    assert picks, "test model too repetitive for this check"
    cut, i, j, stop = min(picks)
    toks_i, toks_j = base[i].token_ids, base[j].token_ids
    out = run(family, [PROMPTS[i], PROMPTS[j]], stop_token_ids=[stop], stop_at_eos=True, **gen)
    assert out[0].token_ids == toks_i[:cut]
    assert out[0].stats.finish_reason == "stop"
    assert out[0].stats.num_generated_tokens == cut
    assert out[1].token_ids == toks_j and out[1].stats.finish_reason == "length"
    assert out[1].stats.num_generated_tokens == 32
    # the stopped row takes no part in the blocks after the one holding its stop token; the other row
    # keeps its whole schedule (4 blocks x 4 steps)
    assert out[0].stats.nfe == 4 * (cut // 8 + 1)
    assert out[1].stats.nfe == 16
    # stop_at_eos=False keeps everything
    keep = run(family, [PROMPTS[i]], stop_token_ids=[stop], stop_at_eos=False, **gen)
    assert keep[0].token_ids == toks_i and keep[0].stats.finish_reason == "length"


@pytest.mark.parametrize("which", ["eos", "eot"])
def test_all_rows_stopped_skips_blocks(family, which):
    """A model whose head strongly prefers EOS (or the end-of-turn token): every row stops in the first
    block, later blocks are skipped, and the stats show it."""
    model = load_forced(family, which)[0]
    stop_id = model.config.eos_id if which == "eos" else model.eot_id
    gen = dict(gen_length=32, block_length=8, steps=16)
    full = generate(model, PROMPTS, GenerationConfig(stop_at_eos=False, **gen))
    assert all(set(o.token_ids) == {stop_id} for o in full)
    out = generate(model, PROMPTS, GenerationConfig(**gen))  # default stop ids: EOS + end-of-turn
    for o, f in zip(out, full):
        assert o.token_ids == [] and o.stats.finish_reason == "stop"
        assert o.stats.num_generated_tokens == 0
        assert f.stats.nfe == 16 and o.stats.nfe == 4
        assert o.stats.steps < f.stats.steps
        assert o.stats.flops < f.stats.flops


def test_forced_model_threshold_and_dream_blocks(family):
    model = load_forced(family, "eos")[0]
    with ForwardRecorder(model, keep_inputs=False) as rec:
        out = generate(model, PROMPTS, GenerationConfig(gen_length=32, block_length=8, steps=4, threshold=0.9))
    assert all(o.token_ids == [] and o.stats.finish_reason == "stop" for o in out)
    assert rec.calls == out[0].stats.nfe < 8


@pytest.mark.parametrize("gen_kw", [dict(gen_length=16, steps=8), dict(gen_length=16, block_length=8, steps=4,
                                                                       threshold=0.9)])
def test_mask_token_never_committed(family, gen_kw):
    """A head that prefers the mask token everywhere: the sampler picks the best other token, the
    schedule still completes, and no mask id reaches the output."""
    model = load_forced(family, "mask")[0]
    mid = model.config.mask_id
    with torch.no_grad():
        x = torch.tensor([PROMPTS[0] + [mid] * 4])
        assert bool((model(x)[0].argmax(-1) == mid).all())  # the model really prefers [MASK]
    out = generate(model, PROMPTS, GenerationConfig(stop_at_eos=False, **gen_kw))
    for o in out:
        assert len(o.token_ids) == 16 and mid not in o.token_ids


def test_logits_eos_inf_never_generates_eos():
    model = load_forced("llada", "eos")[0]
    out = generate(model, PROMPTS[:2], GenerationConfig(gen_length=16, steps=8, logits_eos_inf=True,
                                                        stop_at_eos=False))
    for o in out:
        assert model.config.eos_id not in o.token_ids and len(o.token_ids) == 16


# ================================================================================================
# Sampling: per-row generators make outputs independent of batch composition
# ================================================================================================
SAMPLED = [
    ("llada", dict(temperature=0.8)),
    ("llada", dict(temperature=0.0, remasking="random")),
    ("llada", dict(temperature=1.0, block_length=8, threshold=0.5)),
    ("dream", dict(temperature=0.8, top_p=0.9)),
    ("dream", dict(temperature=1.0, top_k=20, remasking="entropy")),
    ("dream", dict(temperature=0.5, remasking="maskgit_plus", alg_temp=0.5)),
    ("dream", dict(temperature=0.0, remasking="origin")),
    # threshold decoding at a low temperature: rows finish their blocks after different numbers of
    # forwards, so a row sits out (inactive) while the others still decode its block
    ("llada", dict(gen_length=32, block_length=8, steps=4, temperature=0.2, threshold=0.4)),
    ("dream", dict(gen_length=32, block_length=8, steps=4, temperature=0.3, threshold=0.7)),
]


def _sampled_id(v):
    return v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items())


@pytest.mark.parametrize("fam,kw", SAMPLED, ids=_sampled_id)
def test_sampling_independent_of_batch(fam, kw):
    model = decode_model(fam)[0]
    kw = {"gen_length": 16, "steps": 8, **kw}
    gen = GenerationConfig(stop_at_eos=False, **kw)
    batch = generate(model, PROMPTS, gen, seed=7, row_ids=["a", "b", "c"])
    for i, rid in enumerate("abc"):
        alone = generate(model, [PROMPTS[i]], gen, seed=7, row_ids=[rid])[0]
        assert alone.token_ids == batch[i].token_ids, (rid, alone.token_ids, batch[i].token_ids)
    again = generate(model, [PROMPTS[2], PROMPTS[1]], gen, seed=7, row_ids=["c", "b"])
    assert again[1].token_ids == batch[1].token_ids and again[0].token_ids == batch[2].token_ids
    alone = generate(model, [PROMPTS[1]], gen, seed=7, row_ids=["b"])
    # sampling is really on: other seeds give other outputs
    others = {tuple(generate(model, [PROMPTS[1]], gen, seed=s, row_ids=["b"])[0].token_ids) for s in range(8, 12)}
    assert len(others | {tuple(alone[0].token_ids)}) > 1


# ================================================================================================
# CFG
# ================================================================================================
def test_cfg_unconditional_pass_masks_prompt():
    model = decode_model("llada")[0]
    gen = GenerationConfig(gen_length=16, steps=4, cfg_scale=1.5, stop_at_eos=False)
    with ForwardRecorder(model) as rec:
        out = generate(model, PROMPTS[:2], gen)
    assert rec.calls == 4
    mid = model.config.mask_id
    x = rec.inputs[0]
    P = max(len(p) for p in PROMPTS[:2])
    assert x.shape[0] == 4  # conditional and unconditional rows in one forward
    assert torch.equal(x[2:, P:], x[:2, P:])
    assert bool((x[2:, :P] == mid).all())
    assert out[0].stats.nfe == 8  # both passes count
    plain = generate(model, PROMPTS[:2], GenerationConfig(gen_length=16, steps=4, stop_at_eos=False))
    assert [o.token_ids for o in out] != [o.token_ids for o in plain]


# ================================================================================================
# Engine (text in, text out)
# ================================================================================================
@pytest.fixture(scope="module")
def llada_engine():
    return Engine.from_spec(str(ckpt("llada_dec")), generation=GenerationConfig(gen_length=16, steps=8,
                                                                                stop_at_eos=False))


def test_engine_text_and_chat(llada_engine):
    eng = llada_engine
    tok = eng.tokenizer
    outs = eng.generate(["Hello there", "1+2="])
    direct = generate(eng.model, [tok("Hello there")["input_ids"], tok("1+2=")["input_ids"]], eng.generation)
    for o, d in zip(outs, direct):
        assert o.error is None and o.error_type is None
        assert o.token_ids == d.token_ids and len(o.token_ids) == 16
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
        assert o.stats.num_prompt_tokens == d.stats.num_prompt_tokens
    msgs = [[{"role": "user", "content": "Hello there"}]]
    chat = eng.generate(msgs)
    ids = tok(tok.apply_chat_template(msgs[0], add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    assert chat[0].token_ids == generate(eng.model, [ids], eng.generation)[0].token_ids
    assert chat[0].stats.num_prompt_tokens == len(ids)
    via_flag = eng.generate(["Hello there"], chat_template=True)
    assert via_flag[0].token_ids == chat[0].token_ids


def test_engine_bad_rows_do_not_break_batch(llada_engine):
    eng = llada_engine
    rows = ["Hello there", "", None, 123, "a" * 2000, "   ", [], [{"role": "user"}], "1+2="]
    outs = eng.generate(rows)
    good = eng.generate(["Hello there", "1+2="])
    assert outs[0].token_ids == good[0].token_ids and outs[0].error is None
    assert outs[8].token_ids == good[1].token_ids and outs[8].error is None
    kinds = [o.error_type for o in outs]
    assert kinds[1] == "empty_prompt" and kinds[5] == "empty_prompt" and kinds[6] == "empty_prompt"
    assert kinds[2] in ("empty_prompt", "bad_input")
    assert kinds[3] == "bad_input" and kinds[7] == "bad_input"
    assert kinds[4] == "too_long"
    for i in (1, 2, 3, 4, 5, 6, 7):
        assert outs[i].error and outs[i].text is None and outs[i].token_ids == []
        assert outs[i].stats is None  # a row that failed before generation has no stats (pipeline writes nulls)
    all_bad = eng.generate(["", None])
    assert [o.error_type for o in all_bad][0] == "empty_prompt"


def test_engine_stream_matches_generate(llada_engine):
    """The streaming form: rows in, (row_id, output) out as rows finish, bad rows at once; a row's
    output is the one generate() gives it."""
    eng = llada_engine
    rows = ["Hello there", "", "1+2=", "a" * 60, "Why?", "ok"]
    want = dict(zip(range(len(rows)), eng.generate(rows)))
    got = dict(eng.stream(enumerate(rows), slots=2, prompt_len=40))
    assert sorted(got) == list(range(len(rows)))
    for i, w in want.items():
        if i == 3:  # 60 tokens do not fit this stream's 40-token canvas
            assert got[i].error_type == "too_long" and w.error is None
            continue
        assert (got[i].token_ids, got[i].error_type) == (w.token_ids, w.error_type)
        if w.stats is not None:
            assert got[i].stats.steps == w.stats.steps and got[i].stats.flops == w.stats.flops


def test_engine_keeps_its_decode_loop_across_calls():
    """Calls of one prompt bucket reuse the engine's loop (buffers and static steps; CUDA graphs on
    GPUs) and still give every row what a fresh generate() gives it."""
    model, tok = decode_model("llada")
    gen = GenerationConfig(gen_length=16, block_length=8, steps=8, threshold=0.5, stop_at_eos=False)
    eng = Engine(model, tok, gen, CacheConfig("dual"))
    first = eng.generate(["Hello there", "1+2="])
    loop = eng._loop[1]
    steps = dict(loop.runner.policy._steps)
    assert steps
    second = eng.generate(["1+2=", "Why not?"])
    assert eng._loop[1] is loop and all(loop.runner.policy._steps[k] is v for k, v in steps.items())
    want = generate(model, [tok(p)["input_ids"] for p in ("Hello there", "1+2=", "Why not?")], gen, CacheConfig("dual"))
    assert [o.token_ids for o in first + second[1:]] == [w.token_ids for w in want]
    assert second[0].token_ids == first[1].token_ids and second[0].stats.flops == first[1].stats.flops
    assert eng.generate(["x"])[0].token_ids == generate(model, [tok("x")["input_ids"]], gen, CacheConfig("dual"))[
        0].token_ids
    assert eng._loop[1] is loop  # fewer rows than slots: the kept loop serves
    eng.generate(["x"] * 3)  # more rows than slots: a new loop, the old one freed
    assert eng._loop[1] is not loop and not loop.runner.policy._steps


def test_engine_row_ids_with_sampling():
    model, tok = decode_model("dream")
    eng = Engine(model, tok, GenerationConfig(gen_length=16, steps=8, temperature=1.0, stop_at_eos=False),
                 CacheConfig(), seed=3)
    a = eng.generate(["first prompt", "", "second prompt"], row_ids=["x", "y", "z"])
    b = eng.generate(["second prompt"], row_ids=["z"])
    assert a[2].token_ids == b[0].token_ids
    assert a[1].error_type == "empty_prompt"


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_engine_decode_skips_special_tokens(fam):
    model, tok = load_forced(fam, "eos")
    eng = Engine(model, tok, GenerationConfig(gen_length=16, steps=8, stop_at_eos=False), CacheConfig())
    out = eng.generate(["Hi"])[0]
    assert out.token_ids == [model.config.eos_id] * 16
    assert out.text == ""
    eng2 = Engine(model, tok, GenerationConfig(gen_length=16, steps=8), CacheConfig())
    out2 = eng2.generate(["Hi"])[0]
    assert out2.token_ids == [] and out2.text == "" and out2.stats.finish_reason == "stop"
