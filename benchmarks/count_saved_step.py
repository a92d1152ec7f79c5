"""Bytes a training step's forward keeps for the backward, per method against the frozen floor (no GPU needed).

Peak memory of a training step is the persistent state (weights, trainable parameters' gradients and AdamW
state) plus what the forward leaves alive for the backward. This script measures the second on the CPU,
for the step benchmark's rows (pet_fast/bench.py: the same model family, method configs and calls), in two
ways during one forward under bf16 autocast (fp16 under the Triton interpreter, which computes bf16 wrong;
bytes are bytes):

* saved: every tensor autograd packs for the backward (``torch.autograd.graph.saved_tensors_hooks``: also
  the SavedVariables of C++ nodes), each untyped storage counted once (by data pointer), attributed to the
  op that created it (its ``grad_fn``; "input"/"leaf" for tensors without one) and, where the saving node
  can be read back, to the saving node;
* alive: every storage created during the forward (a ``TorchDispatchMode`` keeps weak references) that is
  still alive when it returns, less the loss and logits. This also sees what a node keeps outside
  autograd's saved variables (plain tensor members of a C++ node, Python caches); ``alive - saved`` is
  reported as "held outside saved tensors".

Each row runs at two sequence lengths and the bytes are fitted per creator as ``a * tokens + b``, so the
table extrapolates to the step's batch (32 x 128 = 4096 tokens by default). Parameters, their gradients and
AdamW's two float32 states are added from the trainable parameter count, giving a modelled peak and its
ratio to the floor's. It is a proxy: the allocator's rounding and fragmentation, the backward's transient
buffers and cuBLAS workspaces are not in it.

    python benchmarks/count_saved_step.py                                   # eager, BERT-base (12 layers)
    python benchmarks/count_saved_step.py --backend triton --layers 2 --seq 16 32   # kernels, interpreter
    python benchmarks/count_saved_step.py --backend triton --replay ...     # through the C++ nodes (builds
                                                                            # csrc/triton_replay.cpp for the CPU)
    python benchmarks/count_saved_step.py --json out.json
"""
from __future__ import annotations

import argparse
import gc
import collections
import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = ["floor", "houlsby", "pfeiffer", "fusion3", "prefix20"]


def _set_interpreter(backend: str) -> None:
    # before triton is imported (pet_fast imports it lazily, only when a kernel runs)
    if backend == "triton":
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")


def _storage_key(t):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


def _creator(t) -> str:
    fn = t.grad_fn
    if fn is not None:
        return fn.name()
    return "leaf" if t.requires_grad else "input(no grad)"


