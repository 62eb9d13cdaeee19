"""Side-by-side references: the public LLaDA generate.py, Fast-dLLM's loops (no cache,
prefix, dual; fixed schedule and threshold) and dLLM-Cache's hooks, on the same checkpoint and the
same random prompts as bench_engine.py.

Their code is not in this repository: tests/golden/fetch_refs.sh extracts it (pinned commits) into
the git-ignored .refs/; it needs transformers 4.49, installed from wheels into a separate folder that
only this process sees:

    PYTHONPATH=/tmp/refsite TORCHDYNAMO_DISABLE=1 python benchmarks/bench_refs.py \
        --ckpt /tmp/ckpt/llada-8b --shape-name llada-8b --out $OUT/refs_raw.jsonl

The model is Fast-dLLM's llada/model/modeling_llada.py (the hub LLaDA model plus its cache
arguments), built on the meta device and filled from our safetensors (no CPU init of 8B params).
TORCHDYNAMO_DISABLE=1 turns its @torch.compile'd SDPA wrapper into the plain call (no compile time
in a 10-minute run; the wrapper only adds guard overhead).

Timing: one warm-up generation stopped after 2 model calls, then a timed generation stopped once
--blocks blocks are complete (detected from the mask count of each full-length model input;
0 = the whole generation); tokens/s = batch x blocks x block_length / wall time. Per-block cost is
constant for the no-cache, dual and dLLM-Cache loops; the prefix loop's cost falls with the block
index, so it always runs in full.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import append_jsonl, env_info, random_prompts, sync  # noqa: E402

REFS = HERE.parent / ".refs"
FAST = REFS / "NVlabs+Fast-dLLM" / "llada"
LLADA = REFS / "ML-GSAI+LLaDA"
DLLMC = REFS / "maomaocun+dLLM-cache"


def load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_ref_model(ckpt: Path, device: str):
    """Fast-dLLM's LLaDAModelLM on the meta device, weights assigned from our safetensors."""
    sys.path.insert(0, str(FAST))
    from safetensors import safe_open

    from model import modeling_llada as ML  # type: ignore
    from model.configuration_llada import LLaDAConfig  # type: ignore

    cfg_json = json.loads((ckpt / "config.json").read_text())
    cfg = LLaDAConfig(**{k: v for k, v in cfg_json.items() if k != "torch_dtype"})
    mc = ML.create_model_config_from_pretrained_config(cfg)
    mc.init_device = "meta"
    core = ML.LLaDAModel(mc, init_params=False)
    lm = ML.LLaDAModelLM(cfg, model=core)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    dev = device if device != "cuda" else "cuda:0"
    state = {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / f), framework="pt", device=dev) as sf:
            for k in sf.keys():
                state[k] = sf.get_tensor(k)
    res = lm.load_state_dict(state, strict=True, assign=True)
    lm.eval().requires_grad_(False)
    return lm, cfg_json, res


class Stop(Exception):
    pass


