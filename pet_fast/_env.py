"""Environment switches that every op call reads (``PET_FAST_BACKEND``, ``PET_FAST_CUSTOM_OPS``,
``TRITON_INTERPRET``), read cheaply.

``os.environ.get`` encodes the name and decodes the value on each call: about 1.8 us on the CPU, and an op
call read three such switches, some twice, before its kernel launched (a few-token serving call is bound by
the host). On POSIX, ``os.environ`` keeps its contents in a dict of bytes (``os.environ._data``, which
``os.environ`` itself reads and writes, so a change through ``os.environ`` or ``monkeypatch.setenv`` is seen
at once); :func:`get` looks the encoded name up there. Elsewhere, and in code that torch.compile traces (it
guards on ``os.environ`` reads), it calls ``os.environ.get``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

_ENVIRON = os.environ
_DATA = getattr(_ENVIRON, "_data", None)
_FAST = os.name == "posix" and isinstance(_DATA, dict)
_KEYS: dict = {}  # name -> its encoded form, as os.environ encodes it


def get(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``."""
    if not _FAST or os.environ is not _ENVIRON or torch.compiler.is_compiling():
        return os.environ.get(name, default)  # (os.environ replaced, e.g. by a test: that mapping decides)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    value = _DATA.get(key)
    return default if value is None else os.fsdecode(value)
