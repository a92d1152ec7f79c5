"""State a model keeps per thread: threads serving one model (a server's workers) must not see each other's."""
from __future__ import annotations

import threading


class ThreadSlot:
    """One value per thread (a ``threading.local``); a deep copy or a pickle of its holder starts it empty."""

    __slots__ = ("_local",)

    def __init__(self):
        self._local = threading.local()

    def get(self, default=None):
        return getattr(self._local, "value", default)

    def set(self, value) -> None:
        self._local.value = value

    def __deepcopy__(self, memo):
        return ThreadSlot()

    def __reduce__(self):
        return (ThreadSlot, ())
