"""Nothing in pet_fast reaches the network: importing it, ``pet-fast info`` and module forwards run
with every outgoing connection refused, and none is even attempted."""
from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import no_network

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import no_network
no_network.install()
import torch
import pet_fast
from pet_fast import cli
assert cli.main(["info"]) == 0
x = torch.randn(2, 3, 16)
y = pet_fast.MaskedLinear(16, 16)(pet_fast.BottleneckAdapter(16, 4)(x))
(pk, pv), = pet_fast.PrefixEncoder(1, 2, 8, 3, projection_dim=8)(batch_size=2)
q = y.view(2, 3, 2, 8).transpose(1, 2)
out = pet_fast.prefix_attention(q, q, q, pk, pv, causal=True)
out.sum().backward()
print("ATTEMPTS", no_network.ATTEMPTS)
"""


@pytest.fixture
def blocked():
    """The attempts made during the test (the guard may already be on for the whole run)."""
    start = len(no_network.ATTEMPTS)
    mine = no_network.install()
    seen: list = []
    try:
        yield seen
    finally:
        seen.extend(no_network.ATTEMPTS[start:])
        if mine:
            no_network.uninstall()


def test_the_guard_refuses_and_records(blocked):
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError):
            s.connect(("127.0.0.1", 9))
    finally:
        s.close()
    assert len(no_network.ATTEMPTS) >= 2 and no_network.ATTEMPTS[-1][0] == "connect"


def test_import_info_and_forward_without_network():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    # no offline switches: pet_fast must not need them
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ATTEMPTS []" in proc.stdout, proc.stdout


def test_modules_in_process_with_network_blocked(blocked):
    import torch

    import pet_fast

    x = torch.randn(4, 8)
    n = len(no_network.ATTEMPTS)
    pet_fast.SideTuning(torch.nn.Linear(8, 8), pet_fast.BottleneckAdapter(8, 2))(x).sum().backward()
    pet_fast.AdapterFusion(8).fuse(x, x, x, [pet_fast.BottleneckAdapter(8, 2) for _ in range(2)])
    assert no_network.ATTEMPTS[n:] == []


NETWORK_MODULES = ("socket", "ssl", "http", "urllib.request", "urllib3", "requests", "httpx", "aiohttp",
                   "huggingface_hub", "ftplib", "smtplib", "xmlrpc")


def test_package_sources_import_no_network_module():
    """A static check of pet_fast/ and kernels/: no import of a networking library."""
    bad = []
    for root in (ROOT / "pet_fast", ROOT / "kernels"):
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for n in names:
                    if any(n == m or n.startswith(m + ".") for m in NETWORK_MODULES):
                        bad.append(f"{path.relative_to(ROOT)}: import {n}")
    assert not bad, bad
