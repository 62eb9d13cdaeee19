"""The step's index helpers: copy_rows_ is index_copy_ (bytewise, 8-byte words when rows allow),
device_tensor is torch.tensor, and d2cache's packing maps slots and packed tokens both ways."""
from __future__ import annotations

import pytest
import torch

from dllm_cache_core.cache.base import copy_rows_, device_tensor
from dllm_cache_core.cache.d2cache import _Packing


@pytest.mark.parametrize("shape,dtype", [((9, 16), torch.bfloat16), ((9, 6), torch.bfloat16), ((5, 3, 8), torch.float16),
                                         ((7, 5), torch.float32), ((6, 4), torch.int64)])
def test_copy_rows_equals_index_copy(shape, dtype):
    g = torch.Generator().manual_seed(0)
    dst = torch.randn(shape, generator=g).to(dtype)
    src = torch.randn((3,) + shape[1:], generator=g).to(dtype)
    idx = torch.tensor([4, 0, 2])
    want = dst.clone().index_copy_(0, idx, src)
    got = copy_rows_(dst, idx, src)
    assert got is dst and torch.equal(dst, want)


def test_copy_rows_into_a_view_of_a_flat_buffer():
    flat = torch.zeros(2 * 4 + 1, 8, dtype=torch.bfloat16)  # the KV store's layout: rows + trash row
    view = flat[:8].view(2, 4, 8)
    src = torch.randn(2, 4, 8).bfloat16()
    copy_rows_(view, torch.tensor([1, 0]), src)
    assert torch.equal(view[0], src[1]) and torch.equal(view[1], src[0]) and not flat[8].any()


def test_device_tensor_is_torch_tensor_on_cpu():
    assert torch.equal(device_tensor([3, 1], torch.long, "cpu"), torch.tensor([3, 1]))
    assert device_tensor([True, False], torch.bool, torch.device("cpu")).dtype == torch.bool


def test_packing_maps_both_ways():
    valid = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    p = _Packing.of(valid, 8)
    assert p.tok_slot[:5].tolist() == [0, 1, 6, 7, 8]
    assert p.tok_valid.tolist() == [True] * 5 + [False] * 3
    fv = valid.reshape(-1)
    assert torch.equal(p.tok_slot[p.slot_tok[fv]], torch.arange(9)[fv])  # slot -> token -> slot
