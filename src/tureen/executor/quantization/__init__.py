"""Linear methods (unquantized and quantized) and the quantization configs that pick them per layer."""

from tureen.executor.quantization.base import (IDENTITY, SILU_MUL, Epilogue, LinearBackend, LinearMethod,
                                               LinearMethodFactory)

__all__ = ["IDENTITY", "SILU_MUL", "Epilogue", "LinearBackend", "LinearMethod", "LinearMethodFactory"]
