"""Whole training steps per method (see pet_fast/bench.py for what each row is).

    python benchmarks/bench_step.py --json out.json                 # GPU: BERT-base 32x128, 16x512, Llama ~1B 4x1024
    python benchmarks/bench_step.py --quick                         # CPU smoke run: tiny models, eager
    python benchmarks/bench_step.py --models bert-32x128 --rows floor 'houlsby/*' --budget-s 300

Same as ``pet-fast bench --step``; writes ``{"env", "step": {"label", "settings", "rows"}}``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pet_fast import bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(p)
    args = p.parse_args(argv)
    args.step, args.ops = True, False
    if not args.json:
        args.json = os.path.join("bench-results", "bench_step.json")
    return bench.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
