"""Write tiny random checkpoints of both families in the real on-disk layout (tests, benchmarks).

LLaDA folders get tokenizer.json + tokenizer_config.json (as GSAI-ML ships them); Dream folders get
vocab.json + merges.txt + a tokenizer_config.json that names the remote-code DreamTokenizer, as
Dream-org ships them, so the loader's no-remote-code fallback is exercised.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .registry import build_model, model_config

LLADA_SPECIALS = ["<|endoftext|>", "<|mdm_mask|>", "<|startoftext|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_vocab() -> dict[str, int]:
    return {ch: b for b, ch in sorted(bytes_to_unicode().items())}


def llada_tiny_config(**over: Any) -> dict[str, Any]:
    cfg = {
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 64, "n_layers": 2,
        "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 128, "mlp_ratio": 4, "activation_type": "silu",
        "block_type": "llama", "layer_norm_type": "rms", "rms_norm_eps": 1e-5, "rope": True,
        "rope_theta": 500000.0, "rope_full_precision": True, "include_bias": False, "include_qkv_bias": False,
        "vocab_size": 256 + len(LLADA_SPECIALS), "embedding_size": 256 + len(LLADA_SPECIALS),
        "weight_tying": False, "max_sequence_length": 1024,
        "eos_token_id": 256, "pad_token_id": 256, "mask_token_id": 257, "bos_token_id": 258,
    }
    cfg.update(over)
    return cfg


def dream_tiny_config(**over: Any) -> dict[str, Any]:
    cfg = {
        "model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 256 + len(DREAM_SPECIALS),
        "tie_word_embeddings": False, "max_position_embeddings": 1024,
        "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256, "mask_token_id": 259,
    }
    cfg.update(over)
    return cfg


def write_llada_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = byte_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(LLADA_SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mdm_mask|>", "model_max_length": 1024,
        "clean_up_tokenization_spaces": False, "chat_template": LLADA_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {k: tc[k] for k in ("bos_token", "eos_token", "pad_token", "mask_token")}, indent=1))


def write_dream_tokenizer(path: Path) -> None:
    (path / "vocab.json").write_text(json.dumps(byte_vocab(), ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    added = {str(256 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for i, t in enumerate(DREAM_SPECIALS)}
    tc = {
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": added, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "model_max_length": 1024,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|mask|>"],
        "clean_up_tokenization_spaces": False, "errors": "replace", "chat_template": DREAM_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))


def save_weights(state: dict[str, torch.Tensor], path: Path, shards: int = 1) -> None:
    """model.safetensors, or N shards + model.safetensors.index.json (the HF sharded layout)."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if shards <= 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def random_state(cfg_json: dict[str, Any], seed: int = 0, std: float = 0.3,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, torch.Tensor]:
    cfg = model_config(cfg_json)
    with torch.device(device):
        model = build_model(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("norm.weight") or k.endswith("ln_f.weight") or "layernorm" in k:
            t = 1.0 + 0.1 * torch.randn(v.shape, generator=g, device=device)
        elif k.endswith("bias"):
            t = 0.1 * torch.randn(v.shape, generator=g, device=device)
        else:
            fan_in = v.shape[-1] if v.dim() > 1 and "wte" not in k and "embed" not in k else 1
            t = torch.randn(v.shape, generator=g, device=device) * (std if fan_in == 1 else fan_in ** -0.5)
        state[k] = t.to(dtype)
    return state


def write_tiny_checkpoint(path: str | Path, family: str = "llada", seed: int = 0, shards: int = 1,
                          dtype: torch.dtype = torch.float32, std: float = 1.0,
                          zero_mask_row: bool = True, **config_overrides: Any) -> Path:
    """A random checkpoint folder; `zero_mask_row` zeroes the LM-head row of the mask token (as the
    reference fixtures need: a random model may otherwise predict [MASK] itself)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_json = (llada_tiny_config if family == "llada" else dream_tiny_config)(**config_overrides)
    cfg = model_config(cfg_json)
    state = random_state(cfg_json, seed=seed, std=std, dtype=dtype)
    if zero_mask_row:
        head = "model.transformer.ff_out.weight" if family == "llada" else "lm_head.weight"
        if head in state:
            state[head][cfg.mask_id] = 0
    cfg_json = dict(cfg_json, torch_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "float32"))
    (path / "config.json").write_text(json.dumps(cfg_json, indent=1))
    save_weights(state, path, shards)
    (write_llada_tokenizer if family == "llada" else write_dream_tokenizer)(path)
    return path
