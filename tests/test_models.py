"""Model numerics against an independent, deliberately plain re-implementation written here from the
published architecture descriptions (explicit per-head loops, explicit RoPE formula, softmax attention,
no SDPA, no code shared with dllm_cache_core), plus the layer-level rounding rules and Dream's logit
shift as the decoding loop applies it."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dllm_cache_core import GenerationConfig, generate  # noqa: E402
from dllm_cache_core.models.layers import RMSNorm, apply_rope, rope_tables  # noqa: E402
from engine_fixtures import (PROMPTS, SPECS, ForwardRecorder, _one_torch_thread, ckpt, decode_model,  # noqa: E402,F401
                             load, read_config)


# ------------------------------------------------------------------------------------------------
# The independent reference (single sequence, fp32, no padding unless key_valid says so)
# ------------------------------------------------------------------------------------------------
def ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to x's dtype, THEN multiply by the weight."""
    xf = x.float()
    y = xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def ref_rope(x: torch.Tensor, positions: list[int], theta: float) -> torch.Tensor:
    """x (n, heads, D): NeoX rotate-half, written element by element from the formula
    out[i] = x[i] cos(p w_i) - x[i + D/2] sin(p w_i); out[i + D/2] = x[i + D/2] cos + x[i] sin,
    w_i = theta^(-2i/D), computed in float64."""
    n, _, D = x.shape
    half = D // 2
    out = torch.empty_like(x)
    for t, p in enumerate(positions):
        for i in range(half):
            ang = p * theta ** (-2.0 * i / D)
            c, s = math.cos(ang), math.sin(ang)
            out[t, :, i] = x[t, :, i] * c - x[t, :, i + half] * s
            out[t, :, i + half] = x[t, :, i + half] * c + x[t, :, i] * s
    return out


def ref_attention(q, k, v, key_valid=None):
    """q (n, H, D), k/v (L, G, D); query head h reads kv head h // (H/G) (HF repeat_kv); softmax over keys."""
    n, H, D = q.shape
    G = k.shape[1]
    rep = H // G
    out = torch.empty(n, H, D)
    for h in range(H):
        g = h // rep
        s = (q[:, h] @ k[:, g].T) / math.sqrt(D)
        if key_valid is not None:
            s = s.masked_fill(~key_valid.unsqueeze(0), float("-inf"))
        p = torch.exp(s - s.max(-1, keepdim=True).values)
        p = p / p.sum(-1, keepdim=True)
        out[:, h] = p @ v[:, g]
    return out.reshape(n, H * D)


def silu(x):
    return x * torch.sigmoid(x)


class RefModel:
    """Straight from the checkpoint's tensors and config.json."""

    def __init__(self, path: Path):
        self.cfg = read_config(path)
        self.sd = load_file(str(path / "model.safetensors"))
        self.family = "llada" if self.cfg["model_type"] == "llada" else "dream"

    def lin(self, x, name, bias_ok=True):
        y = x @ self.sd[name + ".weight"].T
        if bias_ok and name + ".bias" in self.sd:
            y = y + self.sd[name + ".bias"]
        return y

    def logits(self, ids: list[int]) -> torch.Tensor:
        c, sd = self.cfg, self.sd
        n = len(ids)
        pos = list(range(n))
        if self.family == "llada":
            d, H, L = c["d_model"], c["n_heads"], c["n_layers"]
            G = c.get("n_kv_heads") or H
            eps, theta = c["rms_norm_eps"], c["rope_theta"]
            pre = "model.transformer."
            x = sd[pre + "wte.weight"][ids]
            for i in range(L):
                b = f"{pre}blocks.{i}."
                hn = ref_rmsnorm(x, sd[b + "attn_norm.weight"], eps)
                D = d // H
                q = ref_rope(self.lin(hn, b + "q_proj").view(n, H, D), pos, theta)
                k = ref_rope(self.lin(hn, b + "k_proj").view(n, G, D), pos, theta)
                v = self.lin(hn, b + "v_proj").view(n, G, D)
                x = x + self.lin(ref_attention(q, k, v), b + "attn_out")
                hn = ref_rmsnorm(x, sd[b + "ff_norm.weight"], eps)
                # ff_proj is the GATE (through SiLU), up_proj the linear branch, block ff_out the down proj
                x = x + self.lin(silu(self.lin(hn, b + "ff_proj")) * self.lin(hn, b + "up_proj"), b + "ff_out")
            hn = ref_rmsnorm(x, sd[pre + "ln_f.weight"], eps)
            if c.get("weight_tying"):
                return hn @ sd[pre + "wte.weight"].T
            return self.lin(hn, pre + "ff_out")
        d, H, L = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
        G = c.get("num_key_value_heads") or H
        D = c.get("head_dim") or d // H
        eps, theta = c["rms_norm_eps"], c["rope_theta"]
        x = sd["model.embed_tokens.weight"][ids]
        for i in range(L):
            b = f"model.layers.{i}."
            hn = ref_rmsnorm(x, sd[b + "input_layernorm.weight"], eps)
            q = ref_rope(self.lin(hn, b + "self_attn.q_proj").view(n, H, D), pos, theta)
            k = ref_rope(self.lin(hn, b + "self_attn.k_proj").view(n, G, D), pos, theta)
            v = self.lin(hn, b + "self_attn.v_proj").view(n, G, D)
            x = x + self.lin(ref_attention(q, k, v), b + "self_attn.o_proj")
            hn = ref_rmsnorm(x, sd[b + "post_attention_layernorm.weight"], eps)
            x = x + self.lin(silu(self.lin(hn, b + "mlp.gate_proj")) * self.lin(hn, b + "mlp.up_proj"),
                             b + "mlp.down_proj")
        hn = ref_rmsnorm(x, sd["model.norm.weight"], eps)
        if c.get("tie_word_embeddings"):
            return hn @ sd["model.embed_tokens.weight"].T
        return hn @ sd["lm_head.weight"].T