class Limiter:
    """Counts model calls; stops the loop at the first full-length input after `blocks` blocks."""

    def __init__(self, model, full_len: int, gen_len: int, block: int, mask_id: int):
        self.full_len, self.gen_len, self.block, self.mask_id = full_len, gen_len, block, mask_id
        self.blocks = None
        self.max_calls = None
        self.calls = 0
        model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def arm(self, blocks=None, max_calls=None):
        self.blocks, self.max_calls, self.calls = blocks, max_calls, 0

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("input_ids")
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise Stop()
        if self.blocks and x is not None and x.shape[1] == self.full_len:
            left = int((x[:, -self.gen_len:] == self.mask_id).sum(1).max())
            if left <= self.gen_len - self.blocks * self.block:
                raise Stop()
        self.calls += 1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--shape-name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--blocks", type=int, default=2, help="blocks timed (0 = whole generation)")
    ap.add_argument("--cases", default="llada_gen:1,fast_none:1,fast_prefix:1,fast_dual:1,fast_dual_thr:1,"
                                        "fast_none_thr:1,fast_prefix_thr:1,llada_gen:8,dllm_cache:1,dllm_cache:8")
    ap.add_argument("--kp", type=int, default=50)
    ap.add_argument("--kr", type=int, default=2)
    ap.add_argument("--rou", type=float, default=0.25)
    ap.add_argument("--deadline-s", type=float, default=1e9)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = env_info()
    t0 = time.perf_counter()
    model, cfg_json, res = load_ref_model(Path(a.ckpt), device)
    load_s = time.perf_counter() - t0
    print(f"reference model loaded in {load_s:.1f}s ({res}); transformers {env.get('transformers')}; "
          f"TORCHDYNAMO_DISABLE={os.environ.get('TORCHDYNAMO_DISABLE')}", flush=True)
    mask_id = int(cfg_json["mask_token_id"])
    vocab = int(cfg_json.get("embedding_size") or cfg_json["vocab_size"])
    P, Gl, BL = a.prompt_len, a.gen_len, a.block
    lim = Limiter(model, P + Gl, Gl, BL, mask_id)
    fast = load_file("fastdllm_generate", FAST / "generate.py")
    llada = load_file("llada_generate", LLADA / "generate.py")
    hooked = False

    for case in a.cases.split(","):
        name, b = case.split(":")
        batch = int(b)
        left = a.deadline_s - (time.perf_counter() - t_start)
        if left < 10:
            print(f"skip {case} (deadline)", flush=True)
            continue
        prompts = torch.tensor(random_prompts(batch, P, vocab, (mask_id, cfg_json.get("eos_token_id")), seed=batch),
                               device=device)
        thr = a.threshold if name.endswith("_thr") else None
        policy = {"llada_gen": "none", "fast_none": "none", "fast_prefix": "prefix", "fast_dual": "dual",
                  "dllm_cache": "dllm_cache"}[name.replace("_thr", "")]
        blocks = 0 if "prefix" in name else a.blocks
        rec = dict(reference=name, model_shape=a.shape_name, policy=policy, threshold=thr, batch=batch,
                   prompt_len=P, gen_len=Gl, steps=Gl, block_length=BL)
        try:
            if name == "llada_gen":
                fn = lambda: llada.generate(model, prompts, steps=Gl, gen_length=Gl, block_length=BL,  # noqa: E731
                                            temperature=0.0, cfg_scale=0.0, remasking="low_confidence",
                                            mask_id=mask_id)
                src = "ML-GSAI/LLaDA generate.py generate()"
            elif name.startswith("fast_"):
                if batch != 1:
                    raise ValueError("Fast-dLLM's loops build a batch-1 canvas")
                f = {"none": fast.generate, "prefix": fast.generate_with_prefix_cache,
                     "dual": fast.generate_with_dual_cache}[policy]
                fn = lambda: f(model, prompts, steps=Gl, gen_length=Gl, block_length=BL, temperature=0.0,  # noqa: E731
                               remasking="low_confidence", mask_id=mask_id, threshold=thr)
                src = f"NVlabs/Fast-dLLM llada/generate.py {f.__name__}(threshold={thr})"
            else:  # dllm_cache hooks
                if not hooked:
                    sys.path.insert(0, str(DLLMC))
                    from dllm_cache.cache import dLLMCache  # type: ignore
                    from dllm_cache.hooks import register_cache_LLaDA  # type: ignore
                    dc = load_file("dllmcache_generate", DLLMC / "utils" / "generate_function.py")
                    dLLMCache.new_instance(prompt_interval_steps=a.kp, gen_interval_steps=a.kr,
                                           cfg_interval_steps=1, transfer_ratio=a.rou)
                    register_cache_LLaDA(model, "model.transformer.blocks")
                    for blk in model.model.transformer.blocks:  # Fast-dLLM passes replace_position
                        f0 = blk.forward
                        blk.forward = (lambda f0: lambda *x, replace_position=None, **k: f0(*x, **k))(f0)
                    hooked = True
                fn = lambda: dc.generate(prompts, None, model, steps=Gl, gen_length=Gl,  # noqa: E731
                                         block_length=BL, temperature=0.0, cfg_scale=0.0,
                                         remasking="low_confidence", mask_id=mask_id)
                src = f"maomaocun/dLLM-cache hooks + utils/generate_function.py (kp={a.kp}, kr={a.kr}, rou={a.rou})"
            with torch.no_grad():
                lim.arm(max_calls=2)
                try:
                    fn()
                except Stop:
                    pass
                if name == "dllm_cache":
                    from dllm_cache.cache import dLLMCache  # type: ignore
                    dLLMCache().reset_cache(P)
                sync()
                lim.arm(blocks=blocks or None)
                t0 = time.perf_counter()
                done_all = True
                try:
                    fn()
                except Stop:
                    done_all = False
                sync()
                wall = time.perf_counter() - t0
            n_blocks = Gl // BL if done_all else blocks
            rec.update(source=src, timed_blocks=n_blocks, full_generation=done_all, wall_s=round(wall, 3),
                       nfe=lim.calls, reference_tokens_per_s=round(batch * n_blocks * BL / wall, 2))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rec.update(error=type(e).__name__, error_msg=str(e)[:400])
        rec.update(ref_load_s=round(load_s, 1), torchdynamo_disabled=os.environ.get("TORCHDYNAMO_DISABLE") == "1",
                   **env)
        append_jsonl(a.out, rec)
        print(json.dumps({k: rec.get(k) for k in ("reference", "batch", "threshold", "timed_blocks", "wall_s",
                                                  "nfe", "reference_tokens_per_s", "error")}), flush=True)
    print(f"refs done in {time.perf_counter() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
