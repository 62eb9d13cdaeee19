"""Continuous batching: a row's tokens and stats are a function of the row alone.

Each row run alone (static scheduling, batch of one: today's generate()) is compared with the same
row inside a continuously refilled batch: more rows than slots, mixed prompt lengths, rows that stop
early (so slots are refilled mid-generation while the other rows are at other blocks and steps).
Exact tokens and identical stats (all but the wall-clock latency), fp32 on CPU, every policy, both
families, fixed and threshold schedules; plus CFG, sampling, static scheduling with several batches,
the streaming order and the utilisation counters.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import functools  # noqa: E402
from collections import Counter  # noqa: E402

import pytest  # noqa: E402

from dllm_cache_core import CacheConfig, GenerationConfig, generate  # noqa: E402
from dllm_cache_core.decoding.generate import stream  # noqa: E402
from dllm_cache_core.decoding.scheduler import Row, Scheduler  # noqa: E402
from engine_fixtures import FAMILIES, KNOWN_POLICIES, _one_torch_thread, decode_model, require_policy  # noqa: E402,F401

# mixed lengths (2..15 tokens), more rows than the 3 slots used below
ROWS = [
    [72, 101, 108, 108, 111, 44, 32, 119],
    [84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110],
    [49, 43, 50],
    [87, 104, 121],
    [97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107],
    [50, 42],
    [77, 97, 116, 104, 58, 32],
]
SLOTS = 3
MODES = {
    "fixed": dict(gen_length=32, block_length=8, steps=16),
    "threshold": dict(gen_length=32, block_length=8, steps=4, threshold=0.5),
}
POLICY_PARAMS = {"d2cache": dict(current_k=4), "prefix": dict(refresh_interval=3)}


def stats_of(out) -> dict:
    d = out.stats.to_dict()
    d.pop("latency_s")
    return d


@functools.lru_cache(maxsize=None)
def stop_token(fam: str, policy: str, mode: str, extra: tuple = ()) -> int:
    """A token that ends some rows' outputs after their first block but not all rows': found from the
    rows' alone outputs without stopping, so that the continuous batch refills slots mid-generation."""
    model = decode_model(fam)[0]
    gen = GenerationConfig(stop_at_eos=False, scheduling="static", **MODES[mode], **dict(extra))
    cache = CacheConfig(policy=policy, **POLICY_PARAMS.get(policy, {}))
    outs = [generate(model, [p], gen, cache, seed=3, row_ids=[i])[0].token_ids for i, p in enumerate(ROWS)]
    BL = gen.block_len
    # rows whose first occurrence of t lies past the first block, and rows where t never occurs
    score = Counter()
    for t in {t for o in outs for t in o}:
        first = [o.index(t) if t in o else None for o in outs]
        late = sum(1 for f in first if f is not None and f >= BL)
        never = sum(1 for f in first if f is None)
        if all(f is None or f >= BL for f in first) and late and never:
            score[t] = min(late, never)
    assert score, "no token stops some rows late and others never: the test would not refill slots"
    return score.most_common(1)[0][0]


def run_pair(fam: str, policy: str, mode: str, **extra):
    model = decode_model(fam)[0]
    stop = stop_token(fam, policy, mode, tuple(sorted(extra.items())))
    base = dict(stop_token_ids=(stop,), **MODES[mode], **extra)
    cache = CacheConfig(policy=policy, **POLICY_PARAMS.get(policy, {}))
    ids = [f"r{i}" for i in range(len(ROWS))]
    alone = [generate(model, [p], GenerationConfig(scheduling="static", **base), cache, seed=3, row_ids=[rid])[0]
             for rid, p in zip(ids, ROWS)]
    batch = generate(model, ROWS, GenerationConfig(scheduling="continuous", slots=SLOTS, **base), cache, seed=3,
                     row_ids=ids)
    return alone, batch


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("policy", KNOWN_POLICIES)
def test_row_alone_equals_row_in_refilled_batch(policy, fam, mode):
    require_policy(policy)
    alone, batch = run_pair(fam, policy, mode)
    reasons = [o.stats.finish_reason for o in alone]
    assert "stop" in reasons and "length" in reasons, reasons  # slots are refilled mid-generation
    for i, (a, b) in enumerate(zip(alone, batch)):
        assert b.token_ids == a.token_ids, (i, a.token_ids, b.token_ids)
        assert stats_of(b) == stats_of(a), i


@pytest.mark.parametrize("policy", KNOWN_POLICIES)
def test_refilled_batch_cfg(policy):
    alone, batch = run_pair("llada", policy, "fixed", cfg_scale=1.0)
    for a, b in zip(alone, batch):
        assert b.token_ids == a.token_ids
        assert stats_of(b) == stats_of(a)
        assert b.stats.nfe == 2 * b.stats.steps


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("policy", ["dual", "dllm_cache", "d2cache"])
def test_refilled_batch_sampling(policy, fam):
    """temperature > 0: a row draws only from its own generator, only on its own steps."""
    alone, batch = run_pair(fam, policy, "threshold", temperature=0.8)
    for a, b in zip(alone, batch):
        assert b.token_ids == a.token_ids
        assert stats_of(b) == stats_of(a)


@pytest.mark.parametrize("policy", ["none", "dual", "d2cache"])
def test_static_scheduling_several_batches(policy):
    """Static scheduling with fewer slots than rows: batch after batch, the same rows' results."""
    model = decode_model("dream")[0]
    gen = GenerationConfig(stop_at_eos=False, **MODES["threshold"])
    cache = CacheConfig(policy=policy, **POLICY_PARAMS.get(policy, {}))
    want = generate(model, ROWS, gen, cache)
    for slots in (2, 3):
        got = generate(model, ROWS, GenerationConfig(stop_at_eos=False, scheduling="static", slots=slots,
                                                     **MODES["threshold"]), cache)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [stats_of(o) for o in got] == [stats_of(o) for o in want]


