"""altgrad: train nanoGPT with its matmuls in simulated 8-bit floating-point formats.

Formats and the bit-exact reference quantizer, per-tensor scaling, QuantizedLinear (Triton kernels on
CUDA, the torch reference elsewhere) and the one seam into a model, `quantize_model`. Kernels live in
`altgrad.kernels` and are imported only when used (they need triton).
"""

import importlib

# Public names and the submodule each lives in, imported on first use (PEP 562): `import altgrad`
# stays cheap, and `python -m altgrad.formats` (or any submodule run as a script) does not find its
# own module imported by the package first (runpy's RuntimeWarning).
_EXPORTS = {
    "altgrad.blockwise": ("quantize_blockwise", "quantize_blockwise_cast"),
    "altgrad.config": ("INHERIT", "LayerPrecisionRule", "LayerQuantConfig", "QuantizationConfig", "RoleConfig",
                       "create_mixed_precision_config"),
    "altgrad.data": ("DataNotFoundError", "TokenBatches", "load_meta"),
    "altgrad.formats": ("FORMAT_REGISTRY", "FormatSpec", "get_format"),
    "altgrad.linear": ("QuantizedLinear", "round_master_weights", "set_stats_level"),
    "altgrad.model": ("GPT", "GPTConfig"),
    "altgrad.quantize": ("QuantStats", "quantize", "quantize_operand", "quantize_ste", "quantize_with_stats",
                         "round_to_format"),
    "altgrad.reproducibility": ("get_rng_state", "set_rng_state", "set_seed_for_reproducibility"),
    "altgrad.scaling": ("AmaxHistory", "TensorScaler", "compute_scale"),
    "altgrad.surgery": ("dequantize_model", "describe_quantization", "quantize_model", "quantized_layers"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'altgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))


__version__ = "0.1.0"

__all__ = [
    # formats
    "FormatSpec", "FORMAT_REGISTRY", "get_format",
    # quantization
    "quantize", "quantize_operand", "quantize_ste", "quantize_with_stats", "round_to_format", "QuantStats",
    "quantize_blockwise", "quantize_blockwise_cast",
    # scaling
    "AmaxHistory", "TensorScaler", "compute_scale",
    # layers and models
    "QuantizedLinear", "round_master_weights", "set_stats_level",
    "quantize_model", "dequantize_model", "describe_quantization", "quantized_layers",
    # model, data, reproducibility
    "GPT", "GPTConfig", "TokenBatches", "load_meta", "DataNotFoundError",
    "set_seed_for_reproducibility", "get_rng_state", "set_rng_state",
    # configuration
    "RoleConfig", "LayerQuantConfig", "LayerPrecisionRule", "QuantizationConfig", "create_mixed_precision_config", "INHERIT",
]
