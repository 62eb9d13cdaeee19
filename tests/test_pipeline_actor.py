"""GenerationActor without Ray: length grouping, per-row errors, OOM split-and-retry, audit, scoring.

A fake engine checks the actor's own logic exactly (which calls, which sizes); the real engine on a
tiny random checkpoint checks the bad-row contract end to end.
"""
from __future__ import annotations

import functools

import pyarrow as pa
import pytest
import torch

from dllm_cache_core.engine import TextOutput
from dllm_cache_core.stats import SampleStats
from pipeline.actor import ActorConfig, GenerationActor
from pipeline.audit import is_audited
from pipeline.schema import INPUT_ERROR, output_schema


class FakeEngine:
    """Echo engine: text = prompt upper-cased; raises OOM above `max_batch` rows or on 'OOM' prompts."""

    def __init__(self, max_batch=None, policy="dual"):
        self.max_batch, self.policy, self.calls = max_batch, policy, []

    def generate(self, prompts, row_ids=None, chat_template=False):
        self.calls.append(list(prompts))
        if (self.max_batch and len(prompts) > self.max_batch) or "OOM" in prompts:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        if "BOOM" in prompts:
            raise RuntimeError("kernel exploded (fake)")
        outs = []
        for p in prompts:
            if p is None or p == "":
                outs.append(TextOutput(error="empty prompt", error_type="empty_prompt"))
                continue
            text = p if isinstance(p, str) else "|".join(m["content"] for m in p)
            ids = [ord(c) for c in text] if self.policy == "none" else [ord(c) for c in text[:-1]] + [0]
            outs.append(TextOutput(text=text.upper(), token_ids=ids,
                                   stats=SampleStats(num_prompt_tokens=len(text), num_generated_tokens=len(ids),
                                                     flops_speedup=2.0, finish_reason="length")))
        return outs

    def with_cache(self, policy):
        return FakeEngine(self.max_batch, policy)

    def model_fingerprint(self):
        return "fake"


def fake_factory(cfg, **kw):
    return FakeEngine(**kw)


def _config(schema, factory=fake_factory, **over):
    base = dict(model_path="fake", family="auto", dtype="float32", device="cpu", seed=0,
                generation={"gen_length": 16, "block_length": 8}, cache={"policy": "dual"}, prompt_column="prompt",
                messages_column=None, chat_template=False, id_column="id", batch_size=2, audit_fraction=0.0,
                evaluation=None, schema=schema, model_label="fake", engine_factory=factory)
    base.update(over)
    return ActorConfig(**base)


def _batch(prompts, extra=None, input_errors=None):
    cols = {"id": [f"id{i}" for i in range(len(prompts))], "prompt": pa.array(prompts, pa.string())}
    cols.update(extra or {})
    cols[INPUT_ERROR] = pa.array(input_errors or [None] * len(prompts), pa.string())
    return pa.table(cols)


def test_groups_by_length_keeps_order_and_rows():
    prompts = ["ccc", "a", "eeeee", "bb", "dddd"]
    b = _batch(prompts)
    actor = GenerationActor(_config(output_schema(b.schema)))
    out = actor(b)
    assert out.num_rows == 5 and out.column("id").to_pylist() == [f"id{i}" for i in range(5)]
    assert out.column("generation").to_pylist() == [p.upper() for p in prompts]
    # engine calls of batch_size rows, each of similar lengths (sorted), none larger than 2
    assert actor.engine.calls == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]
    assert out.column("cache_policy").to_pylist() == ["dual"] * 5
    assert out.schema == output_schema(b.schema)


def test_oom_splits_the_call_and_retries_halves():
    b = _batch(["aaaa", "bbbb", "cccc", "dddd"])
    actor = GenerationActor(_config(output_schema(b.schema), functools.partial(fake_factory, max_batch=1), batch_size=4))
    out = actor(b)
    assert out.column("error_type").to_pylist() == [None] * 4
    assert [len(c) for c in actor.engine.calls] == [4, 2, 1, 1, 2, 1, 1]


def test_single_row_oom_and_exceptions_become_error_rows():
    b = _batch(["fine", "OOM", "BOOM", "also fine"])
    actor = GenerationActor(_config(output_schema(b.schema), batch_size=4))
    out = actor(b).to_pylist()
    kinds = {r["prompt"]: (r["error_type"], r["finish_reason"]) for r in out}
    assert kinds == {"fine": (None, "length"), "OOM": ("oom", "error"), "BOOM": ("generation", "error"),
                     "also fine": (None, "length")}
    boom = next(r for r in out if r["prompt"] == "BOOM")
    assert "kernel exploded" in boom["error"] and boom["generation"] is None and boom["flops_speedup"] is None


