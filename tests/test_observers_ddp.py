"""Two gloo processes on the CPU: calculate_qparams all-reduces the statistics,
so both ranks get the same qparams, equal to one process that saw all the data."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
