"""A small, fast proving ground: an MLP on scikit-learn's digits (8x8 images).

Used by the demo and by the QAT tests: train in fp32, post-training
quantize (PTQ) with an observer, or fine-tune with QAT.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0) -> Digits:
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:
        raise ImportError("qlib demo: the digits dataset comes from scikit-learn, which is not installed: "
                          "pip install scikit-learn (or pip install -e '.[demo]'; scripts/demo.sh installs it)") from e

    data = sk_load()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = 450
    test, train = perm[:n_test], perm[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def make_mlp(hidden: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterable:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], y[idx]


def train(model: nn.Module, data: Digits, epochs: int, lr: float, seed: int = 0,
          batch_size: int = 64, progress: Optional[str] = None) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc=progress, leave=False)
    model.train()
    for epoch in epoch_iter:
        for xb, yb in batches(data.x_train, data.y_train, batch_size, seed + epoch):
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    model.eval()
    return (model(data.x_test).argmax(1) == data.y_test).float().mean().item() * 100


def train_fp32(seed: int = 0, epochs: int = 30, progress: Optional[str] = None):
    data = load_digits(seed)
    torch.manual_seed(seed)
    model = train(make_mlp(), data, epochs=epochs, lr=2e-3, seed=seed, progress=progress)
    return model, data


def fake_quant_ptq(model: nn.Module, data: Digits, config, calib_batches: int = 8) -> nn.Module:
    """Post-training quantization, simulated: qlib.prepare + calibrate on a few
    training batches, then fake quant on and observers frozen."""
    from .nn.fake_quantize import FakeQuantize
    from .workflows import calibrate, prepare

    q = prepare(copy.deepcopy(model), config)
    calib = [xb for xb, _ in batches(data.x_train, data.y_train, 128, seed=123)][:calib_batches]
    calibrate(q, calib, progress=False)
    for m in q.modules():
        if isinstance(m, FakeQuantize):
            m.enable_fake_quant().disable_observer()
    return q


def qat_finetune(model: nn.Module, data: Digits, config, epochs: int = 15, lr: float = 1e-3,
                 progress: Optional[str] = None) -> nn.Module:
    """Quantization-aware fine-tuning from a trained fp32 model."""
    from .workflows import prepare_qat

    q = prepare_qat(copy.deepcopy(model), config)
    return train(q, data, epochs=epochs, lr=lr, seed=1, progress=progress)
