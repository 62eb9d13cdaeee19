"""Architectures by exact name, decoding profiles as the only thing the loop reads, the schedule
object, config bounds, the CUDA check, and the streamed checkpoint fingerprint."""
from __future__ import annotations

import ast
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from dllm_cache_core import CacheConfig, GenerationConfig, generate, load_model  # noqa: E402
from dllm_cache_core.decoding import runner as runner_mod  # noqa: E402
from dllm_cache_core.engine import model_fingerprint  # noqa: E402
from dllm_cache_core.models import checkpoint as fingerprint_mod  # noqa: E402
from dllm_cache_core.models.registry import detect, model_config  # noqa: E402
from dllm_cache_core.models.tiny import dream_tiny_config, llada_tiny_config  # noqa: E402
from engine_fixtures import PROMPTS, _one_torch_thread, copy_ckpt, decode_model  # noqa: E402,F401

REPO = Path(__file__).resolve().parent.parent
TOPK_COMMIT = runner_mod.topk_commit


# -- architecture registry -----------------------------------------------------------------------
def test_architectures_by_exact_name():
    assert detect({"model_type": "llada"}).name == "llada"
    assert detect({"model_type": "Dream"}).name == "dream"
    assert detect({"architectures": ["DreamModel"]}).name == "dream"
    assert detect({"model_type": "unknown", "architectures": ["LLaDAModelLM"]}).name == "llada"
    for near_miss in ({"model_type": "llada2_moe"}, {"architectures": ["MyDreamModelV2"]}, {"model_type": "LLaDA"}):
        with pytest.raises(ValueError, match="not a supported architecture"):
            detect(near_miss)


def test_profile_travels_on_the_config():
    llada, dream = model_config(llada_tiny_config()), model_config(dream_tiny_config())
    assert (llada.profile.logit_shift, dream.profile.logit_shift) == (False, True)
    assert (llada.profile.default_remasking, dream.profile.default_remasking) == ("low_confidence", "entropy")
    assert llada.profile.mask_id == llada.mask_id and llada.profile.stop_ids == (llada.eos_id,)
    model, _ = decode_model("llada")
    assert model.config.profile.stop_ids == model.default_stop_ids and model.eot_id == model.config.profile.eot_id


def test_no_family_branches_outside_the_model_registry():
    """No comparison against a family name in the loop, the caches, the configs, the engine or the spec."""
    names = {"llada", "dream", "Dream"}
    files = [*(REPO / "dllm_cache_core" / "decoding").glob("*.py"), *(REPO / "dllm_cache_core" / "cache").glob("*.py"),
             REPO / "dllm_cache_core" / "config.py", REPO / "dllm_cache_core" / "engine.py", REPO / "pipeline" / "spec.py"]
    found = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(c.value in names for c in consts) or any(
                        isinstance(c, (ast.Tuple, ast.List, ast.Set)) and any(
                            isinstance(e, ast.Constant) and e.value in names for e in c.elts)
                        for c in node.comparators):
                    found.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not found, found


# -- the schedule object -------------------------------------------------------------------------
def _counts(monkeypatch, model, **gen) -> list[int]:
    """Per-step commit counts the loop asked for (first block)."""
    seen: list[int] = []

    def recording(score, cand, k):
        seen.append(int(k))
        return TOPK_COMMIT(score, cand, k)

    monkeypatch.setattr(runner_mod, "topk_commit", recording)
    generate(model, PROMPTS[:1], GenerationConfig(gen_length=16, steps=5, stop_at_eos=False, **gen), CacheConfig())
    return seen


def test_schedule_picks_the_counts(monkeypatch):
    llada, dream = decode_model("llada")[0], decode_model("dream")[0]
    linear = [4, 3, 3, 3, 3]            # 16 over 5 steps, the remainder first
    timestep = _counts(monkeypatch, dream)  # Dream's own: n_left * (1 - t_{i+1} / t_i), rest at the end
    assert timestep != linear and sum(timestep) == 16
    assert _counts(monkeypatch, llada) == _counts(monkeypatch, llada, schedule="llada") == linear
    assert _counts(monkeypatch, llada, schedule="dream") == timestep
    assert _counts(monkeypatch, dream, schedule="dream") == timestep
    assert _counts(monkeypatch, dream, schedule="llada") == linear


