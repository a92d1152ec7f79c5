"""``pet-fast`` (also ``python -m pet_fast``): info, demo, finetune, bench."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # report, never fail: info is for diagnosing broken installs
        return f"not available ({type(exc).__name__})"


def sample_calls(device, dtype):
    """One representative call description per op, for ``info`` (the shapes of a BERT-base layer)."""
    import torch

    from .ops import adapter_fusion, bottleneck_adapter, masked_linear, masked_weights, prefix_attention

    def t(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)

    def on_device(d):
        d["device"] = torch.device(device)
        return d

    x = t(32, 128, 768)
    adapter = bottleneck_adapter.describe(x, t(64, 768), "relu", 1.0, None)
    prefix = prefix_attention.describe(t(32, 12, 128, 64), t(32, 12, 128, 64), t(12, 20, 64), None, False)
    return {
        bottleneck_adapter.OP: on_device(adapter),
        bottleneck_adapter.OP + " (training: gradients needed)": on_device(dict(adapter, requires_grad=True)),
        bottleneck_adapter.OP + " (16 tokens, serving)": on_device(
            bottleneck_adapter.describe(t(16, 768), t(64, 768), "relu", 1.0, None)),
        adapter_fusion.OP: on_device(adapter_fusion.describe(x, 3)),
        adapter_fusion.OP_STACKED: on_device(adapter_fusion.describe(x, 3, r=64, activation="relu")),
        masked_linear.OP: on_device(masked_linear.describe(x, t(3072, 768), t(3072, 768).float(), t(3072))),
        masked_linear.OP + " (packed mask, 16 tokens)": on_device(masked_linear.describe(
            t(16, 4096), t(4096, 4096), None, None, torch.empty(4096, 128, dtype=torch.int32, device="meta"))),
        masked_linear.OP_MULTITASK: on_device(masked_linear.describe_multitask(
            t(16, 4096), t(4096, 4096), torch.empty(4, 4096, 128, dtype=torch.int32, device="meta"),
            torch.empty(16, dtype=torch.long, device="meta"), None)),
        masked_weights.OP + " (BERT-base's 72 linears)": on_device(masked_weights.describe(
            [t(768, 768).float()] * 48 + [t(3072, 768).float(), t(768, 3072).float()] * 12,
            [t(768, 768).float()] * 48 + [t(3072, 768).float(), t(768, 3072).float()] * 12, dtype)),
        prefix_attention.OP: on_device(prefix),
        prefix_attention.OP + " (training: gradients needed)": on_device(dict(prefix, requires_grad=True)),
        prefix_attention.OP + " (decode: 1 new token over a 512-token cache)": on_device(prefix_attention.describe(
            t(32, 32, 1, 128), t(32, 8, 512, 128), t(8, 20, 128), None, True)),
    }


def timing_tables() -> list:
    """One line per op with measured timings: where auto's order comes from (a GPU run's table or the
    design order when there is none)."""
    from .ops import _timings, masked_linear, prefix_attention

    path = _timings.SOURCE.get("path")
    if _timings.SOURCE.get("device") is not None:
        lines = [f"adapter ops:      {len(_timings.TABLE)} rows measured on {_timings.SOURCE['device']} ({path})"]
    else:
        lines = [f"adapter ops:      no table ({path}): design order cuda, triton, eager"]
    loaded, where = masked_linear._TIMINGS.get("rows"), masked_linear._TIMINGS.get("path")
    card = _timings.table_device(where) or "an unnamed card"
    lines.append(f"{'masked_linear:':17s} " + (f"measured on {card} ({where}): {len(loaded)} rows" if loaded
                                                else f"no table ({where}): design order"))
    lines.append(f"{'prefix_attention:':17s} {prefix_attention.timings_summary()}")
    return lines


def cmd_info(args) -> int:
    import torch

    from . import _ext, dispatch

    print(f"pet_fast      {_version('pet_fast')}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    print(f"torch         {torch.__version__}")
    print(f"triton        {_version('triton')}")
    print(f"transformers  {_version('transformers')}")
    cuda = torch.version.cuda or "none (CPU build of torch)"
    print(f"CUDA (torch)  {cuda}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"GPU {i}         {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
        device, dtype = "cuda", torch.bfloat16
    else:
        print("GPU           none visible")
        device, dtype = "cpu", torch.float32
    built, why = _ext.status(try_load=torch.cuda.is_available())
    if not torch.cuda.is_available():
        why = "not loaded: no CUDA device is visible"
    print(f"pet_fast._C   {'available' if built else 'absent'}: {why}")
    replay_off = os.environ.get("PET_FAST_TRITON_REPLAY", "1") == "0"
    replay = ("off (PET_FAST_TRITON_REPLAY=0)" if replay_off else
              "on: Triton launches recorded once per key, replayed from C++" if built and torch.cuda.is_available()
              else "off: needs pet_fast._C on a GPU (launches from Python)")
    print(f"replay        {replay}")
    if built and torch.cuda.is_available() and hasattr(_ext.load(), "bottleneck_adapter_small_form"):
        # the form the few-token cuda adapter forward takes at (16 tokens, d=768, r=64, bf16) on GPU 0
        shapes = ((16, 768), (64, 768), (768, 64))
        x, w_down, w_up = (torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in shapes)
        form = _ext.load().bottleneck_adapter_small_form(x, w_down, w_up)
        why = ("one launch" if form == "cluster"
               else "one launch needs sm_90+; PET_FAST_ADAPTER_CLUSTER=0 turns it off")
        print(f"few tokens    adapter forward (cuda, 16 x 768, r=64): {form} ({why})")
    choice, source = dispatch.requested()
    print(f"backend       {choice} (from {source})")
    print("\nmeasured timings behind auto:")
    for line in timing_tables():
        print(f"  {line}")
    print(f"\nbackend per op for a {dtype} call on {device} (first listed without reasons is taken by auto):")
    for label, info in sample_calls(device, dtype).items():
        op = label.split(" ")[0]
        try:
            chosen = dispatch.select(op, info).backend
        except dispatch.BackendUnavailableError as exc:
            chosen = f"none ({exc})"
        print(f"  {label}: {chosen}")
        for name, reasons in dispatch.explain(op, info):
            print(f"      {name:7s} {'ok' if not reasons else '; '.join(reasons)}")
    return 0


def cmd_demo(args) -> int:
    """Train one bottleneck adapter on a frozen random linear 'backbone' for a few steps (eager)."""
    import torch

    from . import BottleneckAdapter

    torch.manual_seed(0)
    d, r, n = 64, 8, 512
    backbone = torch.nn.Linear(d, d).requires_grad_(False)
    adapter = BottleneckAdapter(d, r, activation="gelu", init="identity")
    head = torch.nn.Linear(d, 2)
    x = torch.randn(n, d)
    y = (x[:, :4].sum(-1) > 0).long()
    opt = torch.optim.AdamW(list(adapter.parameters()) + list(head.parameters()), lr=1e-2)
    t0 = time.perf_counter()
    for step in range(args.steps):
        logits = head(adapter(backbone(x)))
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            acc = (logits.argmax(-1) == y).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  train accuracy {acc:.3f}")
    ms = (time.perf_counter() - t0) * 1000 / max(args.steps, 1)
    trainable = sum(p.numel() for p in adapter.parameters())
    print(f"adapter parameters: {trainable} (backbone frozen: {sum(p.numel() for p in backbone.parameters())}); {ms:.2f} ms/step")
    return 0


def _bounded(cast, expected: str, ok):
    """An argparse type: ``cast`` of the text, refused with "expected <expected>" unless ``ok`` of it."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


positive_int = _bounded(int, "a positive integer", lambda v: v >= 1)
nonnegative_int = _bounded(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _bounded(float, "a positive number", lambda v: 0.0 < v < float("inf"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pet-fast", description="Fast parameter-efficient transfer learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, the CUDA extension, and the backend each op takes here")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="train a bottleneck adapter on synthetic data (eager, CPU)")
    p.add_argument("--steps", type=positive_int, default=100)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("finetune", help="fine-tune a pretrained model on text classification with one method, and report")
    from . import finetune

    finetune.add_arguments(p)
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("bench", help="time training steps per method and the ops on this machine; JSON, chart, compare")
    from . import bench

    bench.add_arguments(p)
    p.set_defaults(func=lambda args: bench.main(args))
    return parser


def cmd_finetune(args) -> int:
    from . import finetune

    return finetune.main(args)


def main(argv=None) -> int:
    from .dispatch import BackendUnavailableError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, BackendUnavailableError) as exc:
        # what the user gave (paths, files, models, rows) was refused: the message, without a traceback
        print(f"pet-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