class Counter:
    """Saved tensors (pack hook) and live storages (dispatch mode) of one forward."""

    def __init__(self, exclude_ptrs):
        self.exclude = exclude_ptrs  # storages of parameters and buffers: persistent, counted elsewhere
        self.saved = {}  # storage key -> record
        self.created = {}  # storage key -> (weak storage ref, nbytes, op)
        self._by_id = {}

    def pack(self, t):
        from torch.multiprocessing.reductions import StorageWeakRef

        key, nbytes = _storage_key(t)
        rec = self.saved.get(key)
        if rec is None or rec["ref"].expired():  # (a freed storage's address taken by a new one)
            rec = self.saved[key] = dict(ref=StorageWeakRef(t.untyped_storage()), bytes=nbytes, shape=tuple(t.shape), dtype=str(t.dtype).replace("torch.", ""),
                                         creator=_creator(t), savers=collections.Counter(), param=key[1] in self.exclude,
                                         refs=0)
        rec["refs"] += 1
        self._by_id[id(t)] = (key, t)
        return t

    def unpack(self, t):
        hit = self._by_id.get(id(t))
        if hit is not None and self._node is not None:
            self.saved[hit[0]]["savers"][self._node] += 1
        return t

    _node = None

    def attribute_savers(self, roots):
        """Walks the graph from ``roots`` and reads each node's saved tensors back (they then name their saver)."""
        seen, stack = set(), [r.grad_fn for r in roots if r is not None and r.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            self._node = node.name()
            try:
                if hasattr(node, "saved_tensors"):  # a Python autograd.Function's node
                    node.saved_tensors
                for attr in dir(node):
                    if attr.startswith("_saved_"):
                        try:
                            getattr(node, attr)
                        except Exception:  # noqa: BLE001 - attributes that cannot be read back are skipped
                            pass
            except Exception:  # noqa: BLE001
                pass
            self._node = None
            stack.extend(fn for fn, _ in node.next_functions if fn is not None)
        self._by_id.clear()


def _dispatch_mode(counter: Counter):
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    import torch

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    try:
                        key, nbytes = _storage_key(t)
                    except Exception:  # noqa: BLE001 - tensors without storage
                        continue
                    old = counter.created.get(key)
                    if (old is None or old[0].expired()) and key[1] not in counter.exclude and nbytes:
                        counter.created[key] = (StorageWeakRef(t.untyped_storage()), nbytes, str(func.overloadpacket.__name__))
            return out

    return Track()


def build_model(layers: int, hidden: int, heads: int, intermediate: int):
    import torch
    import transformers as tf

    cfg = tf.BertConfig(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_size=hidden,
                        num_attention_heads=heads, intermediate_size=intermediate, num_hidden_layers=layers)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(cfg).train()


def measure(row: str, *, backend: str, layers: int, hidden: int, heads: int, intermediate: int, batch: int,
            seq: int, dtype, warmup: int, replay_ext=None) -> dict:
    """One forward of the row's step with the counters on; returns saved / alive bytes by creator."""
    import torch

    import pet_fast
    from pet_fast import bench

    model = build_model(layers, hidden, heads, intermediate)
    model, _, params = bench.prepare(bench.Row("count", row, row, backend), model)
    spec = ("bert", batch, seq, False, "count")
    ids, mask, labels = bench.make_batch(spec, model.config.vocab_size, torch.device("cpu"))
    embed = model.get_input_embeddings()
    opt = bench.make_optimizer(params, "foreach")

    def forward():
        with pet_fast.use_backend(backend), torch.autocast("cpu", dtype=dtype):
            if row == "floor":
                with torch.no_grad():
                    emb = embed(ids)
                return model(inputs_embeds=emb.requires_grad_(), attention_mask=mask, labels=labels)
            return model(input_ids=ids, attention_mask=mask, labels=labels)

    replay = contextlib.nullcontext()
    if replay_ext is not None:
        from pet_fast.kernels import _replay

        replay = _replay.through_interpreter(replay_ext)
    with replay:
        for _ in range(warmup):  # the replay records its programs, then runs the nodes (a step's steady state)
            out = forward()
            out.loss.backward()
            opt.zero_grad(set_to_none=True)
            del out
        exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        counter = Counter(exclude)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack), _dispatch_mode(counter):
            out = forward()
        # garbage in reference cycles (frames, autograd contexts) would count as alive until the collector ran:
        # when it runs depends on the allocations before, and it changed a row's count by 30 MiB at 4096 tokens
        gc.collect()
        counter.attribute_savers([out.loss])
        # the saved storages alive when the forward returned (a node freed during the forward frees its own)
        live = {k: rec for k, rec in counter.saved.items() if not rec["ref"].expired()}
        result_keys = {_storage_key(t)[0] for t in (out.loss, out.logits)}
        alive = {k: (n, op) for k, (ref, n, op) in counter.created.items() if not ref.expired() and k not in result_keys}
        nodes = _node_names(out.loss)
        out.loss.backward()  # frees the graph (and checks the counted forward was a working one)
        del out
    saved = [dict({k: v for k, v in rec.items() if k != "ref"}, savers=dict(rec["savers"])) for rec in live.values()]
    trainable = sum(p.numel() * p.element_size() for p in params)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    act_saved = [s for s in saved if not s["param"]]
    saved_keys = {k for k, rec in live.items() if not rec["param"]}
    hidden_alive = {k: v for k, v in alive.items() if k not in saved_keys}
    return dict(row=row, backend=backend, tokens=batch * seq, layers=layers, saved=act_saved,
                saved_bytes=sum(s["bytes"] for s in act_saved),
                param_saved_bytes=sum(s["bytes"] for s in saved if s["param"]),
                alive_bytes=sum(n for n, _ in alive.values()),
                held_outside_saved=_sum_ops(hidden_alive),
                weights_bytes=weights, trainable_bytes=trainable, nodes=nodes)


