"""Two gloo processes on the CPU: calculate_qparams all-reduces the statistics,
so both ranks get the same qparams, equal to one process that saw all the data."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import qlib
from qlib import observers as O

CONFIGS = [
    ("MinMaxObserver", dict(symmetric=True)),
    ("MinMaxObserver", dict(symmetric=False, ch_axis=0)),
    ("MovingAverageMinMaxObserver", dict(symmetric=False)),
    ("PercentileObserver", dict(symmetric=True)),
    ("PercentileObserver", dict(symmetric=False, ch_axis=0)),
    ("MSEObserver", dict(symmetric=True, bits=4)),
    ("MSEObserver", dict(symmetric=False)),
    ("EntropyObserver", dict(symmetric=True)),
    ("EntropyObserver", dict(symmetric=False, ch_axis=0)),
]


def _data(rank):
    g = torch.Generator().manual_seed(1234 + rank)
    # Different ranges per rank, so the histograms must be re-binned to merge.
    return [torch.randn(4, 3001, generator=g) * (1 + 3 * rank) + rank for _ in range(2)]


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    from qlib import observers as O

    out = []
    for name, kw in CONFIGS:
        obs = getattr(O, name)(**kw)
        for x in _data(rank):
            obs(x)
        out.append(obs.calculate_qparams())
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # no gloo teardown: it can abort at exit (test_qat.py's DDP worker)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo(tmp_path):
    from qlib import observers as O

    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for (name, kw), a, b in zip(CONFIGS, r0, r1):
        for ta, tb in zip(a, b):
            torch.testing.assert_close(ta, tb, rtol=0, atol=0, msg=f"{name} {kw}: ranks differ")
        if name == "MovingAverageMinMaxObserver":
            continue  # the average of the ranks' averages
        single = getattr(O, name)(**kw)
        for x in _data(0) + _data(1):
            single(x)
        for ta, ts in zip(a, single.calculate_qparams()):
            torch.testing.assert_close(ta, ts, rtol=0, atol=0, msg=f"{name} {kw}: differs from one process")


def _ddp_default_worker(rank, world, tmp):
    """prepare_qat + DDP with its default buffer broadcast; rank 1's first batch is the widest."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    out = []
    for obs in ("MinMaxObserver", "EntropyObserver"):
        torch.manual_seed(0)
        net = qlib.prepare_qat(nn.Sequential(nn.Linear(16, 4)), qlib.QATConfig(activation_observer=obs))
        ddp = nn.parallel.DistributedDataParallel(net)  # broadcast_buffers=True
        for x in _ddp_batches(rank):
            ddp(x).sum().backward()
        out.append(net[0].activation_fake_quant.calculate_qparams())
    # A rank that observed nothing (a standalone observer) still takes part in the all-reduce.
    obs = O.MinMaxObserver()
    if rank == 0:
        obs(_ddp_batches(0)[0])
    out.append(obs.calculate_qparams())
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    os._exit(0)


def _ddp_batches(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(8, 16, generator=g) * (50 if rank == 1 and t == 0 else 1) for t in range(3)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_buffer_broadcast_keeps_every_ranks_statistics(tmp_path):
    """The workflows tell DDP to leave the observers' statistics (they all-reduce them) and
    Int8Linear's packed weight (its layout is the local CPU kernel's) alone: DDP's default
    broadcast replaced every rank's statistics with rank 0's. A rank that observed nothing
    still takes part in calculate_qparams' all-reduce (it aborted the job)."""
    mp.spawn(_ddp_default_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for i, obs in enumerate(("MinMaxObserver", "EntropyObserver")):
        torch.manual_seed(0)
        net = qlib.prepare_qat(nn.Sequential(nn.Linear(16, 4)), qlib.QATConfig(activation_observer=obs))
        for x in _ddp_batches(0) + _ddp_batches(1):
            net[0].activation_fake_quant.observer(x)
        ref = net[0].activation_fake_quant.calculate_qparams()
        for got in (r0[i], r1[i]):
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=obs)
    single = O.MinMaxObserver()
    single(_ddp_batches(0)[0])
    for got in (r0[2], r1[2]):
        for a, b in zip(got, single.calculate_qparams()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    model = qlib.quantize_dynamic(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    assert model._ddp_params_and_buffers_to_ignore == ["0.weight_packed", "2.weight_packed"]