def test_linear_schedule_with_dream_blocks_commits_every_position():
    """Dream's block sampler commits a block's first position alone; a linear schedule then spreads
    the rest over the remaining steps, so no mask is left."""
    model = decode_model("dream")[0]
    out = generate(model, PROMPTS, GenerationConfig(gen_length=16, block_length=8, steps=6, schedule="llada",
                                                    stop_at_eos=False), CacheConfig())
    for o in out:
        assert len(o.token_ids) == 16 and model.config.mask_id not in o.token_ids


# -- config bounds, device check --------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("d_model", 0, "d_model=0 is not allowed; allowed: a positive integer"),
    ("n_layers", -2, "n_layers=-2 is not allowed"),
    ("n_heads", 0, "n_heads=0 is not allowed"),
    ("n_kv_heads", 0, "n_kv_heads=0 is not allowed"),
    ("vocab_size", 0, "vocab_size=0 is not allowed"),
    ("embedding_size", -1, "embedding_size=-1 is not allowed"),
    ("mlp_hidden_size", 0, "mlp_hidden_size=0 is not allowed"),
    ("max_sequence_length", 0, "max_sequence_length=0 is not allowed"),
    ("d_model", 10 ** 9, "d_model=1000000000 is not allowed; allowed: at most"),
    ("n_layers", 10 ** 6, "n_layers=1000000 is not allowed; allowed: at most"),
    ("vocab_size", 10 ** 10, "is not allowed; allowed: at most"),
    ("d_model", 2.5, "d_model=2.5 is not allowed"),
    ("mask_token_id", 10 ** 6, "mask_token_id=1000000 is not allowed; allowed: 0 <= id <"),
    ("rope_theta", 0, "rope_theta=0.0 is not allowed"),
])
def test_llada_config_sizes_bounded(field, value, message):
    cfg = llada_tiny_config()
    if field == "vocab_size":
        cfg.pop("embedding_size", None)
    cfg[field] = value
    with pytest.raises(ValueError, match="config.json") as e:
        model_config(cfg)
    assert message in str(e.value)


@pytest.mark.parametrize("field,value", [("hidden_size", 0), ("num_hidden_layers", -1), ("num_attention_heads", 0),
                                         ("intermediate_size", 10 ** 8), ("head_dim", 0), ("vocab_size", -5),
                                         ("max_position_embeddings", 10 ** 12)])
def test_dream_config_sizes_bounded(field, value):
    cfg = dream_tiny_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=f"config.json: {field}="):
        model_config(cfg)


def test_heads_must_divide(tmp_path):
    cfg = llada_tiny_config()
    cfg["n_heads"] = 3  # d_model 64
    with pytest.raises(ValueError, match="d_model=64 must be divisible by n_heads=3"):
        model_config(cfg)
    path = copy_ckpt("dream", tmp_path / "m")
    cj = json.loads((path / "config.json").read_text())
    cj["num_key_value_heads"] = 3
    (path / "config.json").write_text(json.dumps(cj))
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        load_model(path, tokenizer=False)


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"CUDA was requested but torch\.cuda\.is_available\(\) is False"):
        load_model("builtin:tiny", device="cuda")


# -- fingerprint ---------------------------------------------------------------------------------
def _reference_fingerprint(path: Path) -> str:
    """The fingerprint's definition, with whole-file reads (fine for these small files)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            data = f.read_bytes()
            if f.suffix == ".safetensors" and len(data) > fingerprint_mod.FULL_HASH_LIMIT:
                n = int.from_bytes(data[:8], "little")
                h.update(data[8:8 + n])
                h.update(str(len(data)).encode())
            else:
                h.update(data)
    return h.hexdigest()[:16]


def test_fingerprint_streams_files(tmp_path, monkeypatch):
    path = copy_ckpt("llada", tmp_path / "m")
    expected = _reference_fingerprint(path)
    monkeypatch.setattr(fingerprint_mod, "CHUNK", 1000)  # many chunks per file
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("a whole file was read into memory"))
    assert model_fingerprint(path) == expected


def test_fingerprint_reads_only_the_header_of_large_weights(tmp_path, monkeypatch):
    path = copy_ckpt("llada", tmp_path / "m")
    monkeypatch.setattr(fingerprint_mod, "FULL_HASH_LIMIT", 1024)  # the tiny weights count as large
    before = model_fingerprint(path)
    f = path / "model.safetensors"
    n = int.from_bytes(f.read_bytes()[:8], "little")
    with open(f, "r+b") as fh:  # change a weight byte: the header and the size stay
        fh.seek(8 + n + 100)
        b = fh.read(1)
        fh.seek(8 + n + 100)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert model_fingerprint(path) == before
    (path / "config.json").write_text((path / "config.json").read_text() + " ")
    assert model_fingerprint(path) != before