def test_stream_yields_rows_as_they_finish():
    """Rows are read lazily, results come out as rows finish, with their index and id, and while rows
    are queued every slot decodes (fixed schedule: no row ever waits)."""
    model = decode_model("llada")[0]
    stop = stop_token("llada", "dual", "fixed")
    gen = GenerationConfig(stop_token_ids=(stop,), **MODES["fixed"])
    pulled = []

    def rows():
        for i, p in enumerate(ROWS):
            pulled.append(i)
            yield f"id{i}", p

    loops: list = []
    seen = []
    for index, rid, out in stream(model, rows(), gen, CacheConfig("dual"), slots=SLOTS, prompt_len=16,
                                  loop_out=loops):
        seen.append(index)
        assert rid == f"id{index}"
        assert len(pulled) <= len(seen) + SLOTS + 1  # never reads far ahead of the free slots
    assert sorted(seen) == list(range(len(ROWS)))
    u = loops[0].utilisation
    assert u.while_queued == 1.0
    assert u.drain is not None and u.drain < 1.0
    want = generate(model, ROWS, GenerationConfig(scheduling="static", stop_token_ids=(stop,), **MODES["fixed"]),
                    CacheConfig("dual"))
    got = {i: o for i, _, o in stream(model, [(f"id{i}", p) for i, p in enumerate(ROWS)], gen, CacheConfig("dual"),
                                      slots=SLOTS)}
    assert [got[i].token_ids for i in range(len(ROWS))] == [o.token_ids for o in want]


def test_static_utilisation_counts_waiting_rows():
    """Threshold decoding in a static batch: rows that finished their block wait; continuous does not."""
    model = decode_model("llada")[0]
    outs = {}
    for sched in ("static", "continuous"):
        loops: list = []
        gen = GenerationConfig(scheduling=sched, stop_at_eos=False, **MODES["threshold"])
        outs[sched] = [o for _, _, o in stream(model, [(i, p) for i, p in enumerate(ROWS)], gen, CacheConfig("dual"),
                                               slots=len(ROWS), loop_out=loops)]
        outs[sched + "_u"] = loops[0].utilisation
    useful = sum(o.stats.steps for o in outs["static"])
    assert useful == sum(o.stats.steps for o in outs["continuous"])
    us, uc = outs["static_u"], outs["continuous_u"]
    assert us.overall == pytest.approx(useful / (len(ROWS) * us.engine_steps))
    assert us.engine_steps > max(o.stats.steps for o in outs["static"]) - 1
    assert uc.engine_steps == max(o.stats.steps for o in outs["continuous"])


def test_scheduler_admission_and_release():
    s = Scheduler(2, num_blocks=2, mode="continuous")
    rows = [Row(index=i, row_id=i, prompt=[1]) for i in range(3)]
    for r in rows:
        s.add(r)
    assert [r.slot for r in s.admit()] == [0, 1]
    plan = s.plan()
    assert [r.index for r in plan.decode] == [0, 1] and plan.queued == 1
    s.complete(rows[0], block_done=True, stop=True)   # row 0 stops in its first block
    s.complete(rows[1], block_done=True, stop=False)  # row 1 goes on with its second block
    assert [r.index for r in s.release()] == [0]
    assert (rows[1].block, rows[1].step) == (1, 0)
    assert [r.slot for r in s.admit()] == [0] and rows[2].slot == 0
    st = Scheduler(2, num_blocks=2, mode="static")
    for r in [Row(index=i, row_id=i, prompt=[1]) for i in range(3)]:
        st.add(r)
    a, b = st.admit()
    st.complete(a, block_done=True, stop=False)
    st.complete(b, block_done=False, stop=False)
    assert st.release() == [] and a.block_done and a.block == 0  # waits for the batch
    assert [r.index for r in st.plan().ride] == [0]
    st.complete(b, block_done=True, stop=False)
    assert st.release() == [] and a.block == b.block == 1
    assert st.admit() == []  # static: no admission into a running batch
    with pytest.raises(ValueError, match="scheduling"):
        Scheduler(2, 1, mode="dynamic")


def test_generation_config_scheduling_fields():
    with pytest.raises(ValueError, match="scheduling"):
        GenerationConfig(scheduling="eager")
    with pytest.raises(ValueError, match="slots"):
        GenerationConfig(slots=0)
    assert GenerationConfig().scheduling == "continuous"


def test_prompt_buckets_keep_order_and_results():
    """Continuous generate() groups rows by prompt-width bucket (a canvas per group): outputs stay in
    input order and equal the static batch's."""
    from dllm_cache_core.decoding.generate import generate_rows, prompt_bucket

    assert [prompt_bucket(n) for n in (1, 64, 65, 128, 129)] == [64, 64, 128, 128, 256]
    model = decode_model("dream")[0]
    rows = [ROWS[0], [65 + (i % 26) for i in range(90)], ROWS[2], [97 + (i % 26) for i in range(70)]]
    gen = dict(stop_at_eos=False, **MODES["threshold"])
    want = generate(model, rows, GenerationConfig(scheduling="static", **gen), CacheConfig("dual"))
    # slots=1: both width groups fill their slot twice; slots=2: the narrow group joins the wide one
    for slots, widths in ((1, [8, 90]), (2, [90])):
        loops: list = []
        got = generate_rows(model, rows, GenerationConfig(slots=slots, **gen), CacheConfig("dual"), loops_out=loops)
        assert sorted(lp.prompt_len for lp in loops) == widths
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [stats_of(o) for o in got] == [stats_of(o) for o in want]
