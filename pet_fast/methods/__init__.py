"""One module per method: its nn.Modules (and, with the methods issue, its config and attach points)."""
from .adapter import BottleneckAdapter
from .fusion import AdapterFusion
from .mask import MaskedLinear
from .prefix import PrefixEncoder
from .side import SideTuning

__all__ = ["BottleneckAdapter", "AdapterFusion", "MaskedLinear", "PrefixEncoder", "SideTuning"]
