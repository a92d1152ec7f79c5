"""Refuse every outgoing network connection of this process, and remember who tried.

Used by tests/test_no_network.py, and usable for a whole test run:

    PYTHONPATH=tests python -m pytest -p no_network          # as a pytest plugin
    (or in tests/conftest.py:  import no_network; no_network.install())

Internet sockets (AF_INET, AF_INET6) may be created but not connected, and name lookups fail;
local (AF_UNIX) sockets, which multiprocessing and compilers' worker pools use, keep working.
"""
from __future__ import annotations

import socket

ATTEMPTS: list = []
_saved: dict = {}


class NetworkBlocked(OSError):
    """Raised instead of connecting: the tests run without a network."""


def _refuse(what, target):
    ATTEMPTS.append((what, repr(target)))
    raise NetworkBlocked(f"network access is blocked in the tests: {what} {target!r}")


def _is_local(sock) -> bool:
    return getattr(socket, "AF_UNIX", None) is not None and sock.family == socket.AF_UNIX


def install() -> bool:
    """Install the guard; False if it was already installed (then leave uninstalling to whoever did)."""
    if _saved:
        return False
    _saved.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
                  create_connection=socket.create_connection, getaddrinfo=socket.getaddrinfo,
                  gethostbyname=socket.gethostbyname)
    connect, connect_ex = _saved["connect"], _saved["connect_ex"]

    def guarded_connect(self, address):
        if _is_local(self):
            return connect(self, address)
        _refuse("connect", address)

    def guarded_connect_ex(self, address):
        if _is_local(self):
            return connect_ex(self, address)
        _refuse("connect_ex", address)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.create_connection = lambda address, *a, **kw: _refuse("create_connection", address)
    socket.getaddrinfo = lambda host, *a, **kw: _refuse("getaddrinfo", host)
    socket.gethostbyname = lambda host: _refuse("gethostbyname", host)
    return True


def uninstall() -> None:
    if not _saved:
        return
    socket.socket.connect = _saved["connect"]
    socket.socket.connect_ex = _saved["connect_ex"]
    socket.create_connection = _saved["create_connection"]
    socket.getaddrinfo = _saved["getaddrinfo"]
    socket.gethostbyname = _saved["gethostbyname"]
    _saved.clear()


# ----- as a pytest plugin (-p no_network) ------------------------------------------------------------
def pytest_configure(config):
    install()


def pytest_unconfigure(config):
    uninstall()


def pytest_terminal_summary(terminalreporter):
    if ATTEMPTS:
        terminalreporter.write_line(f"no_network: {len(ATTEMPTS)} connection attempt(s) refused: {ATTEMPTS[:5]}", red=True)
