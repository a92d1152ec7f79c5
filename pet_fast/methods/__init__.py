"""One module per method: its nn.Modules (and, with the methods issue, its config and attach points)."""
from .adapter import AdapterConfig, BottleneckAdapter
from .fusion import AdapterFusion, FusionConfig, fusion_regularization_loss
from .mask import MaskConfig, MaskedLinear, MaskScores, merge, mixed_mask_tasks, pack_for_serving
from .prefix import PrefixConfig, PrefixEncoder
from .side import SideBranch, SideConfig, SideNetwork, SideTuning, example_ids

__all__ = ["BottleneckAdapter", "AdapterFusion", "MaskedLinear", "PrefixConfig", "PrefixEncoder", "SideTuning",
           "AdapterConfig", "FusionConfig", "MaskConfig", "SideConfig", "MaskScores", "SideBranch", "SideNetwork",
           "fusion_regularization_loss", "merge", "pack_for_serving", "mixed_mask_tasks", "example_ids"]
