"""Engine.open_stream: rows submitted while others decode join the running slots, and every row's tokens
and stats equal its alone run (fp32 CPU, a tiny random checkpoint; block budgets give rows different
lengths, as benchmarks do for random weights, so slots free up mid-generation)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from dllm_cache_core import CacheConfig, GenerationConfig  # noqa: E402
from dllm_cache_core.decoding.runner import Runner  # noqa: E402
from dllm_cache_core.engine import Engine, StepFailed  # noqa: E402
from engine_fixtures import SPECS, _one_torch_thread, ckpt  # noqa: E402,F401

GEN = dict(gen_length=32, block_length=8, steps=16, stop_at_eos=False)  # 4 blocks of 4 steps
SLOTS = 3
A = [("a0", "hello there"), ("a1", "the quick brown fox jumps"), ("a2", "1+2=")]
B = [("b0", "why"), ("b1", "abcdefghijk"), ("b2", "Math: ")]
C = [("c0", "zz top"), ("c1", "a longer prompt than most of the others here")]
BUDGET = {"a0": 1, "a1": 4, "a2": 4, "b0": 1, "b1": 1, "b2": 2, "c0": 2, "c1": 1}


@pytest.fixture(scope="module")
def engine():
    assert "llada_dec" in SPECS
    e = Engine.from_spec(str(ckpt("llada_dec")), GenerationConfig(**GEN), CacheConfig("dual"), seed=3)
    e.block_budget = BUDGET.get
    return e


def alone(engine, rows):
    """Each row by itself: a static batch of one (today's generate())."""
    single = Engine(engine.model, engine.tokenizer, GenerationConfig(scheduling="static", **GEN), engine.cache,
                    engine.seed)
    single.block_budget = engine.block_budget
    return {rid: single.generate([p], row_ids=[rid])[0] for rid, p in rows}


def same(out, want):
    d, w = out.stats.to_dict(), want.stats.to_dict()
    d.pop("latency_s"), w.pop("latency_s")
    return out.token_ids == want.token_ids and out.text == want.text and d == w


def test_rows_submitted_later_join_running_slots(engine):
    want = alone(engine, A + B + C)
    assert {o.stats.finish_reason for o in want.values()} == {"budget", "length"}
    finished: list[str] = []
    later: dict[str, object] = {}
    with engine.open_stream(slots=SLOTS) as st:
        fa = st.submit(A)
        for rid, f in zip([r for r, _ in A], fa):
            f.add_done_callback(lambda _, rid=rid: finished.append(rid))

        def submit_b(_):  # runs on the stepping thread as a0 finishes: a1 and a2 are still decoding
            for (rid, _), f in zip(B, st.submit(B)):
                later[rid] = f
                f.add_done_callback(lambda _, rid=rid: finished.append(rid))

        fa[0].add_done_callback(submit_b)
        outs = {rid: f.result(timeout=60) for (rid, _), f in zip(A, fa)}
        outs.update({rid: f.result(timeout=60) for rid, f in later.items()})
        steps_ab = st.steps
        fc = st.submit(C)  # after the stream drained: a later batch on the same stream
        outs.update({rid: f.result(timeout=60) for (rid, _), f in zip(C, fc)})
    assert set(outs) == set(want)
    for rid, out in outs.items():
        assert same(out, want[rid]), rid
    # b0 took a0's slot and finished while a1 and a2 were still decoding
    assert finished.index("b0") < finished.index("a1")
    # together: fewer engine steps than A's batch, then B's batch (every row needs budget x 4 steps)
    steps_a, steps_b = 4 * max(BUDGET[r] for r, _ in A), 4 * max(BUDGET[r] for r, _ in B)
    assert steps_ab < steps_a + steps_b, (steps_ab, steps_a, steps_b)


def test_bad_rows_and_exclusive_calls(engine):
    with engine.open_stream(slots=SLOTS, prompt_len=8) as st:
        f = st.submit([("e", ""), ("t", "x" * 40), ("ok", "1+2=")])
        assert (f[0].result(60).error_type, f[1].result(60).error_type) == ("empty_prompt", "too_long")
        # generate on the stepping thread, between rows: the stream goes on afterwards
        g = st.call(lambda: engine.generate(["why"], row_ids=["b0"])[0])
        h = st.submit([("b0", "why")])[0]
        assert same(h.result(60), g.result(60))
        assert same(f[2].result(60), alone(engine, [("ok", "1+2=")])["ok"])


def test_oom_retries_the_failing_steps_rows_in_halves(engine, monkeypatch):
    """A step with more than 1 row runs out of memory: the rows go back, decode 1 at a time and equal
    their alone runs; a row that runs out of memory alone resolves with StepFailed(oom)."""
    step = Runner.step
    calls = []

    def tight(self, plan):
        calls.append(len(plan.decode))
        rows = {r.row_id for r in plan.decode}
        if len(plan.decode) > 1 or "b1" in rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return step(self, plan)

    want = alone(engine, A + B)
    monkeypatch.setattr(Runner, "step", tight)
    with engine.open_stream(slots=SLOTS) as st:
        futs = st.submit(A + B)
        outs = {rid: f.exception(60) or f.result(60) for (rid, _), f in zip(A + B, futs)}
    err = outs.pop("b1")
    assert isinstance(err, StepFailed) and err.oom and "out of memory" in str(err)
    for rid, out in outs.items():
        assert same(out, want[rid]), rid
    # A's first step (3 rows), then A row by row; B's first step (3 rows), then B row by row
    assert st.oom_retries == 2 and calls.count(SLOTS) == 2 and set(calls) == {1, SLOTS}
    assert calls[0] == SLOTS and calls[1] == 1


def test_other_step_failures_fail_only_that_steps_rows(engine, monkeypatch):
    step = Runner.step

    def broken(self, plan):
        if any(r.row_id == "a1" for r in plan.decode):
            raise RuntimeError("kernel exploded (fake)")
        return step(self, plan)

    monkeypatch.setattr(Runner, "step", broken)
    with engine.open_stream(slots=1) as st:  # one slot: a1's step holds only a1
        futs = st.submit(A)
        errs = [f.exception(60) for f in futs]
    assert errs[0] is None and errs[2] is None
    assert isinstance(errs[1], StepFailed) and not errs[1].oom and errs[1].kind == "RuntimeError"


def test_out_of_memory_building_the_canvas_halves_the_slots(engine, monkeypatch):
    build = Engine.loop

    def small_only(self, slots, prompt_len):
        if slots > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (fake)")
        return build(self, slots, prompt_len)

    want = alone(engine, A)
    monkeypatch.setattr(Engine, "loop", small_only)
    engine._loop = None  # no kept loop to reuse
    with engine.open_stream(slots=4) as st:
        outs = {rid: f.result(60) for (rid, _), f in zip(A, st.submit(A))}
        assert st.slots == 1
    for rid, out in outs.items():
        assert same(out, want[rid]), rid
