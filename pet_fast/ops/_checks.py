"""Argument checks shared by the ops. Every failure names the argument and what was expected, and
runs before any kernel is launched."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def optional_tensor(name: str, t, **kw) -> Optional[torch.Tensor]:
    return None if t is None else tensor(name, t, **kw)


def shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def meta_hint(t: torch.Tensor) -> str:
    """For device errors: why a tensor may be on the meta device, where it is."""
    if not t.is_meta:
        return ""
    return ("; a meta tensor holds no values: offloaded by accelerate? pet_fast reads some parameters without "
            "calling the modules that own them, so offloading hooks do not load them (see the README)")


def same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
                             f"{meta_hint(t)}")


def real_number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def needs_grad(*tensors) -> bool:
    """Whether autograd will record a call on these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_PLAIN = (str, bool, int, float, type(None))


def signature(*args) -> Optional[tuple]:
    """What an op's checks and dispatch description read of its arguments, as a hashable key for
    ``dispatch.plan``: per tensor its shape, dtype, device and requires_grad; per plain value (str, bool,
    int, float, None) its type and value. None when an argument is anything else (the call then runs its
    checks, which name what is wrong)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.shape, a.dtype, a.device, a.requires_grad))
        elif isinstance(a, _PLAIN):
            out.append((type(a), a))
        else:
            return None
    return tuple(out)


def info(x: torch.Tensor, **extra) -> dict:
    """What the dispatcher sees of a call: device, dtype, and op-specific facts."""
    d = {"device": x.device, "dtype": x.dtype}
    d.update(extra)
    return d
