"""Weight quantization: layers that keep weights in fewer bits and compute with them."""

from lmlab.quant.int4 import Float32Head, Int4Linear, int4_kernel_available

__all__ = ["Float32Head", "Int4Linear", "int4_kernel_available"]
