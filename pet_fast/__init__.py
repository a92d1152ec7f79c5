"""pet_fast: fast parameter-efficient transfer learning for PyTorch.

Ops (each with an eager reference and, where built, Triton and CUDA backends chosen per call by
``pet_fast.dispatch``): :func:`bottleneck_adapter`, :func:`adapter_fusion`,
:func:`stacked_adapter_fusion`, :func:`masked_linear`, :func:`masked_weights`, :func:`prefix_attention`.
Modules: :class:`BottleneckAdapter`, :class:`AdapterFusion`, :class:`MaskedLinear`,
:class:`PrefixEncoder`, :class:`SideTuning`.
"""
from .dispatch import BackendUnavailableError, use_backend
from .tasks import inject, remove, set_active, task_parameters, trainable_parameters
from .io import load, register_importer, save
from .methods import (AdapterConfig, AdapterFusion, BottleneckAdapter, FusionConfig, MaskConfig, MaskedLinear,
                      PrefixConfig, PrefixEncoder, SideConfig, SideTuning, example_ids, fusion_regularization_loss, merge,
                      mixed_mask_tasks, pack_for_serving)
from .ops.adapter_fusion import adapter_fusion, stacked_adapter_fusion
from .ops.bottleneck_adapter import bottleneck_adapter
from .ops.mask_packing import pack_mask, unpack_mask
from .ops.masked_linear import masked_linear, masked_linear_multitask
from .ops.masked_weights import masked_weights
from .ops.prefix_attention import prefix_attention

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "adapter_fusion",
    "stacked_adapter_fusion",
    "bottleneck_adapter",
    "masked_linear",
    "masked_linear_multitask",
    "masked_weights",
    "pack_mask",
    "unpack_mask",
    "prefix_attention",
    "AdapterFusion",
    "BottleneckAdapter",
    "MaskedLinear",
    "PrefixConfig",
    "PrefixEncoder",
    "SideTuning",
    "use_backend",
    "inject",
    "remove",
    "set_active",
    "task_parameters",
    "trainable_parameters",
    "save",
    "load",
    "register_importer",
    "merge",
    "pack_for_serving",
    "mixed_mask_tasks",
    "example_ids",
    "fusion_regularization_loss",
    "AdapterConfig",
    "FusionConfig",
    "MaskConfig",
    "SideConfig",
    "BackendUnavailableError",
]
