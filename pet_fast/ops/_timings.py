"""Measured timings that order the backends of the adapter ops for ``auto`` dispatch.

The table is the JSON written by ``benchmarks/bench_bottleneck_adapter.py --table PATH``:

    {"device": "...", "rows": [{"op": "bottleneck_adapter", "mode": "fwd" | "fwd+bwd", "dtype": "bfloat16",
                                "n": 16384, "d": 768, "r": 64, "k": 1, "us": {"eager": 62.8, "triton": 20.1}}]}

It is read once, at import, from ``$PET_FAST_DISPATCH_TABLE``, else ``pet_fast/ops/dispatch_table.json`` (the
committed measurements, shipped in the wheel; ``bench_bottleneck_adapter.py --table-from RESULTS.json --table
pet_fast/ops/dispatch_table.json`` rewrites it), else ``benchmarks/results/dispatch_table.json``. For a call, the row of the same op and mode
(forward only, or with gradients) nearest in log-size (n, d, r, k), preferring the call's dtype, orders
the backends it measured from fastest to slowest; backends it did not measure follow in the default
order. Without a table (nothing measured yet on a GPU) the order is the unmeasured default
``DEFAULT_ORDER``: cuda (which only accepts what it specialises in), then triton, then eager.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

DEFAULT_ORDER = ("cuda", "triton", "eager")
ENV_VAR = "PET_FAST_DISPATCH_TABLE"


def _default_path() -> Path:
    """A copy shipped inside the package (pet_fast/ops/dispatch_table.json) wins over the checkout's."""
    here = Path(__file__).resolve()
    shipped = here.parent / "dispatch_table.json"
    return shipped if shipped.is_file() else here.parents[2] / "benchmarks" / "results" / "dispatch_table.json"


SOURCE: dict = {}  # where the default table (TABLE) came from: {"path": ..., "device": None without one}


def load_table(path=None) -> list:
    """Rows as tuples (op, mode, dtype, log n, log d, log r, log k, backends fastest first). Without
    ``path`` (the table auto uses) it also records its path and card in :data:`SOURCE`."""
    default = path is None
    path = Path(path or os.environ.get(ENV_VAR) or _default_path())
    try:
        doc = json.loads(path.read_text())
    except OSError:  # no table: the design order
        doc = None
    except ValueError as exc:
        doc = _ignored(path, f"it is not JSON ({exc})")
    if doc is not None and not (isinstance(doc, dict) and isinstance(doc.get("rows", []), list)):
        doc = _ignored(path, 'expected an object {"device": ..., "rows": [...]}')
    if default:
        SOURCE.update(path=str(path), device=None if doc is None else str(doc.get("device", "?")))
    if doc is None:
        return []
    rows = []
    for row in doc.get("rows", []):
        try:
            us = {b: float(t) for b, t in row["us"].items() if t is not None and t == t}
            order = tuple(sorted(us, key=us.get))
            logs = tuple(math.log(max(int(row.get(key, 1)), 1)) for key in ("n", "d", "r", "k"))
            rows.append((str(row["op"]), str(row["mode"]), str(row.get("dtype", "")), *logs, order))
        except (AttributeError, KeyError, TypeError, ValueError):  # (a malformed row orders nothing)
            continue
    return rows


def _ignored(path: Path, why: str) -> None:
    """A timings table that cannot be read orders nothing (the design order): said once, naming the file."""
    import warnings

    warnings.warn(f"pet_fast: ignoring the timings table {str(path)!r}: {why}", RuntimeWarning, stacklevel=3)
    return None


TABLE = load_table()


def read_order_table(op: str, env_var: str, key: str, valid, expected: str, path=None):
    """``(doc[key], path)`` of an op's measured-order JSON: ``path``, else ``$env_var``, else
    ``<op>_timings.json`` beside this file; ``(None, path)`` without a file. ``valid(value)`` checks the
    entry; a file that fails it raises ValueError naming the file and the ``expected`` layout."""
    path = path or os.environ.get(env_var) or str(Path(__file__).with_name(f"{op}_timings.json"))
    if not os.path.isfile(path):
        return None, path
    with open(path) as f:
        doc = json.load(f)
    value = doc.get(key) if isinstance(doc, dict) else None
    if not valid(value):
        raise ValueError(f"{path}: a {op} timings table must be {expected}")
    return value, path


def table_device(path) -> str | None:
    """The card named by an order table's ``"device"`` entry (None when the file or the entry is absent)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError, TypeError):
        return None
    device = doc.get("device") if isinstance(doc, dict) else None
    return None if device is None else str(device)


def _hint(size) -> int:
    """A size as an int. Under torch.compile a symbolic size is read as its power-of-two class, found by
    comparisons (guards on the class's bounds): int() of it held the compiled graph to that exact token count
    (one recompilation per sequence length; fullgraph=True failed at dynamo's limit). The order only ranks
    correct backends."""
    if not torch.compiler.is_compiling():
        return int(size)
    k = 1
    while size >= 2 * k:
        k *= 2
    return k


def preference(op: str):
    """A preference function for ``dispatch.set_preference(op, ...)``, reading :data:`TABLE`."""

    def order(info) -> list:
        if not TABLE:
            return list(DEFAULT_ORDER)
        mode = "fwd+bwd" if info.get("requires_grad") else "fwd"
        dtype = str(info["dtype"]).replace("torch.", "")
        point = [math.log(max(_hint(info.get(key, 1)), 1)) for key in ("n", "d", "r", "k")]
        best, best_dist = None, None
        for row in TABLE:
            if row[0] != op or row[1] != mode:
                continue
            dist = sum(abs(a - b) for a, b in zip(point, row[3:7])) + (0.0 if row[2] == dtype else 100.0)
            if best_dist is None or dist < best_dist:
                best, best_dist = row, dist
        if best is None:
            return list(DEFAULT_ORDER)
        measured = list(best[7])
        return measured + [b for b in DEFAULT_ORDER if b not in measured]

    return order
