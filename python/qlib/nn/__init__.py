"""qlib.nn: quantized modules."""
from .int8_linear import Int8Linear

__all__ = ["Int8Linear"]
