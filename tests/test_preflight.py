"""The job's model check without the weights: the same refusals as a full load, no weight bytes read,
sizes and fingerprint right, object-store folders, and the GPU-memory refusal."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dllm_cache_core import load_model  # noqa: E402
from dllm_cache_core.models.fingerprint import model_fingerprint  # noqa: E402
from dllm_cache_core.models.loading import inspect_checkpoint  # noqa: E402
from engine_fixtures import ckpt, copy_ckpt  # noqa: E402
from pipeline import preflight as pf  # noqa: E402


def _edit(path: Path, fn, file="model.safetensors"):
    sd = load_file(str(path / file))
    fn(sd)
    save_file(sd, str(path / file), metadata={"format": "pt"})


def _drop_sharded_key(path: Path) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = "model.transformer.blocks.1.v_proj.weight"
    shard = index["weight_map"].pop(key)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _edit(path, lambda sd: sd.pop(key), file=shard)


def _pickle_only(path: Path) -> None:
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


BROKEN = {
    "missing key": ("llada", lambda p: _edit(p, lambda sd: sd.pop("model.transformer.blocks.1.up_proj.weight"))),
    "unexpected key": ("dream", lambda p: _edit(p, lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.bias",
                                                                              torch.zeros(64)))),
    "shape mismatch": ("llada_gqa", lambda p: _edit(p, lambda sd: sd.__setitem__(
        "model.transformer.blocks.1.k_proj.weight", torch.zeros(64, 64)))),
    "sharded missing key": ("llada_sharded", _drop_sharded_key),
    "pickle only": ("llada", _pickle_only),
    "config not json": ("llada", lambda p: (p / "config.json").write_text("{not json")),
    "config without a family": ("dream", lambda p: (p / "config.json").write_text('{"model_type": "gpt2"}')),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_same_refusal_as_a_full_load(tmp_path, case):
    name, breaker = BROKEN[case]
    path = copy_ckpt(name, tmp_path / "m")
    breaker(path)
    with pytest.raises(Exception) as full:
        load_model(path, tokenizer=False)
    with pytest.raises(Exception) as quick:
        inspect_checkpoint(path, tokenizer=False)
    assert type(quick.value) is type(full.value) and str(quick.value) == str(full.value)


def test_no_weight_bytes_are_read(tmp_path, monkeypatch):
    from dllm_cache_core.models import checkpoint

    monkeypatch.setattr(checkpoint, "FULL_HASH_LIMIT", 0)  # weight files hashed as the 16 GB ones are
    path = copy_ckpt("llada_sharded", tmp_path / "m")
    read: dict[str, int] = {}

    class Counting(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read[Path(self.name).name] = read.get(Path(self.name).name, 0) + len(data)
            return data

    files = [(f.name, f.stat().st_size) for f in path.iterdir()]
    info = inspect_checkpoint(path, tokenizer=False, files=files, open_file=lambda n: Counting(str(path / n)))
    shards = [f for f in path.iterdir() if f.suffix == ".safetensors"]
    assert len(shards) > 1 and info.files == tuple(sorted(f.name for f in shards))
    for f in shards:  # the 8-byte length and the JSON header, nothing of the data
        header_len = int.from_bytes(f.read_bytes()[:8], "little")
        assert read[f.name] <= 2 * (8 + header_len), (f.name, read[f.name], header_len)


def test_sizes_and_fingerprint_match_the_loaded_model(tmp_path):
    path = ckpt("llada")
    model, _ = load_model(path, dtype="bfloat16", tokenizer=False)
    info = inspect_checkpoint(path, dtype="bfloat16", tokenizer=False)
    params = list(model.state_dict().values())
    assert info.num_params == sum(t.numel() for t in params)
    assert info.weight_bytes == sum(t.numel() * t.element_size() for t in params)
    assert info.fingerprint == model_fingerprint(path)
    assert inspect_checkpoint(path, dtype="float32", tokenizer=False).weight_bytes == 2 * info.weight_bytes


def test_truncated_weight_file_is_refused(tmp_path):
    path = copy_ckpt("llada", tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        inspect_checkpoint(path, tokenizer=False)
    with pytest.raises(pf.PreflightError, match="failed to load, so the job did not start.*truncated"):
        pf.preflight(str(path), "auto", "float32", "cpu", 0)


def test_object_store_folder_checked_by_headers(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    src = Path(pf.inspect_checkpoint("builtin:tiny").path)
    for f in src.iterdir():
        if f.is_file():
            mem.pipe(f"/models/tiny/{f.name}", f.read_bytes())
    info = pf.check_model("memory://models/tiny", "auto", "float32")
    assert info.fingerprint == model_fingerprint("builtin:tiny")
    mem.pipe("/models/tiny/config.json", b"{not json")
    with pytest.raises(pf.PreflightError, match="failed to load"):
        pf.preflight("memory://models/tiny", "auto", "float32", "cpu", 0)


def test_weights_larger_than_the_gpu_are_refused(monkeypatch):
    need = inspect_checkpoint("builtin:tiny", tokenizer=False).weight_bytes
    monkeypatch.setattr(pf, "cluster_gpu_memory", lambda gpus: need)  # a GPU just the weights' size
    with pytest.raises(pf.PreflightError, match=r"compute.gpus_per_actor=1"):
        pf.preflight("builtin:tiny", "auto", "float32", "cuda", 1)
    monkeypatch.setattr(pf, "cluster_gpu_memory", lambda gpus: 4 * need)
    with pytest.raises(pf.PreflightError, match=r"compute.gpus_per_actor=0.2"):  # a fifth of a GPU each
        pf.preflight("builtin:tiny", "auto", "float32", "cuda", 0.2)
    assert pf.preflight("builtin:tiny", "auto", "float32", "cuda", 1).gpu_memory_bytes == 4 * need


def test_nvidia_smi_answer_parsed(monkeypatch):
    class Done:
        stdout = "81559\n143771\n"

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(pf.subprocess, "run", lambda *a, **k: Done())
    assert pf.local_gpu_memory() == [81559 << 20, 143771 << 20]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert pf.local_gpu_memory() is None
