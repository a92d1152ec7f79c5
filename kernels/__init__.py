"""Triton kernels, one file per op, shipped as ``pet_fast.kernels``. No autograd and no modules here:
the autograd wiring lives in ``pet_fast/ops/<op>.py``. Importing this package needs triton."""