NUMERIC_MODELS = ["llada", "llada_gqa", "llada_tied", "llada_bias", "llada_qkv_bias",
                  "dream", "dream_mha", "dream_tied"]
IDS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


@pytest.mark.parametrize("name", NUMERIC_MODELS)
def test_logits_match_reference(name):
    model = load(name)[0]
    ref = RefModel(ckpt(name))
    ids = IDS + [model.config.mask_id] * 6
    got = model(torch.tensor([ids]))[0]
    want = ref.logits(ids)
    assert got.shape == (len(ids), model.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the comparison has teeth: the logits are far from constant
    assert want.std() > 0.1


def test_reference_is_sensitive_to_gate_up_swap():
    """Sanity of the reference: swapping LLaDA's gate (ff_proj) and up branch changes the logits."""
    ref = RefModel(ckpt("llada"))
    ids = IDS
    a = ref.logits(ids)
    sd = ref.sd
    for i in range(2):
        b = f"model.transformer.blocks.{i}."
        sd[b + "ff_proj.weight"], sd[b + "up_proj.weight"] = sd[b + "up_proj.weight"], sd[b + "ff_proj.weight"]
    assert not torch.allclose(a, ref.logits(ids), atol=1e-3)


@pytest.mark.parametrize("name", ["llada_gqa", "dream"])
def test_left_padding_with_mask_and_positions(name):
    """A left-padded row with its attention mask and positions counted from its first real token gives
    the same logits on its real positions as the row alone."""
    model = load(name)[0]
    ref = RefModel(ckpt(name))
    short = IDS[:5] + [model.config.mask_id] * 4
    long = IDS + [model.config.mask_id] * 4
    pad = len(long) - len(short)
    x = torch.tensor([[model.config.eos_id] * pad + short, long])
    L = x.shape[1]
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[0, :pad] = False
    positions = torch.stack([(torch.arange(L) - pad).clamp(min=0), torch.arange(L)])
    out = model(x, positions=positions, attn_mask=valid[:, None, None, :])
    torch.testing.assert_close(out[0, pad:], ref.logits(short), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], ref.logits(long), rtol=1e-4, atol=1e-4)


