"""Weight quantization: layers that keep weights in fewer bits and compute with them.

Saving and loading a quantized model: ``lmlab.checkpoint.quantized``.
"""

from lmlab.quant.int4 import Float32Head, Int4Linear, int4_kernel_available
from lmlab.quant.int8 import Int8Linear, int8_kernel_available
from lmlab.quant.nf4 import NF4_CODE, NF4Linear, normal_float_code
from lmlab.quant.q8 import Q8_0Embedding, Q8_0Linear
from lmlab.quant.quantize import (
    dequantize_model,
    model_size_bytes,
    quantization_config,
    quantize_model,
)

__all__ = [
    "NF4_CODE",
    "Float32Head",
    "Int4Linear",
    "Int8Linear",
    "dequantize_model",
    "NF4Linear",
    "Q8_0Embedding",
    "Q8_0Linear",
    "int4_kernel_available",
    "int8_kernel_available",
    "model_size_bytes",
    "normal_float_code",
    "quantization_config",
    "quantize_model",
]
