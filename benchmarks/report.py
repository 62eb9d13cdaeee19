"""Merge raw GPU-run records into benchmarks/results/engine_<gpu>.json and write engine_<gpu>.md.

    python benchmarks/report.py --engine-raw RUN/engine_raw.jsonl --refs-raw RUN/refs_raw.jsonl \
        [--load RUN/load_8b.json] [--profiles RUN/prof] [--commands benchmarks/results/commands_<gpu>.txt]

engine_<gpu>.json is a list of self-contained records, accumulated over runs: a new record replaces
an older one with the same configuration and the same engine source hash; records of other engine
versions stay (the table shows the newest per configuration). Reference throughputs are attached
from the side-by-side runs (refs_<gpu>.json) of the same model shape:
- none: LLaDA generate.py at the same batch, else Fast-dLLM `generate` (batch 1);
- none + threshold: Fast-dLLM `generate(threshold)` (batch 1);
- prefix / dual (+ threshold): Fast-dLLM's prefix / dual loops (batch 1);
- dllm_cache: dLLM-Cache's hooks at the same batch (no threshold variant exists);
- d2cache, forced tokens-per-step and long cases: none measured (null).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import read_jsonl  # noqa: E402

KEY = ("model_shape", "policy", "threshold", "batch", "prompt_len", "gen_len", "steps")
ENGINE_KEYS = ("model_shape", "policy", "threshold", "batch", "prompt_len", "gen_len", "tokens_per_s", "ms_per_call",
               "nfe", "peak_mem_gb", "roofline_ratio", "reference_tokens_per_s", "gpu", "torch")


def key(r) -> tuple:
    return tuple(r.get(k) for k in KEY)


def load_json_list(p: Path) -> list:
    return json.loads(p.read_text()) if p.exists() else []


def pick_reference(r: dict, refs: list[dict]):
    ok = [x for x in refs if "error" not in x and x.get("model_shape") == r["model_shape"]
          and x.get("prompt_len") == r["prompt_len"] and x.get("gen_len") == r["gen_len"]
          and x.get("block_length", 32) == r.get("block_length", 32)]
    if r.get("steps") != r["gen_len"] or r.get("forced_tokens_per_step"):
        return None

    def find(name, batch, thr):
        c = [x for x in ok if x["reference"] == name and x["batch"] == batch and x.get("threshold") == thr]
        return c[-1] if c else None

    p, thr, b = r["policy"], r.get("threshold"), r["batch"]
    if p == "none":
        return (find("llada_gen", b, None) if thr is None else None) or find("fast_none" + ("_thr" if thr else ""), 1, thr)
    if p in ("prefix", "dual"):
        return find(f"fast_{p}" + ("_thr" if thr else ""), 1, thr)
    if p == "dllm_cache" and thr is None:
        return find("dllm_cache", b, None)
    return None


def fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-raw", nargs="*", default=[])
    ap.add_argument("--refs-raw", nargs="*", default=[])
    ap.add_argument("--load", default=None)
    ap.add_argument("--profiles", default=None, help="folder with profile_*.txt")
    ap.add_argument("--commands", default=None, help="text file with the exact commands of the runs")
    ap.add_argument("--notes", default=None, help="markdown inserted after the header (findings, targets)")
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--gpu", default=None)
    a = ap.parse_args(argv)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    new = [r for f in a.engine_raw for r in read_jsonl(f)]
    new_refs = [r for f in a.refs_raw for r in read_jsonl(f)]
    gpu = a.gpu or next((r["gpu"] for r in new + new_refs if r.get("gpu")), "unknown")
    ej, rj = res / f"engine_{gpu}.json", res / f"refs_{gpu}.json"
    recs, refs = load_json_list(ej), load_json_list(rj)
    for r in new_refs:
        refs = [x for x in refs if not (x["reference"] == r["reference"] and x["batch"] == r["batch"]
                                        and x.get("model_shape") == r.get("model_shape")
                                        and x.get("prompt_len") == r.get("prompt_len"))] + [r]
    for r in new:
        recs = [x for x in recs if not (key(x) == key(r) and x.get("engine_src_sha") == r.get("engine_src_sha"))] + [r]
    for r in recs:
        ref = pick_reference(r, refs) if "error" not in r else None
        r["reference_tokens_per_s"] = ref["reference_tokens_per_s"] if ref else None
        r["reference"] = f"{ref['reference']} (batch {ref['batch']})" if ref else None
        r["speedup_vs_reference"] = (round(r["tokens_per_s"] / ref["reference_tokens_per_s"], 2)
                                     if ref and r.get("tokens_per_s") else None)
        for k in ENGINE_KEYS:
            r.setdefault(k, None)
    ej.write_text(json.dumps(recs, indent=1) + "\n")
    rj.write_text(json.dumps(refs, indent=1) + "\n")

    # newest record per configuration for the tables
    latest: dict = {}
    for r in recs:
        if key(r) not in latest or r.get("date_utc", "") >= latest[key(r)].get("date_utc", ""):
            latest[key(r)] = r
    rows = sorted(latest.values(), key=lambda r: (r["model_shape"], r.get("case") or "", r["prompt_len"],
                                                  r.get("steps") or 0, r["policy"], r["threshold"] or 0, r["batch"]))
    env = next((r for r in reversed(recs) if r.get("gpu_full")), recs[-1] if recs else {})
    L = [f"# Engine benchmarks on {env.get('gpu_full', gpu)}", "",
         "Generated by benchmarks/report.py from the records in "
         f"`engine_{gpu}.json` (references: `refs_{gpu}.json`). Random bf16 weights (mask row of the head "
         "zeroed), random prompt tokens, greedy, `stop_at_eos=False` (every row generates all tokens), block 32.", "",
         f"- GPU: {env.get('gpu_full')} ({env.get('gpu_mem_gb')} GiB, {env.get('sms')} SMs); torch {env.get('torch')}"
         f" (CUDA {env.get('cuda')}), transformers {env.get('transformers')}, Python {env.get('python')}",
         f"- engine source hash (sha256 of dllm_cache_core/**/*.py, first 12): "
         f"{sorted({r.get('engine_src_sha') for r in rows})}", "",
         "Columns: tokens/s = generated tokens per second for the whole batch; `timing` = `full_generation` "
         "(wall clock of a whole generate call) or `steady_state_*` (whole blocks, or the first n calls of "
         "block 0, timed with CUDA events and scaled to the generation); ms/call = GPU time of one model "
         "call (mean; first = block-start forward, later = the other steps); gap = host time per call not "
         "covered by model calls (sampler + launch gaps); roofline = time of the same matmul + SDPA calls run "
         "bare / our time; ref = reference tokens/s (which one in the last column).", ""]
    if a.notes and Path(a.notes).exists():
        L += [Path(a.notes).read_text().strip(), ""]
    L += ["## Engine table", ""]
    hdr = ("| shape | case | policy | thr | batch | P+G | steps | tokens/s | timing | ms/call (first/later) | gap ms | "
           "nfe | peak GB | roofline | ref tok/s | x ref | reference | engine |")
    L += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['model_shape']} | {r.get('case')} | {r['policy']} | {fmt(r['threshold'])} | {r['batch']} | "
                     f"{r['prompt_len']}+{r['gen_len']} | {r.get('steps')} | error: {r['error']} "
                     f"{(r.get('error_msg') or '')[:80]} |||||||||| {r.get('engine_src_sha')} |")
            continue
        L.append(
            f"| {r['model_shape']} | {r.get('case')} | {r['policy']} | {fmt(r['threshold'])} | {r['batch']} | "
            f"{r['prompt_len']}+{r['gen_len']} | {r.get('steps')} | {fmt(r['tokens_per_s'])} | {r.get('timing')} | "
            f"{fmt(r['ms_per_call'], 2)} ({fmt(r.get('ms_first_call'), 2)}/{fmt(r.get('ms_later_calls'), 2)}) | "
            f"{fmt(r.get('host_gap_ms_per_call'), 2)} | {r['nfe']}{'*' if r.get('nfe_estimated') else ''} | "
            f"{fmt(r['peak_mem_gb'])} | {fmt(r['roofline_ratio'], 3)} | {fmt(r['reference_tokens_per_s'])} | "
            f"{fmt(r.get('speedup_vs_reference'), 2)} | {r.get('reference') or '–'} | {r.get('engine_src_sha')} |")
    L += ["", "`*` nfe estimated from the timed window (calls per block x blocks). `engine`: hash of the engine "
          "source the row was measured with (newest row per configuration; the notes above say which run each "
          "hash is).", ""]
    if refs:
        L += ["## References (same checkpoint and prompts)", "",
              "| shape | reference | batch | thr | tokens/s | timed blocks | nfe in window | wall s | source |",
              "|---|---|---|---|---|---|---|---|---|"]
        for x in refs:
            L.append(f"| {x.get('model_shape')} | {x['reference']} | {x['batch']} | {fmt(x.get('threshold'))} | "
                     f"{fmt(x.get('reference_tokens_per_s'))} | {x.get('timed_blocks')} | {x.get('nfe')} | "
                     f"{fmt(x.get('wall_s'), 2)} | {x.get('source') or x.get('error')} |")
        L += ["", f"References ran with transformers {next((x.get('transformers') for x in refs), '?')} "
              f"(wheels), TORCHDYNAMO_DISABLE={'1' if any(x.get('torchdynamo_disabled') for x in refs) else '0'} "
              "(Fast-dLLM's @torch.compile'd SDPA wrapper runs eagerly).", ""]
    if a.load and Path(a.load).exists():
        ld = json.loads(Path(a.load).read_text())
        L += ["## load_model on the 8B checkpoint", "", "```", json.dumps(ld, indent=1), "```", ""]
    if a.profiles and Path(a.profiles).exists():
        L += ["## Profiles (torch.profiler, 2 dual cached steps)", ""]
        for f in sorted(Path(a.profiles).glob("profile_*.txt")):
            head = f.read_text().splitlines()[:5]
            L += [f"- `{f.name}`:"] + [f"  - {h.lstrip('# ')}" for h in head if h.startswith("#") and "{" not in h]
        L.append("")
    if a.commands and Path(a.commands).exists():
        L += ["## Exact commands", "", "```", Path(a.commands).read_text().strip(), "```", ""]
    (res / f"engine_{gpu}.md").write_text("\n".join(L) + "\n")
    print(f"wrote {ej} ({len(recs)} records), {rj} ({len(refs)}), {res / f'engine_{gpu}.md'}")


if __name__ == "__main__":
    main()