def test_out_index_selects_head_rows():
    model = load("dream")[0]
    x = torch.tensor([IDS, IDS[::-1]])
    full = model(x)
    idx = torch.tensor([[0, 3, 5], [11, 2, 2]])
    part = model(x, out_index=idx)
    torch.testing.assert_close(part, full.gather(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Layer-level rounding rules (bf16)
# ------------------------------------------------------------------------------------------------
def test_rmsnorm_normalises_in_fp32_then_multiplies_in_dtype():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 64, generator=g) * 3).to(torch.bfloat16)
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_((1 + 0.1 * torch.randn(64, generator=g)).to(torch.bfloat16))
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    # and the other order (weight applied in fp32, one cast at the end) rounds differently
    other = (norm.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert not torch.equal(got, other)


def _rot_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def test_rope_rounding_llada_fp32_vs_dream_dtype():
    g = torch.Generator().manual_seed(1)
    B, n, H, D = 1, 40, 4, 16
    x = torch.randn(B, n, H * D, generator=g).to(torch.bfloat16)
    pos = torch.arange(100, 100 + n).unsqueeze(0)
    cos, sin = rope_tables(pos, D, 10000.0)
    assert cos.dtype == torch.float32 and cos.shape == (B, n, 1, D)
    # tables follow the formula (fp32 vs float64 angles: loose tolerance)
    ang = pos[0].double().unsqueeze(1) * (10000.0 ** (-torch.arange(0, D, 2).double() / D))
    torch.testing.assert_close(cos[0, :, 0, : D // 2].double(), ang.cos(), rtol=0, atol=1e-4)
    xh = x.view(B, n, H, D)
    # LLaDA: rotate in fp32, cast back
    want_llada = (xh.float() * cos + _rot_half(xh.float()) * sin).to(torch.bfloat16).reshape(B, n, -1)
    # Dream: cast cos/sin to the activation dtype first, rotate in bf16
    c, s = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    want_dream = (xh * c + _rot_half(xh) * s).reshape(B, n, -1)
    got_llada = apply_rope(x, cos, sin, D, fp32=True)
    got_dream = apply_rope(x, cos, sin, D, fp32=False)
    assert torch.equal(got_llada, want_llada)
    assert torch.equal(got_dream, want_dream)
    assert not torch.equal(got_llada, got_dream)
    assert load("llada")[0].config.rope_fp32 and not load("dream")[0].config.rope_fp32


# ------------------------------------------------------------------------------------------------
# Dream's logit shift in generation: the prediction for position j is read from output j - 1
# ------------------------------------------------------------------------------------------------
def _first_step(family, prompt, gen):
    model = decode_model(family)[0]
    with ForwardRecorder(model) as rec:
        generate(model, [prompt], gen)
    x0, x1 = rec.inputs[0][0], rec.inputs[1][0]
    changed = (x0 != x1).nonzero().flatten().tolist()
    return model, x0, x1, changed


def _choice(logits, mask_id):
    """(token, confidence) per row: argmax excluding the mask id, prob from the unmodified softmax."""
    probs = logits.float().softmax(-1)
    pick = logits.float().clone()
    pick[:, mask_id] = float("-inf")
    tok = pick.argmax(-1)
    return tok, probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


def test_dream_logit_shift_in_generation():
    """Single block, maskgit_plus, gen 16 / steps 8: the first step commits exactly one token
    (int(16 * (1 - s/t)) = 1). It must be the one the SHIFTED logits rank first."""
    gen = GenerationConfig(gen_length=16, steps=8, remasking="maskgit_plus", stop_at_eos=False)
    discriminative = 0
    for prompt in PROMPTS:
        model, x0, x1, changed = _first_step("dream", prompt, gen)
        P = len(prompt)
        with torch.no_grad():
            logits = model(x0.unsqueeze(0))[0]
        mid = model.config.mask_id
        shifted_tok, shifted_conf = _choice(logits[P - 1:P + 15], mid)  # output j-1 predicts j
        j = int(shifted_conf.argmax())
        assert changed == [P + j], (changed, P + j)
        assert int(x1[P + j]) == int(shifted_tok[j])
        plain_tok, plain_conf = _choice(logits[P:P + 16], mid)
        jp = int(plain_conf.argmax())
        if (jp, int(plain_tok[jp])) != (j, int(shifted_tok[j])):
            discriminative += 1
    assert discriminative >= 1, "the shifted and unshifted readings never differ: the test would not catch a missing shift"


def test_llada_has_no_logit_shift():
    """LLaDA gen 16 / steps 8: two tokens per step, chosen from the unshifted logits."""
    gen = GenerationConfig(gen_length=16, steps=8, stop_at_eos=False)
    for prompt in PROMPTS:
        model, x0, x1, changed = _first_step("llada", prompt, gen)
        P = len(prompt)
        with torch.no_grad():
            logits = model(x0.unsqueeze(0))[0]
        tok, conf = _choice(logits[P:P + 16], model.config.mask_id)
        top2 = sorted(torch.topk(conf, 2).indices.tolist())
        assert changed == [P + j for j in top2]
        assert all(int(x1[P + j]) == int(tok[j]) for j in top2)


def test_dream_block_first_position_from_block_start_forward():
    """Dream with blocks (Fast-dLLM block sampler): a block's first forward commits only the block's first
    position, with the token predicted by the output one to its left."""
    gen = GenerationConfig(gen_length=16, block_length=8, steps=8, remasking="entropy", stop_at_eos=False)
    model = decode_model("dream")[0]
    prompt = PROMPTS[0]
    P = len(prompt)
    with ForwardRecorder(model) as rec:
        generate(model, [prompt], gen)
    assert rec.calls == 8
    mid = model.config.mask_id
    for b, call in ((0, 0), (1, 4)):  # 4 forwards per block
        x0, x1 = rec.inputs[call][0], rec.inputs[call + 1][0]
        s = P + 8 * b
        assert (x0 != x1).nonzero().flatten().tolist() == [s]
        with torch.no_grad():
            logits = model(x0.unsqueeze(0))[0]
        tok, _ = _choice(logits[s - 1:s], mid)
        assert int(x1[s]) == int(tok[0])


def test_llada_spec_rope_theta_default_is_real():
    """The tiny default LLaDA config keeps the real LLaDA rope_theta (500000); the suite's decoding
    models override it on purpose (see engine_fixtures.SPECS)."""
    assert read_config(ckpt("llada_tied"))["rope_theta"] == 500000.0
    assert SPECS["llada"]["rope_theta"] == 10000.0
