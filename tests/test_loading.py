"""load_model: real on-disk layout round trips (single file, sharded), HF key names, weight tying, GQA,
key/shape errors, pickle refusal, tokenizers without remote code, builtin names, dtypes."""
from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dllm_cache_core import load_model  # noqa: E402
from dllm_cache_core.models import DreamModel, LLaDAModelLM  # noqa: E402
from dllm_cache_core.models.tiny import write_tiny_checkpoint  # noqa: E402
from engine_fixtures import SPECS, _one_torch_thread, ckpt, copy_ckpt, load, read_config  # noqa: E402,F401


def disk_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read straight from its safetensors file(s)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(path / f))
        assert not set(part) & set(out), f"key in two shards: {set(part) & set(out)}"
        out.update(part)
    return out


LLADA_LAYER = ["attn_norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "attn_out.weight",
               "ff_norm.weight", "ff_proj.weight", "up_proj.weight", "ff_out.weight"]
DREAM_LAYER = ["input_layernorm.weight", "post_attention_layernorm.weight",
               "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
               "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def expected_keys(name: str) -> set[str]:
    """The HF checkpoint key set, written out from the published layouts (not from our modules)."""
    spec = SPECS[name]
    if spec["family"] == "llada":
        keys = {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
        for i in range(2):
            keys |= {f"model.transformer.blocks.{i}.{k}" for k in LLADA_LAYER}
            if spec.get("include_bias"):
                keys |= {f"model.transformer.blocks.{i}.{m}.bias"
                         for m in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")}
            elif spec.get("include_qkv_bias"):
                keys |= {f"model.transformer.blocks.{i}.{m}.bias" for m in ("q_proj", "k_proj", "v_proj")}
        if not spec.get("weight_tying"):
            keys.add("model.transformer.ff_out.weight")
            if spec.get("include_bias"):
                keys.add("model.transformer.ff_out.bias")
        return keys
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(2):
        keys |= {f"model.layers.{i}.{k}" for k in DREAM_LAYER}
    if not spec.get("tie_word_embeddings"):
        keys.add("lm_head.weight")
    return keys


ROUND_TRIP = ["llada", "llada_gqa", "llada_tied", "llada_bias", "llada_qkv_bias", "llada_sharded",
              "dream", "dream_mha", "dream_tied", "dream_sharded"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_real_layout(name):
    path = ckpt(name)
    assert (path / "config.json").exists()
    model, tok = load(name)
    assert type(model) is (LLaDAModelLM if SPECS[name]["family"] == "llada" else DreamModel)
    disk = disk_state(path)
    state = model.state_dict()
    assert set(disk) == expected_keys(name)
    assert set(state) == set(disk)
    for k, v in disk.items():
        assert state[k].device.type == "cpu", k
        assert state[k].dtype == torch.float32, k
        assert torch.equal(state[k], v), k
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert tok is not None


@pytest.mark.parametrize("name,n_shards", [("llada_sharded", 3), ("dream_sharded", 4)])
def test_sharded_layout_really_sharded(name, n_shards):
    path = ckpt(name)
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == n_shards
    assert all((path / f).exists() for f in files)
    assert set(index["weight_map"]) == expected_keys(name)


def test_literal_hf_key_names():
    llada = load("llada")[0].state_dict()
    for k in ("model.transformer.blocks.0.ff_proj.weight", "model.transformer.blocks.0.up_proj.weight",
              "model.transformer.blocks.1.ff_out.weight", "model.transformer.blocks.0.attn_out.weight",
              "model.transformer.blocks.0.attn_norm.weight", "model.transformer.blocks.0.ff_norm.weight",
              "model.transformer.ff_out.weight", "model.transformer.wte.weight", "model.transformer.ln_f.weight"):
        assert k in llada, k
    # block ff_out is the MLP down projection, top-level ff_out the LM head
    assert tuple(llada["model.transformer.blocks.0.ff_out.weight"].shape) == (64, 128)
    assert tuple(llada["model.transformer.blocks.0.ff_proj.weight"].shape) == (128, 64)
    assert tuple(llada["model.transformer.ff_out.weight"].shape) == (262, 64)
    dream = load("dream")[0].state_dict()
    for k in ("model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias",
              "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert k in dream, k
    assert "model.layers.0.self_attn.o_proj.bias" not in dream
    # Dream GQA: 4 query heads, 2 kv heads of 16
    assert tuple(dream["model.layers.0.self_attn.k_proj.weight"].shape) == (32, 64)
    assert tuple(dream["model.layers.0.self_attn.q_proj.weight"].shape) == (64, 64)


def test_llada_gqa_shapes_and_config():
    model = load("llada_gqa")[0]
    assert model.config.n_heads == 4 and model.config.n_kv_heads == 2
    sd = model.state_dict()
    assert tuple(sd["model.transformer.blocks.0.k_proj.weight"].shape) == (32, 64)
    assert tuple(sd["model.transformer.blocks.0.v_proj.weight"].shape) == (32, 64)
    assert tuple(sd["model.transformer.blocks.0.q_proj.weight"].shape) == (64, 64)


@pytest.mark.parametrize("name,head_key,emb_key", [
    ("llada_tied", "model.transformer.ff_out.weight", "model.transformer.wte.weight"),
    ("dream_tied", "lm_head.weight", "model.embed_tokens.weight"),
])
def test_weight_tying(name, head_key, emb_key):
    model = load(name)[0]
    assert model.config.tie_embeddings
    assert head_key not in model.state_dict()
    # the LM head is the embedding matrix: logits of a hidden state h are norm(h) @ E^T
    h = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
    E = model.state_dict()[emb_key]
    norm = model.model.transformer["ln_f"] if name.startswith("llada") else model.model.norm
    torch.testing.assert_close(model.head(h), norm(h) @ E.T, rtol=1e-5, atol=1e-5)


def test_tied_checkpoint_with_head_key_is_unexpected(tmp_path):
    path = copy_ckpt("llada_tied", tmp_path / "m")
    sd = load_file(str(path / "model.safetensors"))
    sd["model.transformer.ff_out.weight"] = sd["model.transformer.wte.weight"].clone()
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.transformer\.ff_out\.weight"):
        load_model(path, tokenizer=False)


# -- key / shape errors ------------------------------------------------------------------------
def _edit(path: Path, fn, file="model.safetensors"):
    sd = load_file(str(path / file))
    fn(sd)
    save_file(sd, str(path / file), metadata={"format": "pt"})


@pytest.mark.parametrize("name,key", [
    ("llada", "model.transformer.blocks.1.up_proj.weight"),
    ("llada", "model.transformer.ff_out.weight"),
    ("dream", "model.layers.0.self_attn.q_proj.bias"),
    ("dream", "lm_head.weight"),
])
def test_missing_key_is_named(tmp_path, name, key):
    path = copy_ckpt(name, tmp_path / "m")
    _edit(path, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match="missing") as e:
        load_model(path, tokenizer=False)
    assert repr(key) in str(e.value) or key in str(e.value)


@pytest.mark.parametrize("name,key", [
    ("llada", "model.transformer.blocks.0.extra_proj.weight"),
    ("dream", "model.layers.0.self_attn.o_proj.bias"),   # Dream's o_proj has no bias
    ("dream", "model.layers.2.mlp.up_proj.weight"),        # a layer the config does not have
])
def test_unexpected_key_is_named(tmp_path, name, key):
    path = copy_ckpt(name, tmp_path / "m")
    _edit(path, lambda sd: sd.__setitem__(key, torch.zeros(64)))
    with pytest.raises(ValueError, match="unexpected") as e:
        load_model(path, tokenizer=False)
    assert key in str(e.value)


@pytest.mark.parametrize("name,key,shape", [
    ("llada", "model.transformer.blocks.0.q_proj.weight", (64, 32)),
    ("llada_gqa", "model.transformer.blocks.1.k_proj.weight", (64, 64)),  # MHA weights into a GQA config
    ("dream", "model.layers.1.self_attn.k_proj.bias", (64,)),
])
def test_shape_mismatch_is_named(tmp_path, name, key, shape):
    path = copy_ckpt(name, tmp_path / "m")
    _edit(path, lambda sd: sd.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(ValueError, match="shape") as e:
        load_model(path, tokenizer=False)
    assert key in str(e.value)


def test_sharded_missing_key_is_named(tmp_path):
    path = copy_ckpt("llada_sharded", tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = "model.transformer.blocks.1.v_proj.weight"
    shard = index["weight_map"].pop(key)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _edit(path, lambda sd: sd.pop(key), file=shard)
    with pytest.raises(ValueError, match="missing") as e:
        load_model(path, tokenizer=False)
    assert key in str(e.value)


def test_pickle_only_folder_refused(tmp_path, monkeypatch):
    src = ckpt("llada")
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(src / "config.json", path / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), path / "pytorch_model.bin")

    def no_unpickling(*a, **k):  # the loader must refuse before ever unpickling
        raise AssertionError("torch.load called on a pickle checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=r"(?i)pickle|\.bin"):
        load_model(path, tokenizer=False)


def test_no_config_and_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path, tokenizer=False)
    path = copy_ckpt("llada", tmp_path / "m")
    cfg = read_config(path)
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type") as e:
        load_model(path, tokenizer=False)
    assert "llada" in str(e.value) and "dream" in str(e.value)


def test_family_from_architectures_only(tmp_path):
    path = copy_ckpt("dream", tmp_path / "m")
    cfg = read_config(path)
    del cfg["model_type"]
    (path / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(path, tokenizer=False)
    assert model.config.family == "dream"


def test_builtin_unknown_name():
    with pytest.raises(ValueError, match="builtin:no-such-model") as e:
        load_model("builtin:no-such-model")
    assert "allowed" in str(e.value)


# -- dtypes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", ["bfloat16", "bf16", torch.bfloat16])
def test_dtype_conversion_bfloat16(alias):
    model, _ = load_model(ckpt("llada"), dtype=alias, tokenizer=False)
    assert all(p.dtype == torch.bfloat16 for p in model.state_dict().values())
    ref = load("llada")[0]
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16)), k
    ids = torch.tensor([[72, 101, 108, 108, 111, 257, 257, 257]])
    lb, lf = model(ids), ref(ids)
    assert lb.dtype == torch.bfloat16  # logits in the model dtype (the references do not upcast)
    torch.testing.assert_close(lb.float(), lf, rtol=0.1, atol=0.15)


def test_bf16_checkpoint_loads_as_float32():
    model, _ = load("llada_bf16")
    disk = disk_state(ckpt("llada_bf16"))
    assert all(v.dtype == torch.bfloat16 for v in disk.values())
    for k, v in disk.items():
        assert model.state_dict()[k].dtype == torch.float32
        assert torch.equal(model.state_dict()[k], v.float()), k


def test_bad_dtype_named():
    with pytest.raises(ValueError, match="dtype") as e:
        load_model(ckpt("llada"), dtype="float8", tokenizer=False)
    assert "bfloat16" in str(e.value)


# -- tokenizers ----------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_dream_tokenizer_without_remote_code(tmp_path, no_network):
    path = copy_ckpt("dream", tmp_path / "m")
    tc = json.loads((path / "tokenizer_config.json").read_text())
    assert tc["auto_map"]["AutoTokenizer"][0] == "tokenization_dream.DreamTokenizer"
    assert not (path / "tokenizer.json").exists()
    # a booby-trapped remote-code file: executing it would fail the test
    (path / "tokenization_dream.py").write_text("raise RuntimeError('remote code was executed')\n")
    model, tok = load_model(path)
    cfg = read_config(path)
    assert tok.mask_token == "<|mask|>"
    assert tok.convert_tokens_to_ids("<|mask|>") == cfg["mask_token_id"] == model.config.mask_id
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == cfg["eos_token_id"] == 256
    assert tok.convert_tokens_to_ids("<|im_end|>") == 258
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 257 in ids and 258 in ids  # <|im_start|>, <|im_end|> are single special tokens
    assert tok("hi<|mask|>", add_special_tokens=False)["input_ids"] == [104, 105, 259]
    assert tok.decode([104, 105, 258, 256, 259], skip_special_tokens=True) == "hi"
    assert model.default_stop_ids == (256, 258)  # EOS + <|im_end|>


def test_llada_tokenizer(no_network, tmp_path):
    path = copy_ckpt("llada", tmp_path / "m")
    model, tok = load_model(path)
    assert tok.mask_token == "<|mdm_mask|>" and tok.convert_tokens_to_ids("<|mdm_mask|>") == 257 == model.config.mask_id
    assert tok.eos_token_id == 256 == model.config.eos_id
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 261
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok("hi", add_special_tokens=False)["input_ids"] == [104, 105]
    assert model.default_stop_ids == (256, 261)  # EOS + <|eot_id|>
    assert model.eot_id == 261


def test_write_tiny_checkpoint_config_fields(tmp_path):
    """The tiny writer uses the families' real config.json field names."""
    p = write_tiny_checkpoint(tmp_path / "l", family="llada", n_kv_heads=2)
    cfg = read_config(p)
    for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "rope_theta", "vocab_size",
              "embedding_size", "rms_norm_eps", "include_bias", "weight_tying", "mask_token_id", "eos_token_id",
              "max_sequence_length"):
        assert k in cfg, k
    p = write_tiny_checkpoint(tmp_path / "d", family="dream")
    cfg = read_config(p)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "tie_word_embeddings", "mask_token_id", "max_position_embeddings"):
        assert k in cfg, k
    assert cfg["model_type"] == "Dream"
