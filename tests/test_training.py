"""Training pieces on CPU in seconds: tasks, tokenizer, batches, the LLaDA objective, checkpoint/resume."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dllm_cache_core.tasks import TASKS, eval_set, final_number, is_heldout, sample
from dllm_cache_core.training.data import BatchMaker, DataConfig, collate
from dllm_cache_core.training.export import ArchConfig
from dllm_cache_core.training.objective import diffusion_loss, sample_t
from dllm_cache_core.training.tokenizer import build_tokenizer, chat_text, special_ids

BUILTIN = Path(__file__).resolve().parent.parent / "dllm_cache_core" / "builtin" / "tiny"
TOKENIZER = str(BUILTIN / "tokenizer.json")
MICRO = ArchConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, max_sequence_length=1024)


# -- tasks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TASKS))
def test_checker_accepts_reference_and_rejects_a_change(name):
    rng = random.Random(0)
    for _ in range(20):
        ex = sample(name, rng)
        assert TASKS[name].check(ex.answer, ex)
        assert TASKS[name].check("  " + ex.answer + "\n", ex)
        wrong = ex.answer[:-1] + ("1" if ex.answer[-1] != "1" else "2")
        assert not TASKS[name].check(wrong, ex), (ex.answer, wrong)


def test_worked_arithmetic_is_correct():
    rng = random.Random(1)
    for _ in range(200):
        ex = sample("addition", rng)
        a, b = map(int, ex.key[4:].split("+"))
        assert final_number(ex.answer) == str(a + b)
        ex = sample("multiplication", rng)
        a, b = map(int, ex.key[4:].split("*"))
        assert final_number(ex.answer) == str(a * b)
        for line in ex.answer.splitlines()[:-1]:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307  (digits and + * only)


def test_gsm8k_extraction():
    assert final_number("so 3+4=7\n#### 1,234") == "1234"
    assert final_number("The answer is 42.") == "42"
    assert final_number("#### 5.0") == "5"
    assert final_number("no number") is None


def test_splits_are_disjoint_and_eval_sets_fixed():
    ev = eval_set("multiplication", 30)
    assert ev == eval_set("multiplication", 30)
    assert all(is_heldout(e.key) for e in ev)
    rng = random.Random(2)
    assert not any(is_heldout(sample("multiplication", rng).key) for _ in range(300))


def test_lengths_fit_canvas_and_context():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER)
    rng = random.Random(3)
    for name, task in TASKS.items():
        for _ in range(100):
            ex = sample(name, rng)
            assert len(tok.encode(ex.answer).ids) + 1 <= task.gen_length
            assert len(tok.encode(chat_text(ex.prompt)).ids) <= 512


# -- tokenizer ----------------------------------------------------------------------------------
def test_shipped_tokenizer_is_what_the_builder_makes():
    built = json.loads(build_tokenizer().to_str())
    shipped = json.loads((BUILTIN / "tokenizer.json").read_text())
    assert built["model"]["vocab"] == shipped["model"]["vocab"]
    assert built["model"]["merges"] == shipped["model"]["merges"]


def test_tokenizer_loads_with_autotokenizer_and_template_matches():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILTIN))
    cfg = json.loads((BUILTIN / "config.json").read_text())
    ids = {"eos": tok.eos_token_id, "mask": tok.mask_token_id, "bos": tok.bos_token_id,
           "eot": tok.convert_tokens_to_ids("<|eot_id|>")}
    assert ids["eos"] == cfg["eos_token_id"] == cfg["pad_token_id"] == tok.pad_token_id
    assert ids["mask"] == cfg["mask_token_id"] != ids["eos"]
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(TOKENIZER)
    assert special_ids(raw) == ids
    rng = random.Random(4)
    for name in TASKS:
        ex = sample(name, rng)
        text = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                       tokenize=False)
        assert text == chat_text(ex.prompt)
        enc = tok(ex.answer, add_special_tokens=False)["input_ids"]
        assert tok.decode(enc) == ex.answer
    assert [tok.decode([i]) for i in tok("12345", add_special_tokens=False)["input_ids"]] == list("12345")


# -- batches and objective ----------------------------------------------------------------------
def test_batches_are_a_function_of_the_step():
    mk = BatchMaker(TOKENIZER, DataConfig(tokens_per_batch=2048), seed=0)
    a, b, c = mk(5), mk(5), mk(6)
    assert torch.equal(a["ids"], b["ids"]) and a["task"] == b["task"]
    assert not (a["ids"].shape == c["ids"].shape and torch.equal(a["ids"], c["ids"]))
    for step in range(8):
        x = mk(step)
        B, L = x["ids"].shape
        P = x["prompt_len"]
        assert B * L <= 2048 or B == 1
        first = (~x["key_mask"]).sum(1)  # left padding per row
        assert torch.all(x["positions"][torch.arange(B), first] == 0)
        assert torch.all(x["key_mask"][:, P:])
        assert x["padded"] == bool((first > 0).any())


def _micro_model(seed: int = 0):
    from dllm_cache_core.training.trainer import TrainConfig, build_model

    return build_model(TrainConfig(out="unused", tokenizer=str(BUILTIN), seed=seed, arch=MICRO), torch.device("cpu"))


def test_objective_masks_only_the_response():
    model, cj = _micro_model()
    rows = [([7, 8, 9], [20, 21, 5]), ([7, 8, 9, 10, 11], [22, 5])]
    batch = collate(rows, P=5, G=8, eos=0, rng=random.Random(0), clean_prefix_prob=0.0)
    seen = {}
    real_forward = model.forward

    def spy(x, **kw):
        seen["x"] = x.clone()
        return real_forward(x, **kw)

    model.forward = spy
    for seed in range(20):
        diffusion_loss(model, batch, cj["mask_token_id"], 1e-3, torch.Generator().manual_seed(seed))
        x = seen["x"]
        assert torch.equal(x[:, :5], batch["ids"][:, :5])  # prompt (and its padding) never masked
        kept = x[:, 5:] != cj["mask_token_id"]
        assert torch.equal(x[:, 5:][kept], batch["ids"][:, 5:][kept])


def test_clean_prefix_is_never_masked():
    model, cj = _micro_model()
    batch = collate([([7, 8], [20, 21, 22, 23, 5])], P=2, G=8, eos=0, rng=random.Random(0), clean_prefix_prob=1.0)
    c = int(batch["clean"][0])
    batch["clean"][0] = c = max(c, 2)
    real_forward, seen = model.forward, {}
    model.forward = lambda x, **kw: (seen.__setitem__("x", x.clone()), real_forward(x, **kw))[1]
    for seed in range(10):
        diffusion_loss(model, batch, cj["mask_token_id"], 0.999, torch.Generator().manual_seed(seed))
        assert torch.equal(seen["x"][0, 2:2 + c], batch["ids"][0, 2:2 + c])


def test_t_is_in_range_and_stratified():
    t = sample_t(64, 1e-3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert float(t.min()) > 1e-3 - 1e-9 and float(t.max()) <= 1.0
    assert torch.histc(t, bins=4, min=0, max=1).tolist() == [16, 16, 16, 16]


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model, cj = _micro_model()
    batch = BatchMaker(TOKENIZER, DataConfig(tokens_per_batch=1024), seed=0)(0)
    batch.pop("task")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = diffusion_loss(model, batch, cj["mask_token_id"], 1e-3, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]


# -- the loop: checkpoint, resume, export -------------------------------------------------------
def _cfg(out, steps, **kw):
    from dllm_cache_core.training.trainer import TrainConfig

    return TrainConfig(out=str(out), tokenizer=str(BUILTIN), steps=steps, device="cpu", workers=0, log_every=2,
                       warmup_steps=2, eval_size=0, arch=MICRO, data=DataConfig(tokens_per_batch=1024), **kw)


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    from dllm_cache_core.training.checkpoint import load_checkpoint
    from dllm_cache_core.training.trainer import train

    train(_cfg(tmp_path / "straight", 6))
    train(_cfg(tmp_path / "split", 6, stop_after=3))
    mid = load_checkpoint(tmp_path / "split")["meta"]
    assert (mid["step"], mid["total_steps"]) == (3, 6)
    s = train(_cfg(tmp_path / "split", 6))
    assert s["step"] == 6
    a = load_checkpoint(tmp_path / "straight")
    b = load_checkpoint(tmp_path / "split")
    assert b["meta"]["phase_start"] == 0 and b["meta"]["total_steps"] == 6
    for k in a["model"]:  # optimizer moments travel in bf16: equal up to rounding
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-4), k
    log = [json.loads(line) for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4, 6]


def test_export_loads_as_a_model_folder(tmp_path):
    from dllm_cache_core import load_model
    from dllm_cache_core.training.trainer import train

    train(_cfg(tmp_path / "run", 2, export=str(tmp_path / "model")))
    model, tok = load_model(tmp_path / "model")
    assert model.config.d_model == MICRO.d_model and model.config.mask_id == tok.mask_token_id
    assert (tmp_path / "model" / "model.safetensors").stat().st_size < 1_000_000


# -- retrieval curriculum, answer weights, init from an exported folder ------------------------
def _pairs(prompt: str) -> int:
    return sum(1 for line in prompt.splitlines() if "=" in line and " " not in line.split("=")[0])


def test_kv_curriculum_grows_pair_counts_with_the_step():
    from dllm_cache_core.tasks import KV_MAX_PAIRS, make_kv

    cfg = DataConfig(task_weights={"kv_retrieval": 1.0}, kv_pairs_start=4, kv_pairs_ramp=(100, 1100))
    assert [cfg.kv_cap(s) for s in (0, 100, 600, 1100, 5000)] == [4, 4, 27, 50, 50]
    assert not DataConfig().kv_curriculum and DataConfig().kv_cap(0) == KV_MAX_PAIRS
    # the default maker draws exactly what it always drew (evaluation sets unchanged)
    assert make_kv(random.Random(3)) == make_kv(random.Random(3), max_pairs=50, min_pairs=1)
    mk = BatchMaker(TOKENIZER, DataConfig(tokens_per_batch=4096, task_weights={"kv_retrieval": 1.0},
                                          kv_pairs_start=4, kv_pairs_ramp=(100, 1100)), seed=0)
    tok = mk.tok
    def counts(step):
        x = mk(step)
        P = x["prompt_len"]
        return [_pairs(tok.decode(r[:P][x["key_mask"][i, :P]].tolist(), skip_special_tokens=False))
                for i, r in enumerate(x["ids"])]
    early = [n for s in range(20) for n in counts(s)]
    late = [n for s in range(2000, 2020) for n in counts(s)]
    assert 1 <= min(early) and max(early) <= 4
    assert max(late) > 20 and min(late) >= 1
    assert torch.equal(mk(7)["ids"], mk(7)["ids"])  # still a pure function of (seed, step)
    # short-context batches hold more samples
    assert sum(len(counts(s)) for s in range(10)) > sum(len(counts(s)) for s in range(2000, 2010))


def test_answer_weight_reweights_only_answer_tokens():
    model, cj = _micro_model()
    mk = BatchMaker(TOKENIZER, DataConfig(tokens_per_batch=1024, task_weights={"kv_retrieval": 1.0},
                                          task_canvas_mix={"kv_retrieval": (1.0, 1.0, 1.0)},
                                          answer_weight={"kv_retrieval": 3.0}), seed=0)
    b = mk(0)
    assert b["answer_weight"] == 3.0 and b["ids"].shape[1] - b["prompt_len"] == 32  # tight canvas
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        l3, m3 = diffusion_loss(model, b, cj["mask_token_id"], 1e-3, gen())
        l1, m1 = diffusion_loss(model, {**b, "answer_weight": 1.0}, cj["mask_token_id"], 1e-3, gen())
    assert l3 > l1 and torch.equal(m3["acc_answer"], m1["acc_answer"]) and "acc_answer" in m1


def test_init_from_loads_exactly_the_exported_tensors(tmp_path):
    from safetensors.torch import load_file

    from dllm_cache_core.training.checkpoint import load_checkpoint
    from dllm_cache_core.training.export import export_model
    from dllm_cache_core.training.trainer import load_exported, train

    src, cj = _micro_model(seed=5)
    export_model(src.state_dict(), cj, BUILTIN, tmp_path / "exported")
    saved = load_file(str(tmp_path / "exported" / "model.safetensors"))
    dst, _ = _micro_model(seed=6)
    load_exported(dst, cj, str(tmp_path / "exported"))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, saved[k].float()), k
    with pytest.raises(ValueError, match="architecture"):
        load_exported(dst, {**cj, "d_model": 64}, str(tmp_path / "exported"))
    # a run with init_from: 0 steps keeps the exported weights; the checkpoint holds them and a fresh phase
    s = train(_cfg(tmp_path / "run", 1, stop_after=0, max_minutes=0.0, init_from=str(tmp_path / "exported")))
    ck = load_checkpoint(tmp_path / "run")
    assert s["step"] == 0 and ck["meta"]["phase_start"] == 0
    for k, v in ck["model"].items():
        assert torch.equal(v, saved[k].float()), k
    # a 1-step run from the same folder moves away from them (it trained)
    train(_cfg(tmp_path / "run2", 1, init_from=str(tmp_path / "exported")))
    ck2 = load_checkpoint(tmp_path / "run2")
    assert ck2["meta"]["step"] == 1
    assert any(not torch.equal(v, saved[k].float()) for k, v in ck2["model"].items())
