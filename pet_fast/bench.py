"""``pet-fast bench``: whole training steps per method, the op benchmarks, JSON, a chart, comparisons.

The step benchmark times one optimizer step (forward, backward, AdamW: fused by default, as Hugging Face's
Trainer runs it with torch >= 2.8; ``--optimizer foreach`` for torch.optim's default) of a classifier with
each method attached, beside the baselines measured in the same run:

* ``full``: full fine-tuning (every weight trains);
* ``floor``: the floor of any method here. Every base weight is frozen, only the classifier head
  trains, and the input embeddings are fed as ``inputs_embeds`` that require grad (looked up without
  a graph, then ``requires_grad_()``), so the backward computes activation gradients through every
  layer but no weight gradient of the backbone;
* ``base-forward``: a forward of the frozen base under ``torch.no_grad()`` (no step; the yardstick of
  side-tuning, whose base runs without a graph);
* each method (Houlsby, Pfeiffer, AdapterFusion over 3 Pfeiffer adapters, side-tuning with and
  without the base-output cache, and on a GPU with the base replayed from CUDA graphs (``side-graphs``,
  auto only), mask-tuning, prefix-tuning P=20/32) with ``pet_fast.use_backend``
  ``eager`` and ``auto``, eager and under ``torch.compile`` (default inductor backend; the
  ``auto`` rows only on a GPU, since ``auto`` takes eager for CPU tensors); on a GPU the key rows also
  under ``mode="reduce-overhead"`` (``+cudagraphs``: the step's forward and backward replayed as CUDA
  graphs, so the host's time per op drops out; the optimizer step stays eager);
* where AdapterHub's ``adapters`` or ``peft`` can be imported, their methods on the same batch.

Models are random-initialised from their configs (no download) with every dropout set to 0, so
that every row runs the same arithmetic (a fused path is not pushed off by dropout). On a GPU: bf16
autocast, fp32 weights, ``torch.cuda.synchronize()`` around every timed step, peak memory from
``torch.cuda.max_memory_allocated`` during the last warm-up step (weights, gradients, optimizer state and
activations of a step in the steady state; ``peak_mem_warmup_mb`` is the first warm-up steps' peak, with
Triton's autotuning buffers and first calls in it). On the CPU:
fp32, no compile by default (CPU results are the eager path; ``auto`` takes eager for CPU tensors),
and peak memory is not reported (n/a). Tokens/s counts every position of the batch, padding included.

On a GPU each eager row's timed steps alternate, in 5 rounds, with its model's floor (kept alive after
its own row), and ``vs_floor`` is the median of the per-round ratios (``vs_floor_rounds`` lists them;
``vs_full`` divides two such ratios): the host of a shared GPU machine was seen to change speed by a
third between two runs a minute apart, which ratios of separately timed rows would carry. ``--paired 0``
times each row alone, as on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

# name -> (family, batch, sequence length, left padding, size)
MODELS = {
    "bert-32x128": ("bert", 32, 128, False, "base"),
    "bert-16x512": ("bert", 16, 512, False, "base"),
    "llama1b-4x1024": ("llama", 4, 1024, True, "1b"),
}
QUICK_MODELS = {
    "bert-tiny-4x32": ("bert", 4, 32, False, "tiny"),
    "llama-tiny-4x32": ("llama", 4, 32, True, "tiny"),
}
METHODS = ["houlsby", "pfeiffer", "fusion3", "side", "side-cache", "side-graphs", "mask", "prefix20", "prefix32"]
# Rows of the GPU only, with auto and not compiled: side-tuning with the base replayed from CUDA graphs
# (SideConfig(base_graphs=True); the CPU and torch.compile run the eager base, as the "side" rows do)
GPU_GRAPH_METHODS = ["side-graphs"]
EXTERNAL = ["adapters-houlsby", "adapters-pfeiffer", "adapters-prefix20", "adapters-fusion3", "peft-prefix20"]


@dataclass
class Row:
    model: str
    row: str  # e.g. "houlsby/auto+compile"
    kind: str  # full | floor | base-forward | <method> | <external>
    backend: Optional[str] = None
    compiled: bool = False
    result: Dict = field(default_factory=dict)
    compile_mode: Optional[str] = None  # torch.compile's mode: None (default) or "reduce-overhead" (CUDA graphs)


# Suffixes of the compiled rows' names, by torch.compile mode.
COMPILE_SUFFIX = {None: "+compile", "reduce-overhead": "+cudagraphs"}


# The compiled rows measured right after the first model's eager rows (the targets' rows): the
# floor, the fast (auto) path of each method, full fine-tuning. The rest come after every eager row.
KEY_COMPILED = ["floor", "houlsby/auto", "pfeiffer/auto", "fusion3/auto", "prefix20/auto", "mask/auto",
                "side/auto", "side-cache/auto", "full"]


# Methods with fused kernels: on a GPU their "<method>/triton" row times the kernels' path whatever auto
# chooses (auto follows the committed timing tables, which may predate a kernel's latest version).
KERNEL_ROWS = ["houlsby", "pfeiffer", "fusion3", "mask", "prefix20"]
# ... and "<method>/cuda" rows where the cuda backend takes every call of the method's step: the adapters
# (beyond 64 tokens, the adapter's C++ autograd node)
CUDA_ROWS = ["houlsby", "pfeiffer"]
# ... and "<method>/triton-py": the triton path with every Triton launch from Python, where the triton
# rows replay recorded launches from C++ (pet_fast/kernels/_replay.py): what the replay saves per step
PY_LAUNCH_ROWS = ["houlsby", "pfeiffer"]
# ... and methods timed with the kernels' rows only (auto): AdapterFusion with dropout 0.1 on its scores (BERT's
# attention dropout, which FusionConfig takes by default; every other dropout of the step stays 0)
KERNEL_ONLY_METHODS = ["fusion3-dropout"]


def plan(models: List[str], *, compile_rows: bool, auto_rows: bool = True, kernel_rows: bool = False,
         cudagraph_rows: bool = False) -> List[Row]:
    """Every row, in the order a time budget should cut last to first: the first model's eager rows,
    its key compiled rows (KEY_COMPILED; with ``cudagraph_rows`` each also under
    ``mode="reduce-overhead"``, named ``+cudagraphs``), the other models' eager rows, then every other
    compiled row."""
    eager, key, rest = [], [], []
    for i, m in enumerate(models):
        # the floor first: the eager rows after it are timed in rounds against it (step_benchmark's `paired`)
        rows = [Row(m, "floor", "floor"), Row(m, "full", "full"), Row(m, "base-forward", "base-forward")]
        for meth in METHODS:
            backends = ("eager", "auto") if auto_rows else ("eager",)
            if meth in GPU_GRAPH_METHODS:
                if not auto_rows:
                    continue
                backends = ("auto",)
            if kernel_rows and meth in KERNEL_ROWS:
                backends += ("triton",)
            if kernel_rows and meth in CUDA_ROWS:
                backends += ("cuda",)
            if kernel_rows and meth in PY_LAUNCH_ROWS:
                backends += ("triton-py",)
            for be in backends:
                rows.append(Row(m, f"{meth}/{be}", meth, be))
        if kernel_rows and auto_rows and i == 0:  # (the first model's: the targets' batch)
            rows += [Row(m, f"{meth}/auto", meth, "auto") for meth in KERNEL_ONLY_METHODS]
        rows += [Row(m, ext, ext) for ext in EXTERNAL if _external_available(ext)]
        comp = [Row(m, f"{r.row}+compile", r.kind, r.backend, True) for r in rows
                if r.kind != "base-forward" and r.kind not in GPU_GRAPH_METHODS + KERNEL_ONLY_METHODS
                and r.backend not in ("triton", "cuda", "triton-py")]
        comp.sort(key=lambda r: KEY_COMPILED.index(r.row[:-len("+compile")]) if r.row[:-len("+compile")] in KEY_COMPILED
                  else len(KEY_COMPILED))
        first = [r for r in comp if r.row[:-len("+compile")] in KEY_COMPILED]
        if i == 0:
            eager = rows + eager
            if compile_rows:
                key += first
                if cudagraph_rows:  # CUDA graphs replay the whole step: no host time per op
                    key += [Row(m, r.row[:-len("+compile")] + COMPILE_SUFFIX["reduce-overhead"], r.kind, r.backend, True,
                                compile_mode="reduce-overhead") for r in first]
                rest += [r for r in comp if r not in first]
        else:
            eager += rows
            if compile_rows:
                rest += comp
    return _interleave(models, eager, key) + rest


def _interleave(models, eager, key):
    first = [r for r in eager if r.model == models[0]]
    return first + key + [r for r in eager if r.model != models[0]]


def _external_available(name: str) -> bool:
    module = "adapters" if name.startswith("adapters-") else "peft"
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------- models and batches

def build_model(spec, device):
    import transformers as tf

    family, _, _, _, size = spec
    if family == "bert":
        dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    vocab_size=1000) if size == "tiny" else {}
        cfg = tf.BertConfig(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **dims)
        cls = tf.BertForSequenceClassification
    else:
        if size == "tiny":
            dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=1000)
        else:  # ~1.03e9 parameters: the shape of Llama-3.2-1B with a 32k vocabulary
            dims = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4,
                        intermediate_size=8192, vocab_size=32000)
        cfg = tf.LlamaConfig(num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             max_position_embeddings=2048, attention_dropout=0.0, **dims)
        cls = tf.LlamaForSequenceClassification
    cfg._attn_implementation = "sdpa"
    with torch.device(device):  # initialise on the device: a 1B model initialised on the CPU is slow
        model = cls(cfg)
    return model.train()


def make_batch(spec, vocab: int, device, seed: int = 0):
    family, B, T, left_pad, _ = spec
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if left_pad:  # a quarter of the rows padded on the left by a quarter of the length
        for i in range(0, B, 4):
            mask[i, : T // 4] = 0
            ids[i, : T // 4] = 0
    labels = torch.randint(0, 2, (B,), generator=g)
    return ids.to(device), mask.to(device), labels.to(device)


def prepare(row: Row, model, seq_len: Optional[int] = None):
    """Attach the row's method; return (model to call, extra call keywords, trainable parameters).
    ``seq_len``: the batch's length (prefix rows shift positions only where the position table has room)."""
    import pet_fast

    kind, kw = row.kind, {}
    if kind == "full":
        pass
    elif kind in ("floor", "base-forward"):
        head = _head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        if kind == "floor":
            for p in head.parameters():
                p.requires_grad_(True)
    elif kind in ("houlsby", "pfeiffer"):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement=kind), "task")
    elif kind in ("fusion3", "fusion3-dropout"):
        for n in ("a", "b", "c"):
            pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer"), n)
        drop = 0.1 if kind == "fusion3-dropout" else 0.0
        pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a", "b", "c"], dropout_prob=drop), "task")
    elif kind in ("side", "side-cache", "side-graphs"):
        pet_fast.inject(model, pet_fast.SideConfig(cache=kind == "side-cache", base_graphs=kind == "side-graphs"), "task")
    elif kind == "mask":
        pet_fast.inject(model, pet_fast.MaskConfig(), "task")
    elif kind.startswith("prefix"):
        # Like for like with the peft-prefix20 row: a flat prefix (PEFT's default prefix_projection=False),
        # positions shifted by P as PEFT's cache does, the classifier trained (PEFT's modules_to_save for
        # SEQ_CLS): the same trainable parameters (370178 at BERT-base, P=20). The BERT batch has no
        # padding: neither path passes SDPA a mask. Where T + P passes BERT's 512 absolute positions (16 x 512),
        # positions are not shifted (AdapterHub's way; PEFT's prefix fails there).
        P = int(kind[len("prefix"):])
        limit = getattr(model.config, "max_position_embeddings", None) if pet_fast.models.family(model) == "bert" else None
        shift = limit is None or seq_len is None or seq_len + P <= limit
        pet_fast.inject(model, pet_fast.PrefixConfig(prefix_length=P, shift_positions=shift), "task")
    elif kind.startswith("adapters-"):
        model = _adapterhub(model, kind[len("adapters-"):])
    elif kind.startswith("peft-"):
        model = _peft(model, kind[len("peft-"):])
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    return model, kw, [p for p in model.parameters() if p.requires_grad]