def test_input_errors_and_bad_messages_never_reach_the_engine():
    msgs = pa.array([[{"role": "user", "content": b"hi"}], [{"role": "user", "content": b"\xff\xfe"}],
                     None, [{"role": "user", "content": b"x"}]],
                    pa.list_(pa.struct([("role", pa.string()), ("content", pa.binary())])))
    b = pa.table({"id": ["a", "b", "c", "d"], "messages": msgs,
                  INPUT_ERROR: pa.array([None, None, None, "line 4: not valid JSON"], pa.string())})
    actor = GenerationActor(_config(output_schema(b.schema), messages_column="messages", batch_size=8))
    out = actor(b).to_pylist()
    assert [r["error_type"] for r in out] == [None, "bad_input", "empty_prompt", "bad_input"]
    assert "messages[0].content is not valid UTF-8" in out[1]["error"]
    assert out[3]["error"] == "line 4: not valid JSON"
    assert out[0]["generation"] == "HI"
    assert actor.engine.calls == [[None, [{"role": "user", "content": "hi"}]]]


def test_audit_rows_run_twice_and_get_agreement():
    ids = [f"row-{i}" for i in range(40)]
    b = pa.table({"id": ids, "prompt": [f"prompt {i}" for i in range(40)]})
    actor = GenerationActor(_config(output_schema(b.schema), audit_fraction=0.25, batch_size=8))
    out = actor(b).to_pylist()
    audited = [r for r in out if r["audit_token_agreement"] is not None]
    expected = [i for i in ids if is_audited(i, 0.25)]
    assert [r["id"] for r in audited] == expected and 0 < len(expected) < 40
    for r in audited:  # the fake 'none' engine differs in the last token only
        n = len(r["prompt"])
        assert r["audit_token_agreement"] == pytest.approx((n - 1) / n)
        assert r["audit_speedup"] > 0
    assert all(r["audit_speedup"] is None for r in out if r["id"] not in expected)


def test_evaluation_scores_rows():
    b = _batch(["the answer is 42", "no idea", ""], extra={"answer": ["#### 42", "7", "1"]})
    actor = GenerationActor(_config(output_schema(b.schema), evaluation={"answer_column": "answer", "scorer": "gsm8k"}))
    out = actor(b).to_pylist()
    assert [r["score"] for r in out] == [1.0, 0.0, None]
    assert [r["extracted_answer"] for r in out] == ["42", None, None]


def _fail(cfg):
    raise OSError("no such file: /models/missing/config.json")


def test_model_load_failure_message():
    with pytest.raises(RuntimeError, match=r"model 'fake' failed to load on .*OSError: no such file"):
        GenerationActor(_config(output_schema(pa.schema([("id", pa.string()), ("prompt", pa.string())])), _fail))


# ----------------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def tiny_llada(tmp_path_factory):
    from dllm_cache_core.models.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "llada", family="llada"))


def test_real_engine_bad_rows_and_audit_agreement(tiny_llada):
    prompts = ["hello there", "", None, "x" * 3000, "a normal prompt"]
    b = _batch(prompts, input_errors=[None, None, None, None, None])
    cfg = _config(output_schema(b.schema), factory=None, model_path=tiny_llada, cache={"policy": "none"},
                  audit_fraction=1.0, batch_size=4)
    out = GenerationActor(cfg)(b).to_pylist()
    assert [r["error_type"] for r in out] == [None, "empty_prompt", "empty_prompt", "too_long", None]
    for r in (out[0], out[4]):
        assert isinstance(r["generation"], str) and len(r["generation_token_ids"]) == r["num_generated_tokens"] > 0
        assert r["nfe"] > 0 and r["flops"] > 0 and r["finish_reason"] in ("stop", "length")
        # policy none audited against none: greedy decoding must agree token for token
        assert r["audit_token_agreement"] == 1.0 and r["audit_speedup"] > 0
    assert out[3]["generation"] is None and "tokens" in out[3]["error"]


def test_real_engine_chat_template_and_json_messages(tiny_llada):
    b = pa.table({"id": ["p", "m"], "prompt": ["hello there", None],
                  "messages": ['[{"role": "user", "content": "hello there"}]', None]})
    schema = output_schema(b.schema)
    plain = GenerationActor(_config(schema, factory=None, model_path=tiny_llada, cache={"policy": "none"}))(b.select(["id", "prompt"]))
    templ = GenerationActor(_config(schema, factory=None, model_path=tiny_llada, cache={"policy": "none"},
                                    chat_template=True))(b.select(["id", "prompt"]))
    msgs = GenerationActor(_config(schema, factory=None, model_path=tiny_llada, cache={"policy": "none"},
                                   messages_column="messages"))(b.select(["id", "messages"]))
    n_plain, n_templ, n_msgs = (t.column("num_prompt_tokens")[0].as_py() for t in (plain, templ, msgs))
    assert n_templ > n_plain  # the template wraps the text in role headers
    assert n_msgs == n_templ  # a JSON-text messages column renders like the templated prompt
    assert msgs.column("generation_token_ids")[0].as_py() == templ.column("generation_token_ids")[0].as_py()