def _sum_ops(d):
    c = collections.Counter()
    for n, op in d.values():
        c[op] += n
    return c


def _node_names(root):
    names, seen, stack = collections.Counter(), set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[node.name()] += 1
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return dict(names)


def by_creator(res: dict) -> dict:
    c = collections.Counter()
    for s in res["saved"]:
        c[f"{s['creator']} {s['dtype']}"] += s["bytes"]
    return c


def fit(a: dict, b: dict, tokens: int) -> dict:
    """Per-creator bytes fitted as slope * tokens + intercept from two runs, evaluated at ``tokens``."""
    ca, cb = by_creator(a), by_creator(b)
    ta, tb = a["tokens"], b["tokens"]
    out = {}
    for k in set(ca) | set(cb):
        ya, yb = ca.get(k, 0), cb.get(k, 0)
        slope = (yb - ya) / (tb - ta)
        out[k] = dict(per_token=slope, fixed=ya - slope * ta, at_tokens=slope * tokens + (ya - slope * ta))
    return out


def _extrapolate(a, b, key, tokens):
    slope = (b[key] - a[key]) / (b["tokens"] - a["tokens"])
    return slope * tokens + a[key] - slope * a["tokens"]


def summarise(runs: dict, tokens: int) -> dict:
    """Per row: fitted saved bytes at ``tokens``, modelled peak (weights + 3x trainable for grads and AdamW's
    two states + what the forward left alive), ratios to the floor."""
    out = {}
    for row, (a, b) in runs.items():
        saved = _extrapolate(a, b, "saved_bytes", tokens)
        alive = _extrapolate(a, b, "alive_bytes", tokens)
        held = dict(_fit_counter(a["held_outside_saved"], b["held_outside_saved"], a["tokens"], b["tokens"], tokens))
        static = b["weights_bytes"] + 3 * b["trainable_bytes"]  # weights; gradients and AdamW state of the trained
        out[row] = dict(saved=saved, alive=alive, held_outside_saved=sum(held.values()), held_by_op=held,
                        static=static, trainable=b["trainable_bytes"], weights=b["weights_bytes"],
                        peak=static + alive, by_creator=fit(a, b, tokens))
    _ratios(out)
    return out


def _ratios(out: dict) -> None:
    floor = out.get("floor")
    if floor:
        for r in out.values():
            r["saved_vs_floor"] = r["saved"] / floor["saved"]
            r["alive_vs_floor"] = r["alive"] / floor["alive"]
            r["peak_vs_floor"] = r["peak"] / floor["peak"]


def _fit_counter(ca, cb, ta, tb, tokens):
    for k in set(ca) | set(cb):
        ya, yb = ca.get(k, 0), cb.get(k, 0)
        slope = (yb - ya) / (tb - ta)
        yield k, slope * tokens + ya - slope * ta