def _head(model):
    head = getattr(model, "classifier", None)
    head = head if head is not None else getattr(model, "score", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no classifier/score head")
    return head


def _adapterhub(model, what):  # pragma: no cover - needs AdapterHub's `adapters` (not installed in CI)
    """AdapterHub rows. Not run yet: adapters 1.3.0, the newest in this project's registry (2026-11-29), pins
    transformers ~=4.57.6 and does not import beside transformers 5.24 and its huggingface_hub (no ``HfFolder``):
    where it is installed (_external_available) such a row reports that error."""
    import adapters
    from adapters.composition import Fuse

    adapters.init(model)
    if what == "fusion3":
        for n in ("a", "b", "c"):
            model.add_adapter(n, config="seq_bn")
        model.add_adapter_fusion(Fuse("a", "b", "c"))
        model.train_adapter_fusion(Fuse("a", "b", "c"))
    else:
        config = {"houlsby": "double_seq_bn", "pfeiffer": "seq_bn",
                  "prefix20": adapters.PrefixTuningConfig(prefix_length=20)}[what]
        model.add_adapter("task", config=config)
        model.train_adapter("task")
    for p in _head(model).parameters():
        p.requires_grad_(True)
    return model


def _peft(model, what):  # pragma: no cover - needs peft (not installed in CI)
    """PEFT rows. prefix20: PEFT's defaults, a flat prefix table (P, layers*2*hidden) and the classifier
    trained, as the prefix20 rows. Tried on the CPU (2026-11-29) with peft 0.21.2 and transformers 5.24: PEFT's
    prefix tuning refuses both models ("Model does not support past key values"), as it looks for a
    ``past_key_values`` argument that transformers 5.x's forward names ``cache``; the row then reports that
    error."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    assert what == "prefix20"
    return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=20))


# ---------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# AdamW's implementations: "fused" (one kernel per step; Hugging Face Trainer's default optimizer with
# torch >= 2.8, adamw_torch_fused) or "foreach" (torch.optim's default on CUDA: a dozen multi-tensor launches
# and Python loops over the parameters). The host time of the latter grows with the number of parameter
# tensors, which PET methods have many of (4 per adapter, one scores tensor per masked linear).
OPTIMIZERS = ("fused", "foreach")


def make_optimizer(params, optimizer: str = "fused"):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    return torch.optim.AdamW(params, lr=1e-5, **{optimizer: True})


def make_step(row: Row, spec, device, *, build=None, update: bool = True, optimizer: str = "fused",
              autocast_dtype: Optional[torch.dtype] = None):
    """(step, trainable parameters, batch shape (B, T)): one training step of the row (forward under autocast on a GPU,
    backward, AdamW), on a fresh model and batch; shared by the step benchmark, profile_step.py and
    profile_host_step.py. ``build(spec, device)``: the model (default :func:`build_model`); ``update=False``:
    no optimizer step (gradients are still zeroed); ``optimizer``: AdamW's implementation (OPTIMIZERS);
    ``autocast_dtype``: the forward under autocast in that dtype on any device (default: bf16 on a GPU, none on
    the CPU)."""
    import pet_fast

    torch.manual_seed(0)
    model = (build or build_model)(spec, device)
    ids, mask, labels = make_batch(spec, model.config.vocab_size, device)
    model, kw, params = prepare(row, model, ids.shape[1])
    if row.kind == "side-cache":
        kw["example_ids"] = torch.arange(ids.shape[0])
    embed = model.get_input_embeddings()
    fwd = torch.compile(model, mode=row.compile_mode) if row.compiled else model
    cudagraphs = row.compile_mode == "reduce-overhead"
    opt = make_optimizer(params, optimizer) if row.kind != "base-forward" else None
    if autocast_dtype is None and device.type == "cuda":
        autocast_dtype = torch.bfloat16
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def backend():
        if row.backend == "triton-py":  # the triton backend, its launches from Python (no replay)
            from pet_fast.kernels import _replay

            stack = contextlib.ExitStack()
            stack.enter_context(pet_fast.use_backend("triton"))
            stack.enter_context(_replay.disabled())
            return stack
        return pet_fast.use_backend(row.backend) if row.backend else contextlib.nullcontext()

    def step():
        if cudagraphs:  # the previous step's graph outputs are dead: its memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with backend(), autocast:
            if row.kind == "base-forward":
                with torch.no_grad():
                    return fwd(input_ids=ids, attention_mask=mask)
            if row.kind == "floor":
                with torch.no_grad():
                    emb = embed(ids)
                out = fwd(inputs_embeds=emb.requires_grad_(), attention_mask=mask, labels=labels)
            else:
                out = fwd(input_ids=ids, attention_mask=mask, labels=labels, **kw)
        out.loss.backward()
        if update:
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step, params, ids.shape


class _CudaMemory:
    """The CUDA caching allocator's counters that the step benchmark reads (tests replace :data:`MEMORY`)."""

    @staticmethod
    def allocated(device) -> int:
        return torch.cuda.memory_allocated(device)

    @staticmethod
    def peak(device) -> int:
        return torch.cuda.max_memory_allocated(device)

    @staticmethod
    def reset_peak(device) -> None:
        torch.cuda.reset_peak_memory_stats(device)


MEMORY = _CudaMemory


def _timed(step, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def run_row(row: Row, spec, device, *, warmup: int, steps: int, optimizer: str = "fused", reference=None,
            rounds: int = 5, keep: bool = False) -> dict:
    """Time one row. ``reference`` (a step function, the model's floor): the row's timed steps alternate
    with the reference's in ``rounds`` rounds, and ``vs_floor_paired`` is the median over rounds of the
    row's median over the reference's (a host whose speed drifts moves both sides of each round alike).
    ``keep``: the result also holds the step itself under "_step" (the caller pops it)."""
    gpu = device.type == "cuda"
    base_mb = MEMORY.allocated(device) / 2**20 if gpu else 0.0  # a kept reference's memory
    step, params, (B, T) = make_step(row, spec, device, optimizer=optimizer)
    if gpu:
        MEMORY.reset_peak(device)
    skips_before = _cudagraph_skips()
    t_compile = time.perf_counter()
    first_peak_mb = None
    for i in range(warmup):
        if gpu and i == warmup - 1 and warmup > 1:
            # The peak of a step is that of the last warm-up step, in the steady state: the optimizer's state
            # allocated, compiled and recorded. The first steps' one-off memory stays out of it: Triton's
            # autotuner benchmarks each configuration with a 256 MiB buffer (triton.testing.do_bench flushes L2
            # with it) while the step's activations are alive, and the first adapter calls run through Python
            # autograd.Functions before the C++ nodes take over.
            _sync(device)
            first_peak_mb = MEMORY.peak(device) / 2**20 - base_mb
            MEMORY.reset_peak(device)
        step()
    _sync(device)
    warm_s = time.perf_counter() - t_compile
    skipped = _cudagraph_skips() - skips_before
    # peak of the last warm-up step (a whole step, the optimizer's state included), before any reference
    # step runs in between
    peak_mb = MEMORY.peak(device) / 2**20 - base_mb if gpu else None
    times, ratios = [], []
    if reference is None:
        times = [_timed(step, device) for _ in range(steps)]
    else:
        per = max(1, -(-steps // rounds))
        for _ in range(rounds):
            mine = [_timed(step, device) for _ in range(per)]
            ref = [_timed(reference, device) for _ in range(per)]
            times += mine
            ratios.append(statistics.median(mine) / statistics.median(ref))
    ms = statistics.median(times) * 1e3
    result = {"ms": round(ms, 3), "tokens_per_s": round(B * T / (ms / 1e3), 1), "warmup_s": round(warm_s, 2),
              "steps": len(times), "trainable_params": sum(p.numel() for p in params)}
    result["peak_mem_mb"] = round(peak_mb, 1) if gpu else None
    if first_peak_mb is not None:  # the first warm-up steps' peak (autotuning, compilation, first calls)
        result["peak_mem_warmup_mb"] = round(max(first_peak_mb, peak_mb), 1)
    if ratios:
        result["vs_floor_paired"] = round(statistics.median(ratios), 3)
        result["vs_floor_rounds"] = [round(r, 3) for r in ratios]
    if row.compile_mode == "reduce-overhead" and skipped:  # inductor ran those graphs without CUDA graphs
        result["note"] = f"CUDA graphs skipped for {skipped} graph(s) (inductor's cudagraph_skips)"
    if keep:
        result["_step"] = step
    del step, params  # the step holds the model and optimizer
    return result


def _cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs under mode="reduce-overhead"."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - older torch
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def _cleanup(compiled: bool):
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_ratios(rows: List[dict]) -> None:
    """ms and memory relative to the floor (eager rows to the eager floor, compiled rows to the floor
    compiled the same way when it was measured) and to full fine-tuning, within each model."""
    def find(model, name):
        for r in rows:
            if r["model"] == model and r["row"] == name and r.get("ms"):
                return r
        return None

    for r in rows:
        if not r.get("ms"):
            continue
        suffix = next((x for x in COMPILE_SUFFIX.values() if r["row"].endswith(x)), None) if r["compiled"] else None
        floor = (find(r["model"], "floor" + suffix) if suffix else None) or find(r["model"], "floor")
        full = (find(r["model"], "full" + suffix) if suffix else None) or find(r["model"], "full")
        if floor:
            # rows timed in rounds against the floor (run_row's reference) report that paired ratio
            r["vs_floor"] = r.get("vs_floor_paired") or round(r["ms"] / floor["ms"], 3)
            r["floor_row"] = floor["row"]
            if r.get("peak_mem_mb") and floor.get("peak_mem_mb"):
                r["mem_vs_floor"] = round(r["peak_mem_mb"] / floor["peak_mem_mb"], 3)
        if full and r.get("peak_mem_mb") and full.get("peak_mem_mb"):  # mask-tuning's memory target
            r["mem_vs_full"] = round(r["peak_mem_mb"] / full["peak_mem_mb"], 3)
        base = find(r["model"], "base-forward")
        if base and r["row"].split("/")[0] in ("side", "side-cache", "side-graphs"):  # side-tuning's target: the base's forward
            if r.get("vs_floor_paired") and base.get("vs_floor_paired"):  # both timed in rounds against the floor
                r["vs_base_forward"] = round(r["vs_floor_paired"] / base["vs_floor_paired"], 3)
            else:
                r["vs_base_forward"] = round(r["ms"] / base["ms"], 3)
        if full:
            # rounds against the floor are the eager floor's: the paired form only between eager rows
            mine = 1.0 if r is floor else r.get("vs_floor_paired")
            if mine and full.get("vs_floor_paired") and not r["compiled"] and not full["compiled"]:
                r["vs_full"] = round(mine / full["vs_floor_paired"], 3)
            else:
                r["vs_full"] = round(r["ms"] / full["ms"], 3)


COLUMNS = ["model", "row", "ms", "tokens_per_s", "peak_mem_mb", "vs_floor", "mem_vs_floor", "vs_full", "mem_vs_full",
           "vs_base_forward", "note"]


def _fmt(v):
    if v is None:
        return "n/a"
    return f"{v:g}" if isinstance(v, float) else str(v)


def print_table(rows: List[dict], columns=COLUMNS, file=None) -> None:
    cells = [[_fmt(r.get(c)) if c in r or c == "peak_mem_mb" else "" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)), file=file)


def step_benchmark(*, quick: bool, models=None, rows=None, compile_rows=None, warmup=None, steps=None,
                   budget_s=None, threads=None, log=print, on_row=None, optimizer: str = "fused",
                   paired: Optional[int] = None) -> dict:
    """Run the step benchmark; return ``{"label", "settings", "rows"}``. ``paired``: the number of rounds in
    which each eager row's timed steps alternate with its model's eager floor, kept alive after its own row
    (default 5 on a GPU, whose host speed was seen to drift by a third between runs a minute apart; 0 on
    the CPU, and 0 turns it off): the ratio to the floor is then taken round by round."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    table = dict(QUICK_MODELS if quick else MODELS)
    if quick and gpu:
        table = {"bert-32x128": MODELS["bert-32x128"]}  # a short GPU run: the headline shape only
    names = list(table)
    if models:
        unknown = [m for m in models if m not in {**MODELS, **QUICK_MODELS}]
        if unknown:
            raise ValueError(f"--models: unknown {unknown}; known: {sorted({**MODELS, **QUICK_MODELS})}")
        names = list(models)
        table = {m: {**MODELS, **QUICK_MODELS}[m] for m in names}
    if compile_rows is None:
        compile_rows = gpu  # on the CPU the benchmark reports the eager path
    todo = plan(names, compile_rows=compile_rows, auto_rows=gpu or bool(rows), kernel_rows=gpu, cudagraph_rows=gpu)
    if rows:
        todo = [r for r in todo if any(_matches(r, pat) for pat in rows)]
    paired = (5 if gpu else 0) if paired is None else paired
    if paired < 0:
        raise ValueError(f"paired must be >= 0 rounds, got {paired}")
    warmup = warmup if warmup is not None else (2 if quick else 3)
    steps = steps if steps is not None else (5 if quick else 10)
    old_threads = torch.get_num_threads()
    if threads is None and quick and not gpu:
        threads = 1  # tiny models: one thread is faster and free of oversubscription on a shared CPU
    if threads:
        torch.set_num_threads(threads)
    label = f"GPU bf16 autocast ({torch.cuda.get_device_name(0)})" if gpu else ("CPU eager (fp32)" if not compile_rows
                                                                              else "CPU (fp32), eager and torch.compile rows")
    log(f"step benchmark: {label}; {len(todo)} rows; {warmup} warm-up + {steps} timed steps each")
    out, t_start = [], time.perf_counter()
    floors = {}  # model -> its eager floor's step, the reference of the eager rows after it (paired > 0)
    for i, row in enumerate(todo):
        rec = {"model": row.model, "row": row.row, "kind": row.kind, "backend": row.backend, "compiled": row.compiled,
               "compile_mode": row.compile_mode}
        family, B, T, left_pad, size = table[row.model]
        rec.update(family=family, batch=B, seq=T, left_padding=left_pad, size=size)
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            rec["note"] = f"skipped: time budget of {budget_s:g} s spent"
        else:
            is_floor = row.kind == "floor" and not row.compiled
            for m in [m for m in floors if m != row.model]:  # a model's rows are done: free its floor
                del floors[m]
            reference = floors.get(row.model) if paired and not row.compiled else None
            try:
                rec.update(run_row(row, table[row.model], device, warmup=warmup, steps=steps, optimizer=optimizer,
                                   reference=reference, rounds=max(paired, 1), keep=bool(paired) and is_floor))
                if "_step" in rec:
                    floors[row.model] = rec.pop("_step")
                if row.kind.startswith(("adapters-", "peft-")):
                    rec["note"] = "external library"
            except Exception as exc:  # report the row and go on: one failure must not lose the run
                rec["note"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            finally:
                _cleanup(row.compiled)
        out.append(rec)
        if on_row is not None:  # e.g. keep a partial JSON, so that a run killed at a time limit keeps its rows
            on_row(out)
        log(f"[{i + 1}/{len(todo)}] {row.model} {row.row}: "
            + (f"{rec['ms']:.2f} ms/step" if rec.get("ms") else rec.get("note", ""))
            + (f", {rec['vs_floor_paired']:.3f}x the floor in rounds {rec['vs_floor_rounds']}" if rec.get("vs_floor_paired") else ""))
    floors.clear()
    torch.set_num_threads(old_threads)
    add_ratios(out)
    return {"label": label, "settings": {"quick": quick, "warmup": warmup, "steps": steps, "compile": compile_rows,
                                         "paired_rounds": paired,
                                         "device": str(device), "cpu_threads": None if gpu else (threads or old_threads), "autocast": "bf16" if gpu else None,
                                         "optimizer": f"AdamW(lr=1e-5, {optimizer}=True)", "dropout": 0.0,
                                         "floor": "base frozen, head trains, inputs_embeds require grad",
                                         "auto_rows": gpu or "omitted on the CPU: auto takes eager for CPU tensors"},
            "rows": out}


def _partial_step(rows: List[dict]) -> dict:
    """The step section of a run cut short (written after each row): the rows so far with their ratios."""
    import copy

    done = copy.deepcopy(rows)
    add_ratios(done)
    return {"partial": True, "rows": done}


def _matches(row: Row, pattern: str) -> bool:
    import fnmatch

    # a row name, its compiled variants ("houlsby/auto" takes "houlsby/auto+compile", not "houlsby/auto-x"), a
    # glob, or a method ("houlsby": every row of it)
    name = row.row
    compiled_variant = name.startswith(pattern) and name[len(pattern):].startswith("+")
    return name == pattern or compiled_variant or fnmatch.fnmatch(name, pattern) or row.kind == pattern


# ---------------------------------------------------------------- op benchmarks, environment, chart

def _repo_root() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "benchmarks", "common.py")) else None


def package_versions() -> dict:
    """Versions of pet_fast and of the packages its numbers depend on (None: not installed), the GPU driver's,
    and the PET_FAST_* switches set in the environment."""
    from importlib import metadata

    out = {}
    for name, dist in (("pet_fast", "pet-fast"), ("triton", "triton"), ("transformers", "transformers"),
                       ("peft", "peft"), ("adapters", "adapters")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    # the switches that change what a row runs (PET_FAST_TRITON_REPLAY=0: gpu_check.sh sets it when a replay test
    # fails, and the */triton rows then launch from Python); unset ones are left out
    out["switches"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("PET_FAST_")}
    out["driver"] = None
    if torch.cuda.is_available():
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip() or None
        except Exception:
            pass
    return out


def environment() -> dict:
    root = _repo_root()
    if root is not None:
        if root not in sys.path:
            sys.path.insert(0, root)
        from benchmarks.common import environment as env

        return env()
    import platform

    env = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "git": None,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} threads)"}
    env.update(package_versions())
    return env


def op_benchmarks(out_dir: str, *, quick: bool, log=print, timeout_s: int = 1200) -> dict:
    """Run every ``benchmarks/bench_<op>.py`` (not the step one) as a subprocess; collect their JSON."""
    root = _repo_root()
    if root is None:
        log("op benchmarks: skipped (benchmarks/ is not next to this pet_fast: run from a source checkout)")
        return {}
    scripts = sorted(f for f in os.listdir(os.path.join(root, "benchmarks"))
                     if f.startswith("bench_") and f.endswith(".py") and f != "bench_step.py")
    results = {}
    for i, script in enumerate(scripts):
        name = script[:-3]
        path = os.path.join(out_dir, f"{name}.json")
        cmd = [sys.executable, os.path.join(root, "benchmarks", script), "--json", path] + (["--quick"] if quick else [])
        log(f"[op {i + 1}/{len(scripts)}] {name} ...")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root)
            ok = proc.returncode == 0 and os.path.exists(path)
        except subprocess.TimeoutExpired:
            proc, ok = None, False
        if ok:
            with open(path) as f:
                results[name] = json.load(f)
            log(proc.stdout.rstrip())
            log(f"    {name}: {len(results[name].get('rows', []))} rows in {time.perf_counter() - t0:.1f} s")
        else:
            tail = "timed out" if proc is None else (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            results[name] = {"error": str(tail)}
            log(f"    {name}: failed ({tail})")
    return results


def chart(doc: dict, path: str, log=print) -> Optional[str]:
    """A bar chart of ms/step relative to the floor, one panel per model (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("chart: skipped (matplotlib is not installed; `pip install matplotlib` to get the PNG)")
        return None
    rows = [r for r in doc.get("step", {}).get("rows", []) if r.get("vs_floor")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        log("chart: skipped (no timed step rows)")
        return None
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 4 * len(models)), squeeze=False)
    for ax, m in zip(axes[:, 0], models):
        sel = [r for r in rows if r["model"] == m]
        ax.bar(range(len(sel)), [r["vs_floor"] for r in sel],
               color=["tab:orange" if r["compiled"] else "tab:blue" for r in sel])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels([r["row"] for r in sel], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("step time / floor (compiled rows: / compiled floor)", fontsize=8)
        ax.set_title(f"{m} ({doc['step'].get('label', '')}; blue eager, orange torch.compile)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"chart: {path}")
    return path


# ---------------------------------------------------------------- compare

def _op_key(row: dict):
    return tuple((k, v) for k, v in sorted(row.items()) if isinstance(v, (str, int, bool)) and not isinstance(v, float)
                 and not k.startswith(("vs_", "x_", "speedup")))


def compare(path_a: str, path_b: str, file=None) -> List[dict]:
    """Row-by-row ratios B/A of the step times (and of the op timings) of two ``pet-fast bench`` JSON files."""
    docs = []
    for p in (path_a, path_b):
        with open(p) as f:
            docs.append(json.load(f))
    a, b = docs
    for tag, d in (("A", a), ("B", b)):
        env = d.get("env", {})
        print(f"{tag}: {env.get('device')} torch {env.get('torch')} git {env.get('git')} "
              f"({d.get('step', {}).get('label', 'no step rows')})", file=file)
    out = []
    index = {(r["model"], r["row"]): r for r in a.get("step", {}).get("rows", [])}
    for r in b.get("step", {}).get("rows", []):
        ra = index.get((r["model"], r["row"]))
        if ra is None:
            continue
        rec = {"model": r["model"], "row": r["row"], "ms_A": ra.get("ms"), "ms_B": r.get("ms")}
        if ra.get("ms") and r.get("ms"):
            rec["B/A"] = round(r["ms"] / ra["ms"], 3)
        if ra.get("peak_mem_mb") and r.get("peak_mem_mb"):
            rec["mem B/A"] = round(r["peak_mem_mb"] / ra["peak_mem_mb"], 3)
        out.append(rec)
    if out:
        print_table(out, ["model", "row", "ms_A", "ms_B", "B/A", "mem B/A"], file=file)
    ops_out = []
    for name, doc_b in b.get("ops", {}).items():
        doc_a = a.get("ops", {}).get(name, {})
        index = {_op_key(r): r for r in doc_a.get("rows", [])}
        for r in doc_b.get("rows", []):
            ra = index.get(_op_key(r))
            if ra is None:
                continue
            for k, v in r.items():
                if (k == "us" or k.endswith("_us")) and isinstance(v, (int, float)) and isinstance(ra.get(k), (int, float)) and ra[k]:
                    label = " ".join(str(v2) for k2, v2 in _op_key(r))
                    ops_out.append({"bench": name, "case": label[:70], "field": k, "A": ra[k], "B": v,
                                    "B/A": round(v / ra[k], 3)})
    if ops_out:
        print(file=file)
        print_table(ops_out, ["bench", "case", "field", "A", "B", "B/A"], file=file)
    if not out and not ops_out:
        print("no rows in common", file=file)
    return out + ops_out


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import nonnegative_int, positive_float, positive_int

    only = p.add_mutually_exclusive_group()  # (neither: both)
    only.add_argument("--step", action="store_true", help="only the step benchmark")
    only.add_argument("--ops", action="store_true", help="only the op benchmarks (benchmarks/ of a source checkout: "
                      "a wheel does not ship them)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print ratios B/A row by row, then exit")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps (CPU smoke run, under a minute)")
    p.add_argument("--json", help="write the results here (default: bench-results/bench.json)")
    p.add_argument("--chart", help="PNG chart path (default: next to the JSON); needs matplotlib")
    p.add_argument("--models", nargs="+", help=f"step models (default {list(MODELS)}; --quick {list(QUICK_MODELS)})")
    p.add_argument("--rows", nargs="+", help="step rows to run: names, glob patterns or prefixes (e.g. floor 'houlsby/*')")
    p.add_argument("--compile", dest="compile_rows", action="store_true", default=None,
                   help="torch.compile rows also on the CPU (default: on a GPU only)")
    p.add_argument("--no-compile", dest="compile_rows", action="store_false", help="no torch.compile rows")
    p.add_argument("--warmup", type=nonnegative_int)
    p.add_argument("--steps", type=positive_int, help="timed steps per row")
    p.add_argument("--threads", type=positive_int, help="CPU threads for the step benchmark (default: torch's; 1 with --quick on the CPU)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="fused",
                   help="AdamW's implementation in the step benchmark: fused (default; Hugging Face Trainer's "
                        "default with torch >= 2.8) or foreach (torch.optim's default on CUDA)")
    p.add_argument("--paired", type=nonnegative_int, metavar="ROUNDS",
                   help="time each eager row in this many rounds alternating with its model's floor, and report "
                        "the ratio round by round (default 5 on a GPU, 0 = off on the CPU)")
    p.add_argument("--budget-s", type=positive_float, help="stop starting step rows after this many seconds (the rest are "
                                                  "reported as skipped)")


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def main(args) -> int:
    if args.compare:
        compare(*args.compare)
        return 0
    path = args.json or os.path.join("bench-results", "bench.json")
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    doc = {"env": environment()}
    run_ops = not args.step
    run_step = not args.ops
    if run_ops:
        doc["ops"] = op_benchmarks(out_dir, quick=args.quick or not torch.cuda.is_available())
    if run_step:
        doc["step"] = step_benchmark(quick=args.quick, models=args.models, rows=args.rows,
                                     compile_rows=args.compile_rows, warmup=args.warmup, steps=args.steps,
                                     budget_s=args.budget_s, threads=args.threads, optimizer=args.optimizer,
                                     paired=args.paired,
                                     log=lambda s: print(s, flush=True),
                                     on_row=lambda rows: _write_json(path, {**doc, "step": _partial_step(rows)}))
        print()
        print(doc["step"]["label"])
        print_table(doc["step"]["rows"])
    _write_json(path, doc)
    print(f"\nJSON: {path}")
    if run_step:
        chart(doc, args.chart or os.path.splitext(path)[0] + ".png")
    return 0
