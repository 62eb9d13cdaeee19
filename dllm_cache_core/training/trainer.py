"""The training loop: seeded, time-bounded, checkpointed, resumable; bf16 autocast on GPU.

Why time-bounded: the GPU comes in leases of minutes. With `steps=0` the run measures its own step
time during warm-up and fixes the total so that the cosine schedule ends inside `max_minutes`; the
resolved total is logged and saved, so `--steps N` reproduces the run exactly (same init, same data,
same masks; GPU kernels aside). A run that resumes with a larger `--steps` starts a new schedule
phase (short warm-up, cosine to the floor) from the checkpoint's step.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..models import fused
from ..models.registry import model_config
from ..models.llada import LLaDAModelLM
from .checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from .data import BatchMaker, DataConfig, StepDataset
from .export import ArchConfig, config_json, export_model
from .objective import diffusion_loss
from .tokenizer import special_ids


@dataclass(frozen=True)
class TrainConfig:
    out: str
    """Folder for checkpoint parts, train_log.jsonl and eval.json."""
    tokenizer: str = "dllm_cache_core/builtin/tiny"
    """Folder holding tokenizer.json (built by `training.tokenizer`)."""
    export: Optional[str] = None
    """Write the trained model folder here at the end (None = no export)."""
    seed: int = 0
    steps: int = 0
    """Total optimizer steps; 0 = fit the schedule into max_minutes (measured early in the run); on
    resume, 0 or a larger number starts a new schedule phase from the checkpoint's step."""
    max_minutes: float = 6.3
    """Wall-clock budget of this run's training loop (save, export and eval come after)."""
    stop_after: int = 0
    """End this run after that many steps, keeping the schedule of `steps` (0 = no limit): splits a fixed
    schedule over several short leases, each resuming where the last stopped."""
    stop_minutes: float = 0.0
    """End this run after that many minutes of training, keeping the schedule fitted to max_minutes
    (0 = no limit): a time-fitted schedule split over several leases; the next run resumes it."""
    resume: bool = True
    """Continue from out/ckpt.pt.* when present."""
    init_from: Optional[str] = None
    """Start a new training phase from an exported model folder (config.json + model.safetensors, e.g.
    dllm_cache_core/builtin/tiny): its weights, a fresh optimizer, step 0 with the full warm-up and a
    cosine of its own. Its config.json must match the arch flags. Ignored when out/ holds a checkpoint
    (a resumed run continues that checkpoint, which already started from these weights)."""
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3
    """Floor of the masking ratio t."""
    device: str = "cuda"
    workers: int = 12
    log_every: int = 25
    ckpt_every_minutes: float = 3.0
    eval_size: int = 200
    """Held-out instances per task evaluated at the end (0 = no eval)."""
    arch: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=DataConfig)


CALIB = (100, 300)
"""Steps (counted from this run's first) between which the step time is measured when steps=0: late
enough that data workers, allocator and kernel caches are warm (the first run calibrated on steps
20-80, measured 111 ms/step against ~48 ms at steady state, and stopped at half its budget)."""


def init_weights(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers); norms = 1."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            nn.init.ones_(p)
        elif ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layers))
        else:
            nn.init.normal_(p, 0.0, std)


def lr_at(step: int, cfg: TrainConfig, phase_start: int, total: int) -> float:
    """Linear warm-up then cosine to min_lr_ratio, within the current phase [phase_start, total)."""
    warm = cfg.warmup_steps if phase_start == 0 else min(50, cfg.warmup_steps)
    s, n = step - phase_start, max(total - phase_start, 1)
    if s < warm:
        return cfg.lr * (s + 1) / warm
    frac = min(1.0, (s - warm) / max(n - warm, 1))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms (decaying a gain toward 0 only fights the normalisation)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


