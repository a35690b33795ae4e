"""qlib.plot_calibration: a picture of what each observer chose."""
from __future__ import annotations

from typing import Dict, Iterable, Union

import torch
from torch import Tensor


def _name(obs) -> str:
    return type(obs).__name__.replace("Observer", "") or type(obs).__name__


def plot_calibration(x: Tensor, observers: Union[Dict[str, "torch.nn.Module"], Iterable], path: str,
                     bins: int = 200) -> Dict[str, float]:
    """Writes a PNG to `path`: the histogram of x (log counts) and, for each
    per-tensor observer, the clipping range [alpha, beta] it chose, with its
    fake-quant MSE on x in the legend. Each observer must have recorded x (or
    data like it). Returns {name: mse}. Draws on a matplotlib Figure of its own, not
    pyplot's: the caller's backend and open figures stay as they are."""
    import matplotlib
    from matplotlib.figure import Figure

    from ._ops import fake_quant

    if not isinstance(observers, dict):
        named = {}
        for o in observers:  # two of a class: "MinMax", "MinMax#2"
            base = name = _name(o)
            k = 2
            while name in named:
                name, k = f"{base}#{k}", k + 1
            named[name] = o
        observers = named
    data = x.detach().float().reshape(-1)
    data = data[torch.isfinite(data)]
    fig = Figure(figsize=(9, 4.5))  # (not registered with pyplot: nothing to close, even on an error)
    ax = fig.subplots()
    ax.hist(data.cpu().numpy(), bins=bins, color="0.75", log=True, label="x")
    mses = {}
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, obs) in enumerate(observers.items()):
        scale, zp = obs.calculate_qparams()
        if scale.numel() != 1:
            raise ValueError(f"qlib.plot_calibration: observer {name!r} is not per-tensor (scale shape {tuple(scale.shape)})")
        s, z = scale.reshape(()).item(), int(zp.reshape(()).item())
        alpha, beta = (obs.quant_min - z) * s, (obs.quant_max - z) * s
        y = fake_quant(data, scale.reshape(()).to(data.device), zp.reshape(()).to(data.device),
                       obs.quant_min, obs.quant_max)
        mse = torch.mean((y - data).double() ** 2).item()
        mses[name] = mse
        c = colors[k % len(colors)]
        ax.axvline(alpha, color=c, linestyle="--")
        ax.axvline(beta, color=c, linestyle="--", label=f"{name}: [{alpha:.3g}, {beta:.3g}], MSE {mse:.3g}")
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(f"calibration of {data.numel()} values")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # (at `path` as given, extension or not)
    return mses