# ----------------------------------------------------------------------------- batches in flight
def _budget(rid):
    """A block budget per row id (rows end after 1..4 of their 4 blocks): random weights never stop."""
    return 1 + int(rid.rsplit("-", 1)[-1]) * 7 % 4


_ENGINES: dict = {}


def _streaming_engine(path):
    """One engine per checkpoint for these tests (loading and the first call dominate their time); the
    actors that share it run one after another, each closing its stream before the next starts."""
    def factory(cfg):
        from pipeline.actor import build_engine

        key = (path, cfg.cache["policy"])
        if key not in _ENGINES:
            _ENGINES[key] = build_engine(cfg)
            _ENGINES[key].block_budget = _budget
        return _ENGINES[key]

    return factory


class Progress:
    """A ProgressTracker stand-in: records the batches' reports."""

    def __init__(self):
        self.reports = []
        self.report = type("M", (), {"remote": lambda _, **kw: self.reports.append(kw)})()
        self.loaded = type("M", (), {"remote": lambda _, *a, **kw: None})()


def _stream_batches(n=3, rows=4):
    prompts = ["hello there", "the quick brown fox jumps", "1+2=", "why", "abcdefghijk", "Math: ", "zz top",
               "a longer prompt than most", "x", "sum of 3 and 4", "tell me", "ok then"]
    return [pa.table({"id": [f"r-{b * rows + i}" for i in range(rows)],
                      "prompt": [prompts[(b * rows + i) % len(prompts)] for i in range(rows)]}) for b in range(n)]


def _stream_config(schema, path, **over):
    return _config(schema, factory=_streaming_engine(path), model_path=path, **{
        "cache": {"policy": "dual"}, "batch_size": 2,
        "generation": {"gen_length": 32, "block_length": 8, "steps": 16, "stop_at_eos": False, "slots": 2}, **over})


def _tokens(t):
    return [(r["id"], r["generation_token_ids"], r["error_type"], r["num_generated_tokens"], r["nfe"])
            for r in t.to_pylist()]


def test_batches_in_flight_share_one_stream_and_equal_one_at_a_time(tiny_llada):
    import asyncio

    from pipeline.actor import StreamingGenerationActor

    batches = _stream_batches()
    schema = output_schema(batches[0].schema)
    sync = GenerationActor(_stream_config(schema, tiny_llada))
    want = [_tokens(sync(b)) for b in batches]
    assert {r[3] for w in want for r in w} == {8, 16, 24, 32}  # budgets: rows of 1..4 blocks

    async def together(actor):
        return await asyncio.gather(*(actor(b) for b in batches))

    async def one_at_a_time(actor):
        return [await actor(b) for b in batches]

    progress = Progress()
    shared = StreamingGenerationActor(_stream_config(schema, tiny_llada, progress=progress), batches_in_flight=3)
    got = asyncio.run(together(shared))
    shared.stream.close()
    alone = StreamingGenerationActor(_stream_config(schema, tiny_llada), batches_in_flight=3)
    got_alone = asyncio.run(one_at_a_time(alone))
    alone.stream.close()
    for g, ga, w, b in zip(got, got_alone, want, batches):
        assert g.schema == schema and g.column("id").to_pylist() == b.column("id").to_pylist()  # rows in = rows out
        assert _tokens(g) == w and _tokens(ga) == w
    # the three batches fed together took fewer engine steps than the same batches one after another
    assert shared.stream.steps < alone.stream.steps, (shared.stream.steps, alone.stream.steps)
    assert shared.stream.rebuilds == 1  # one decode loop, built once
    # progress: every row reported once; engine time and the stream's busy spans add up
    assert sum(r["rows"] for r in progress.reports) == 12 and len(progress.reports) == 3
    assert sum(n for r in progress.reports for _, _, n in r["spans"]) == 12
    assert sum(r["engine_s"] for r in progress.reports) > 0