class _Log:
    """Interval means of loss and metrics (per task too) -> train_log.jsonl lines."""

    def __init__(self, path: Path):
        self.path = path
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.task_loss: dict[str, list[torch.Tensor]] = {}

    def add(self, task: str, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in {"loss": loss.detach(), **metrics}.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.task_loss.setdefault(task, []).append(loss.detach())
        self.count += 1

    def flush(self, **extra: Any) -> dict[str, Any]:
        rec = {k: round(float(v) / max(self.count, 1), 5) for k, v in self.sums.items()}
        rec["task_loss"] = {t: round(float(torch.stack(v).mean()), 4) for t, v in self.task_loss.items()}
        rec.update(extra)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.sums, self.count, self.task_loss = {}, 0, {}
        return rec


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[LLaDAModelLM, dict[str, Any]]:
    """A freshly initialised model and its config.json dict; special-token ids come from the tokenizer,
    so the checkpoint and the tokenizer cannot disagree."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(cfg.tokenizer) / "tokenizer.json"))
    cj = config_json(cfg.arch, tok.get_vocab_size(), special_ids(tok))
    torch.manual_seed(cfg.seed)
    model = LLaDAModelLM(model_config(cj)).to(device)
    init_weights(model, cfg.arch.n_layers)
    return model, cj


ARCH_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
             "max_sequence_length", "rope_theta", "mask_token_id", "eos_token_id")


def load_exported(model: nn.Module, cj: dict[str, Any], folder: str) -> None:
    """Copy an exported model folder's weights (bf16 on disk, upcast exactly) into `model`; every tensor
    must be present with its shape, and the folder's config.json must match this run's architecture."""
    from safetensors.torch import load_file

    folder_p = Path(folder)
    theirs = json.loads((folder_p / "config.json").read_text())
    diff = {k: (theirs.get(k), cj.get(k)) for k in ARCH_KEYS if theirs.get(k) != cj.get(k)}
    if diff:
        raise ValueError(f"init_from={folder}: config.json differs from this run's architecture: {diff}")
    state = load_file(str(folder_p / "model.safetensors"))
    own = model.state_dict()
    if set(state) != set(own):
        raise ValueError(f"init_from={folder}: tensor names differ (missing {sorted(set(own) - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - set(own))[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"init_from={folder}: {k} has shape {tuple(v.shape)}, model {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or continue) training; returns a summary (steps, final loss, export hash, eval)."""
    from tqdm import tqdm

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    model, cj = build_model(cfg, dev)
    opt = make_optimizer(model, cfg, fused=cuda)
    step, phase_start, total, elapsed_before = 0, 0, cfg.steps, 0.0
    if cfg.resume and checkpoint_exists(out):
        ck = load_checkpoint(out)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        m = ck["meta"]
        step, phase_start, elapsed_before = m["step"], m["phase_start"], m["train_seconds"]
        total = m["total_steps"]
        if cfg.steps > total or (cfg.steps == 0 and step >= total):
            phase_start, total = step, cfg.steps  # a new schedule phase (0 = calibrated below)
        print(f"resumed at step {step} (phase from {phase_start}, total {total})", flush=True)
    elif cfg.init_from:
        load_exported(model, cj, cfg.init_from)
        print(f"initialised from {cfg.init_from} (fresh optimizer, new schedule from step 0)", flush=True)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    maker = BatchMaker(str(Path(cfg.tokenizer) / "tokenizer.json"), cfg.data, cfg.seed)
    loader = torch.utils.data.DataLoader(
        StepDataset(maker, step, step + 10_000_000), batch_size=None, shuffle=False, num_workers=cfg.workers,
        pin_memory=cuda, prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
    log = _Log(out / "train_log.jsonl")
    print(f"params {n_params:,}; device {dev}; tokens/batch {cfg.data.tokens_per_batch}", flush=True)
    bar = tqdm(total=total or None, initial=step, mininterval=10.0, desc="train", dynamic_ncols=False)
    budget = cfg.max_minutes * 60
    t0, last_ckpt, calib = time.time(), time.time(), None
    run_start, tokens, data_wait, t_wait = step, 0, 0.0, time.time()
    for batch in loader:
        data_wait += time.time() - t_wait
        if (total and step >= total) or (cfg.stop_after and step >= run_start + cfg.stop_after):
            break
        if time.time() - t0 > budget:
            print(f"time budget reached at step {step}", flush=True)
            break
        if cfg.stop_minutes and time.time() - t0 > cfg.stop_minutes * 60:
            print(f"stop_minutes reached at step {step} (schedule total {total})", flush=True)
            break
        lr = lr_at(step, cfg, phase_start, total or 10 ** 9)
        for g in opt.param_groups:
            g["lr"] = lr
        task = batch.pop("task")
        batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        opt.zero_grad(set_to_none=True)
        loss, metrics = _loss_backward(model, batch, cj["mask_token_id"], cfg, step, dev,
                                       probe=step == run_start)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        log.add(task, loss, {**metrics, "grad_norm": gnorm})
        tokens += batch["ids"].numel()
        step += 1
        bar.update(1)
        if not total and step == run_start + CALIB[0]:
            calib = (time.time(), step)
        if not total and step == run_start + CALIB[1] and calib is not None:
            per = (time.time() - calib[0]) / (step - calib[1])
            total = step + int((budget - (time.time() - t0)) / per * 0.97)
            bar.total = total
            print(f"\nmeasured {per * 1000:.1f} ms/step -> total steps {total} (reproduce with --steps {total})",
                  flush=True)
        if step % cfg.log_every == 0:
            rec = log.flush(step=step, lr=lr, tokens=tokens, minutes=round((time.time() - t0) / 60, 3),
                            data_wait_s=round(data_wait, 2))
            bar.set_postfix(loss=rec["loss"], acc=rec.get("acc_masked"))
        if time.time() - last_ckpt > cfg.ckpt_every_minutes * 60:
            _save(out, model, opt, cfg, step, phase_start, total, elapsed_before + time.time() - t0)
            last_ckpt = time.time()
        t_wait = time.time()
    bar.close()
    train_s = time.time() - t0
    if log.count:
        log.flush(step=step, lr=lr, tokens=tokens, minutes=round(train_s / 60, 3))
    total = total or step
    _save(out, model, opt, cfg, step, phase_start, total, elapsed_before + train_s)
    summary: dict[str, Any] = {"step": step, "total_steps": total, "train_minutes_this_run": round(train_s / 60, 2),
                               "tokens_this_run": tokens, "data_wait_s": round(data_wait, 1), "params": n_params,
                               "fused_compile": fused.status(dev)}
    if cfg.export:
        summary["export_sha256"] = export_model(model.state_dict(), cj, cfg.tokenizer, cfg.export)
        print(f"exported {cfg.export} sha256 {summary['export_sha256']}", flush=True)
        if cfg.eval_size:
            from .quick_eval import evaluate_tasks

            summary["eval"] = evaluate_tasks(cfg.export, cfg.eval_size, cfg.device)
    summary["wall_minutes"] = round((time.time() - t_start) / 60, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def _loss_backward(model, batch: dict, mask_id: int, cfg: TrainConfig, step: int, dev: torch.device,
                   probe: bool) -> tuple[torch.Tensor, dict]:
    """Forward + backward of one step. On GPUs the model's elementwise chains are compiled
    (models/fused.py); the backward compiles lazily, so the run's first step is a probe: if compiling
    fails there, the step is redone eagerly and the run continues without compiling."""
    def once():
        gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + step)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, metrics = diffusion_loss(model, batch, mask_id, cfg.eps, gen)
        loss.backward()
        return loss, metrics

    if not probe or not fused.wants_compile(batch["ids"]):
        return once()
    try:
        return once()
    except Exception as e:  # noqa: BLE001 - a compiler failure must not end a lease's run
        fused.disable("the compiled training step", e)
        model.zero_grad(set_to_none=True)
        return once()


def _save(out: Path, model, opt, cfg: TrainConfig, step: int, phase_start: int, total: int, seconds: float) -> None:
    meta = {"step": step, "phase_start": phase_start, "total_steps": total, "train_seconds": seconds,
            "config": json.loads(json.dumps(asdict(cfg), default=str))}
    save_checkpoint(out, model, opt, meta)