def extrapolate_layers(a: dict, b: dict, layers: int, to_layers: int) -> dict:
    """Summaries at ``layers - 1`` (a) and ``layers`` (b) extrapolated linearly to ``to_layers``."""
    f = lambda x, y: y + (to_layers - layers) * (y - x)
    out = {}
    for row, rb in b.items():
        ra = a[row]
        r = {k: f(ra[k], rb[k]) for k in ("saved", "alive", "held_outside_saved", "static", "trainable", "weights", "peak")}
        r["held_by_op"] = {k: f(ra["held_by_op"].get(k, 0.0), v) for k, v in rb["held_by_op"].items()}
        r["by_creator"] = {}
        for k in set(ra["by_creator"]) | set(rb["by_creator"]):
            za = ra["by_creator"].get(k, dict(per_token=0.0, fixed=0.0, at_tokens=0.0))
            zb = rb["by_creator"].get(k, dict(per_token=0.0, fixed=0.0, at_tokens=0.0))
            r["by_creator"][k] = {m: f(za[m], zb[m]) for m in ("per_token", "fixed", "at_tokens")}
        out[row] = r
    _ratios(out)
    return out


def print_tables(summary: dict, tokens: int, title: str, file=None) -> None:
    file = file or sys.stdout
    mb = lambda v: f"{v / 2**20:9.1f}"
    print(f"\n## {title}: fitted to {tokens} tokens (MiB)", file=file)
    print(f"{'row':<10}{'saved':>10}{'alive':>10}{'outside':>10}{'weights':>10}{'3x train':>10}{'peak':>10}"
          f"{'saved/fl':>10}{'alive/fl':>10}{'peak/fl':>10}", file=file)
    for row, r in summary.items():
        print(f"{row:<10}{mb(r['saved'])} {mb(r['alive'])} {mb(r['held_outside_saved'])} {mb(r['weights'])} "
              f"{mb(3 * r['trainable'])} {mb(r['peak'])}{r.get('saved_vs_floor', 0):10.3f}{r.get('alive_vs_floor', 0):10.3f}"
              f"{r.get('peak_vs_floor', 0):10.3f}", file=file)
    floor = summary.get("floor", {}).get("by_creator", {})
    for row, r in summary.items():
        print(f"\n### {row}: saved bytes by creator op (MiB at {tokens} tokens; per token; vs floor)", file=file)
        rows = sorted(r["by_creator"].items(), key=lambda kv: -kv[1]["at_tokens"])
        for k, v in rows:
            f = floor.get(k, {}).get("at_tokens", 0.0)
            print(f"  {k:<52}{mb(v['at_tokens'])} {v['per_token']:10.0f} B/tok  {'+' if v['at_tokens'] >= f else ''}"
                  f"{(v['at_tokens'] - f) / 2**20:8.1f}", file=file)
        if r["held_by_op"]:
            held = {k: v for k, v in r["held_by_op"].items() if abs(v) > 2**16}
            if held:
                print("  held outside saved tensors: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in held.items()), file=file)


def detail(res: dict, file=None, top: int = 40) -> None:
    """Every saved storage of one run: bytes, shape, dtype, creator, savers."""
    file = file or sys.stdout
    print(f"\n#### {res['row']} ({res['backend']}, {res['tokens']} tokens, {res['layers']} layers): saved storages", file=file)
    for s in sorted(res["saved"], key=lambda s: -s["bytes"])[:top]:
        print(f"  {s['bytes']:>10} {str(s['shape']):<22} {s['dtype']:<9} {s['creator']:<34} {s['savers']}", file=file)


def build_replay_ext():
    """A CPU build of csrc/triton_replay.cpp + stacked_fusion_replay.cpp (as the tests' replay_ext)."""
    from benchmarks.common import cpu_test_module

    return cpu_test_module("pet_fast_count_saved_replay")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="eager", choices=["eager", "triton"])
    p.add_argument("--rows", nargs="+", default=ROWS, help=f"rows of the step benchmark ({' '.join(ROWS)}), and "
                   "fusion3-dropout: AdapterFusion with FusionConfig's default dropout on the scores (0.1 for BERT)")
    p.add_argument("--layers", type=int, default=None, help="BERT layers (default 12 eager, 2 triton)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, nargs=2, default=None, help="two sequence lengths to fit bytes = a*tokens + b "
                   "(default 32 64 eager, 16 32 triton)")
    p.add_argument("--tokens", type=int, default=32 * 128, help="tokens to extrapolate to (the step's 32 x 128)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16"],
                   help="autocast dtype (default bf16 eager, fp16 under the Triton interpreter)")
    p.add_argument("--replay", action="store_true", help="triton: through the C++ nodes (kernels/_replay.py)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the counted forward (default 1; 2 with "
                   "--replay: the first records the launches, the second makes the replayed calls)")
    p.add_argument("--to-layers", type=int, default=None,
                   help="also run layers - 1 and extrapolate every byte count linearly to this many layers (the "
                        "first layer differs: before a method's first trainable module nothing is saved)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--detail", action="store_true", help="print every saved storage of each row's larger run")
    p.add_argument("--json", help="write the runs and the summary here")
    args = p.parse_args(argv)
    _set_interpreter(args.backend)
    import torch

    import pet_fast.methods.fusion as fusion_method

    # the extrapolated step's tokens fold AdapterFusion's query and key (methods/fusion.py); the small measured
    # batches would not: ask for the step's path
    fusion_method.FOLD_MIN_TOKENS_PER_WIDTH = 0.0

    torch.set_num_threads(args.threads)
    layers = args.layers or (12 if args.backend == "eager" else 2)
    seqs = args.seq or ([32, 64] if args.backend == "eager" else [16, 32])
    interp = os.environ.get("TRITON_INTERPRET") == "1" and args.backend == "triton"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if interp else torch.bfloat16)
    replay_ext = build_replay_ext() if args.replay else None
    warmup = args.warmup if args.warmup is not None else (2 if args.replay else 1)
    depths = [layers] if not args.to_layers else [layers - 1, layers]
    if min(depths) < 1:
        p.error("--to-layers needs --layers >= 2 (it fits bytes = a * layers + b from layers - 1 and layers)")
    raw, summaries = [], {}
    for depth in depths:
        runs = {}
        for row in args.rows:
            pair = []
            for seq in seqs:
                res = measure(row, backend=args.backend, layers=depth, hidden=args.hidden, heads=args.heads,
                              intermediate=args.intermediate or 4 * args.hidden, batch=args.batch, seq=seq,
                              dtype=dtype, warmup=warmup, replay_ext=replay_ext)
                pair.append(res)
                raw.append(res)
                print(f"{row:<10} {depth:>2} layers, {seq:>4} tokens/row: saved {res['saved_bytes'] / 2**20:8.2f} MiB, "
                      f"alive {res['alive_bytes'] / 2**20:8.2f} MiB", flush=True)
            runs[row] = tuple(pair)
            if args.detail and depth == layers:
                detail(pair[-1])
        summaries[depth] = summarise(runs, args.tokens)
    name = f"{args.backend}{' + C++ nodes' if args.replay else ''}"
    dt = str(dtype).replace("torch.", "")
    summary = summaries[layers]
    print_tables(summary, args.tokens, f"{name}, BERT d={args.hidden} x {layers} layers, {dt} autocast")
    if args.to_layers:
        summary = extrapolate_layers(summaries[layers - 1], summaries[layers], layers, args.to_layers)
        print_tables(summary, args.tokens, f"{name}, BERT d={args.hidden}, {dt} autocast, extrapolated from "
                     f"{layers - 1} and {layers} layers to {args.to_layers}")
    if args.json:
        for r in raw:
            r["held_outside_saved"] = dict(r["held_outside_saved"])
        from benchmarks.common import environment

        doc = dict(env=environment(), settings=dict(vars(args), layers=layers, seq=seqs, dtype=str(dtype)),
                   summary=summary, summaries={str(k): v for k, v in summaries.items()}, runs=raw)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