def test_batches_in_flight_oom_errors_audit(tiny_llada, monkeypatch):
    """Out of memory in a shared step: its rows retried in halves (the same tokens), a row that runs out
    of memory alone is an 'oom' row; another exception: retried alone through generate, then a
    'generation' row; audited rows run between the stream's rows; bad rows never reach the engine."""
    import asyncio

    from dllm_cache_core.decoding.runner import Runner
    from pipeline.actor import StreamingGenerationActor

    batches = _stream_batches(2)
    batches[1] = pa.table({"id": ["r-4", "r-5", "r-6", "r-7"], "prompt": ["why", "", "Math: ", "zz top"]})
    schema = output_schema(batches[0].schema)
    want = [_tokens(GenerationActor(_stream_config(schema, tiny_llada, audit_fraction=0.5))(b)) for b in batches]
    step = Runner.step

    def tight(self, plan):
        ids = {r.row_id for r in plan.decode}
        if len(plan.decode) > 1 or "r-3" in ids:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        if "r-6" in ids:
            raise RuntimeError("kernel exploded (fake)")
        return step(self, plan)

    monkeypatch.setattr(Runner, "step", tight)
    actor = StreamingGenerationActor(_stream_config(schema, tiny_llada, audit_fraction=0.5), batches_in_flight=2)

    async def together():
        return await asyncio.gather(*(actor(b) for b in batches))

    got = asyncio.run(together())
    actor.stream.close()
    monkeypatch.setattr(Runner, "step", step)
    rows = {r["id"]: r for t in got for r in t.to_pylist()}
    assert [r["id"] for t in got for r in t.to_pylist()] == [f"r-{i}" for i in range(8)]
    assert rows["r-3"]["error_type"] == "oom" and "single row" in rows["r-3"]["error"]
    assert rows["r-6"]["error_type"] == "generation" and "kernel exploded" in rows["r-6"]["error"]
    assert rows["r-5"]["error_type"] == "empty_prompt"
    assert actor.stream.oom_retries >= 1
    by_id = {r[0]: r for w in want for r in w}
    audited = [i for i in rows if is_audited(i, 0.5)]
    assert audited and any(not is_audited(i, 0.5) for i in rows)
    for rid, r in rows.items():
        if rid in ("r-3", "r-6"):
            continue
        assert _tokens(pa.Table.from_pylist([r]))[0] == by_id[rid], rid
        assert (r["audit_token_agreement"] is not None) == (rid in audited and r["error_type"] is None)


def test_batches_in_flight_without_a_stream_engine_runs_batches_as_before():
    """An engine without open_stream (a fake) runs each batch as GenerationActor does, on one thread."""
    import asyncio

    from pipeline.actor import StreamingGenerationActor

    b = _batch(["ccc", "a", "eeeee", "bb", "OOM"])
    actor = StreamingGenerationActor(_config(output_schema(b.schema)), batches_in_flight=2)
    out = asyncio.run(actor(b))
    assert out.column("generation").to_pylist() == ["CCC", "A", "EEEEE", "BB", None]
    assert out.column("error_type").to_pylist() == [None] * 4 + ["oom"]
    assert actor.engine.calls[0] == ["a", "bb"] and actor.stream is None


def test_batches_in_flight_follow_the_fallback_chain(tiny_llada):
    """A switch of the fallback chain's entry: batches already in the stream finish under the old entry
    and are stamped with it; the next batch gets a stream on the new entry's engine."""
    import asyncio

    from pipeline.actor import StreamingGenerationActor

    batches = _stream_batches(3)
    schema = output_schema(batches[0].schema)
    chain = ({"policy": "dual"}, {"policy": "none"})
    want_none = [_tokens(GenerationActor(_stream_config(schema, tiny_llada, cache={"policy": "none"}))(b))
                 for b in batches]
    actor = StreamingGenerationActor(_stream_config(schema, tiny_llada, progress=Progress(), fallback=chain),
                                     batches_in_flight=3)
    level = [0]
    actor._active_level = lambda: level[0]
    first = actor.stream
    submit, submitted = first.submit, []

    def flip_after_two(rows, budgets=None):  # the tracker moves on once batches 0 and 1 are in the stream
        futures = submit(rows, budgets)
        submitted.append(len(rows))
        if len(submitted) == 2:
            level[0] = 1
        return futures

    first.submit = flip_after_two

    async def run():  # batch 2 queries the chain while 0 and 1 are decoding: it waits for them, then switches
        return await asyncio.gather(*(actor(b) for b in batches))

    got = asyncio.run(run())
    actor.stream.close()
    assert [t.column("cache_config").to_pylist() for t in got] == [["dual"] * 4, ["dual"] * 4, ["none"] * 4]
    assert actor.stream is not first and first._closed and submitted == [4, 4]  # batch 2: the new stream
    assert _tokens(got[2]) == want_none[2]
    assert actor.engine.cache.policy == "none"
