"""Tensors between stages travel as numpy arrays (:mod:`curvdist.distributed.wire`): bit for bit the tensor sent, in
its dtype (bfloat16 included), writable on arrival, and a view sends only its own bytes, out of band (what Ray
copies into its object store once)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from curvdist.distributed.wire import pack, pack_all, unpack, unpack_all


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64])
def test_a_packed_tensor_arrives_bit_for_bit_and_writable(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(7, 5, generator=g) * 100).to(dtype)
    sent = pickle.loads(pickle.dumps(pack(t), protocol=5))
    got = unpack(sent)
    assert got.dtype == dtype and got.shape == (7, 5)
    assert torch.equal(got.view(torch.uint8) if dtype.is_floating_point else got,
                       t.view(torch.uint8) if dtype.is_floating_point else t)
    got.add_(1)  # its own memory: the received buffer is not shared with the sender's tensor
    assert not torch.equal(got, t)
    assert torch.equal(unpack(t), t)  # a tensor sent as it is passes through


def test_a_view_sends_only_its_bytes_out_of_band():
    """The part of a stage's vector for one tied weight: a view of a 10,000-entry vector, 1,200 of its entries."""
    v = torch.arange(10_000, dtype=torch.float32)
    part = v[3_000:4_200].view(40, 30)
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(pack(part), protocol=5, buffer_callback=buffers.append)
    assert sum(memoryview(b).nbytes for b in buffers) == 1_200 * 4
    assert len(head) < 1_000  # the data are not in the pickle itself
    got = unpack(pickle.loads(head, buffers=buffers))
    assert torch.equal(got, part)
    parts = unpack_all(pickle.loads(pickle.dumps(pack_all({"a": part, "b": v[:3].double()}), protocol=5)))
    assert torch.equal(parts["a"], part) and parts["b"].dtype == torch.float64
    assert np.array_equal(parts["b"].numpy(), [0.0, 1.0, 2.0])
