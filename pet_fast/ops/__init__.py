"""The public ops: one module per hot path with its contract, eager reference and backends.

The functions are exported from ``pet_fast``; this package keeps the module names
(``pet_fast.ops.bottleneck_adapter`` is the module, ``pet_fast.bottleneck_adapter`` the function).
"""
