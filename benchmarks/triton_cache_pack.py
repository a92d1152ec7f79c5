"""Carry Triton's compile cache from a machine without a GPU to the GPU machine.

A short GPU session spends minutes compiling Triton kernels (every autotune configuration of every key).
``benchmarks/compile_check.py --cache-dir DIR`` compiles the same specialisations for sm_90 on a CPU;
this packs what a run needs of DIR (each entry's metadata, cubin and PTX: not the intermediate IRs) and
unpacks it on the GPU machine under its TRITON_CACHE_DIR (benchmarks/gpu_check.sh does when
``triton_warm_cache.tar.gz`` is in the repository root, or TRITON_WARM_CACHE names one).

Triton finds an entry only under the key it computes itself: a hash of its own build (libtriton and its
sources), of the kernel's source, specialisation and options, and of the ptxas and libdevice it uses. Entries
made with another Triton build are never looked up (gpu_check.sh prints the machine's libtriton hash); they
cost nothing but the unpacking. Entry groups name their files by absolute path: unpacking rewrites them.

    python benchmarks/triton_cache_pack.py pack DIR OUT.tar.gz
    python benchmarks/triton_cache_pack.py unpack IN.tar.gz DIR
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

KEEP = (".json", ".cubin", ".ptx")  # what loading a compiled kernel reads (__grp__ files are .json too)


def pack(cache_dir: str, out: str) -> int:
    """Pack every entry of ``cache_dir`` that holds a cubin; returns how many."""
    n = 0
    with tarfile.open(out, "w:gz") as tar:
        for entry in sorted(os.listdir(cache_dir)):
            path = os.path.join(cache_dir, entry)
            if not os.path.isdir(path) or not any(f.endswith(".cubin") for f in os.listdir(path)):
                continue
            for f in sorted(os.listdir(path)):
                if f.endswith(KEEP):
                    tar.add(os.path.join(path, f), arcname=f"{entry}/{f}")
            n += 1
    return n


def unpack(archive: str, cache_dir: str) -> int:
    """Unpack into ``cache_dir`` without replacing existing entries, group files pointing at the unpacked
    files; returns how many entries were added."""
    os.makedirs(cache_dir, exist_ok=True)
    added = set()
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            entry, _, name = m.name.partition("/")
            if not entry or "/" in name or name.startswith(".") or entry.startswith("."):
                raise ValueError(f"{archive}: unexpected member {m.name!r}")
            if os.path.exists(os.path.join(cache_dir, entry)) and entry not in added:
                continue  # Triton's own entry (or an earlier unpacking) stays
            os.makedirs(os.path.join(cache_dir, entry), exist_ok=True)
            added.add(entry)
            data = tar.extractfile(m).read()
            if name.startswith("__grp__"):
                group = json.load(io.BytesIO(data))
                group["child_paths"] = {c: os.path.join(cache_dir, entry, c) for c in group.get("child_paths", {})
                                        if c.endswith(KEEP)}
                data = json.dumps(group).encode()
            tmp = os.path.join(cache_dir, entry, f".{name}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, os.path.join(cache_dir, entry, name))
    return len(added)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("cache_dir")
    a.add_argument("out")
    b = sub.add_parser("unpack")
    b.add_argument("archive")
    b.add_argument("cache_dir")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        n = pack(args.cache_dir, args.out)
        print(f"packed {n} entries into {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    else:
        n = unpack(args.archive, args.cache_dir)
        print(f"unpacked {n} entries into {args.cache_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
