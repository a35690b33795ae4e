"""qlib.nn: quantized modules."""
from .fake_quantize import FakeQuantize
from .int8_linear import Int8Linear
from .linear_4bit import Linear4bit
from .qat_linear import QATLinear

__all__ = ["FakeQuantize", "Int8Linear", "Linear4bit", "QATLinear"]
