"""The public ops: one module per hot path with its contract, eager reference and backends."""
from .adapter_fusion import adapter_fusion, stacked_adapter_fusion
from .bottleneck_adapter import bottleneck_adapter
from .mask_packing import pack_mask, unpack_mask
from .masked_linear import masked_linear, masked_linear_multitask
from .prefix_attention import prefix_attention

__all__ = ["adapter_fusion", "stacked_adapter_fusion", "bottleneck_adapter", "masked_linear", "masked_linear_multitask",
           "pack_mask", "unpack_mask", "prefix_attention"]
