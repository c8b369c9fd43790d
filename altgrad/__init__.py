"""altgrad: train nanoGPT with its matmuls in simulated 8-bit floating-point formats.

Formats and the bit-exact reference quantizer, per-tensor scaling, QuantizedLinear (Triton kernels on
CUDA, the torch reference elsewhere) and the one seam into a model, `quantize_model`. Kernels live in
`altgrad.kernels` and are imported only when used (they need triton).
"""

from altgrad.config import (
    INHERIT, LayerPrecisionRule, LayerQuantConfig, QuantizationConfig, RoleConfig, create_mixed_precision_config,
)
from altgrad.data import DataNotFoundError, TokenBatches, load_meta
from altgrad.formats import FORMAT_REGISTRY, FormatSpec, get_format
from altgrad.linear import QuantizedLinear, round_master_weights, set_full_stats
from altgrad.model import GPT, GPTConfig
from altgrad.quantize import QuantStats, quantize, quantize_ste, quantize_with_stats, round_to_format
from altgrad.blockwise import quantize_blockwise, quantize_blockwise_cast  # after quantize, which re-exports it
from altgrad.reproducibility import get_rng_state, set_rng_state, set_seed_for_reproducibility
from altgrad.scaling import AmaxHistory, TensorScaler, compute_scale
from altgrad.surgery import dequantize_model, describe_quantization, quantize_model, quantized_layers

__version__ = "0.1.0"

__all__ = [
    # formats
    "FormatSpec", "FORMAT_REGISTRY", "get_format",
    # quantization
    "quantize", "quantize_ste", "quantize_with_stats", "round_to_format", "QuantStats",
    "quantize_blockwise", "quantize_blockwise_cast",
    # scaling
    "AmaxHistory", "TensorScaler", "compute_scale",
    # layers and models
    "QuantizedLinear", "round_master_weights", "set_full_stats",
    "quantize_model", "dequantize_model", "describe_quantization", "quantized_layers",
    # model, data, reproducibility
    "GPT", "GPTConfig", "TokenBatches", "load_meta", "DataNotFoundError",
    "set_seed_for_reproducibility", "get_rng_state", "set_rng_state",
    # configuration
    "RoleConfig", "LayerQuantConfig", "LayerPrecisionRule", "QuantizationConfig", "create_mixed_precision_config", "INHERIT",
]
