"""QATConfig: how the weights and activations of each Linear are fake-quantized."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

_GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@dataclass(frozen=True)
class QATConfig:
    """Quantization scheme for `prepare_qat` / `QATLinear`.

    Defaults: weights int8 per-channel symmetric (min-max observer);
    activations int8 per-tensor asymmetric with a moving-average observer.
    ``activation_bits=None`` leaves activations in float (weight-only, e.g. for
    4-bit weights that `convert` turns into `qlib.nn.Linear4bit`).
    Setting `weight_group_size` makes the weights per-group (groups along
    in_features). Observers are named by class or by class name in
    `qlib.observers`. `*_learnable` trains the scale (and the zero point when
    asymmetric) with LSQ / LSQ+ gradients.

    Immutable (a frozen dataclass: assigning a field raises ``dataclasses.FrozenInstanceError``),
    since each QATLinear keeps the config it was built with and a change would go unchecked and
    unapplied. Make a variant with ``dataclasses.replace(config, weight_bits=4)``, which checks it.
    """

    weight_bits: int = 8
    weight_symmetric: bool = True
    weight_granularity: str = "per_channel"
    weight_group_size: Optional[int] = None
    weight_observer: Union[str, type] = "MinMaxObserver"
    weight_learnable: bool = False
    activation_bits: Optional[int] = 8
    activation_symmetric: bool = False
    activation_observer: Union[str, type] = "MovingAverageMinMaxObserver"
    activation_learnable: bool = False

    def __post_init__(self):
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if bits is None and name == "activation_bits":
                continue
            if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
                raise ValueError(f"QATConfig.{name} must be an int in [2, 16], got {bits!r}")
        if self.weight_group_size is not None:
            if not isinstance(self.weight_group_size, int) or self.weight_group_size <= 0:
                raise ValueError(
                    f"QATConfig.weight_group_size must be a positive int, got {self.weight_group_size!r}"
                )
            object.__setattr__(self, "weight_granularity", "per_group")  # (frozen)
        if self.weight_granularity not in _GRANULARITIES:
            raise ValueError(
                f"QATConfig.weight_granularity must be one of {_GRANULARITIES}, got {self.weight_granularity!r}"
            )
        if self.weight_granularity == "per_group" and self.weight_group_size is None:
            raise ValueError("QATConfig.weight_granularity='per_group' needs weight_group_size (a variant of a "
                             "per-group config without groups: pass weight_granularity='per_channel' too)")
        self.weight_observer_class()
        if self.activation_bits is not None:
            self.activation_observer_class()

    @staticmethod
    def _observer_class(spec, field):
        from . import observers

        if isinstance(spec, str):
            cls = getattr(observers, spec, None) if spec in observers.__all__ else None
            if cls is None or not cls._stat_buffers:
                raise ValueError(f"QATConfig.{field}: no observer named {spec!r} in qlib.observers "
                                 f"(one of {[n for n in observers.__all__ if n != 'ObserverBase']})")
            return cls
        if not (isinstance(spec, type) and issubclass(spec, observers.ObserverBase) and spec._stat_buffers):
            raise ValueError(
                f"QATConfig.{field}: {spec!r} is not a qlib observer class: give a class of qlib.observers "
                f"(e.g. qlib.observers.MinMaxObserver, or a subclass) or its name; torch.ao's observers "
                f"and functools.partial are not taken")
        return spec

    def weight_observer_class(self):
        return self._observer_class(self.weight_observer, "weight_observer")

    def activation_observer_class(self):
        return self._observer_class(self.activation_observer, "activation_observer")

    def check_linear(self, in_features: int, out_features: int, fqn: str = "") -> None:
        """Raises ValueError when this config cannot quantize a Linear of that shape."""
        where = f" (module {fqn!r})" if fqn else ""
        if in_features == 0 or out_features == 0:
            raise ValueError(
                f"QATConfig: a Linear with in_features={in_features}, out_features={out_features}{where} has no "
                "weight to fake-quantize or observe; leave it out with filter_fn (quantize_dynamic and the "
                "4-bit swaps take it)")
        g = self.weight_group_size
        if self.weight_granularity == "per_group" and in_features % g != 0:
            raise ValueError(
                f"QATConfig.weight_group_size={g} does not divide in_features={in_features}{where}"
            )


def config_or_default(config, who: str) -> QATConfig:
    """config (None: the default QATConfig()); anything but a QATConfig is a TypeError that says
    what was given (`who` names the caller)."""
    if config is None:
        return QATConfig()
    if isinstance(config, QATConfig):
        return config
    if isinstance(config, type) and issubclass(config, QATConfig):
        got = f"the class {config.__name__} itself; make one: {config.__name__}(...)"
    elif isinstance(config, dict):
        got = "a dict; make a config of its fields: qlib.QATConfig(**fields)"
    else:  # (a torch.ao QConfig, ...)
        got = f"{type(config).__module__}.{type(config).__qualname__}"
    raise TypeError(f"{who}: config must be a qlib.QATConfig or None, got {got}")
