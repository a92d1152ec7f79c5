"""Where the host time of a prefix-tuning training step goes: aten ops per step and host time for the
frozen floor, pet_fast's prefix tuning, and a PEFT-style prefix written here (peft itself is not needed).

    python benchmarks/profile_prefix_step.py                 # CPU: BERT, 12 layers of width 64, batch 4 x 16
    python benchmarks/profile_prefix_step.py --layers 2 --json out.json
    python benchmarks/profile_prefix_step.py --family llama  # Llama, GQA 8/2 heads, left padding, RoPE
    python benchmarks/profile_prefix_step.py --family llama --device cuda --autocast --layers 16 --hidden 2048 \
        --heads 32 --kv-heads 4 --intermediate 8192 --batch 4 --tokens 1024 --steps 10   # the bench's ~1B shape

The model is small on purpose: its arithmetic is cheap, so the step time is the host's (Python and the
dispatcher), which is what decides a BERT-base step at batch 32 x 128 on a GPU. Rows:

* ``floor``: the frozen backbone, gradients through every layer into the input embeddings, the
  classifier trained (the bench's floor row).
* ``pet_fast``: ``PrefixConfig(prefix_length=P)`` (flat prefix, the bench's prefix row) with the given
  backend (``--backend``, default eager), its classifier copy trained.
* ``peft-style``: what PEFT's prefix tuning does, flat prefix (PEFT's default, ``prefix_projection=False``;
  ``--projection N`` gives both rows the MLP re-parametrisation, PEFT's ``prefix_projection=True``):
  once per step the (P, layers*2*H*D) table is viewed as one (B, H, P, D) key and value per layer
  (expanded over the batch); each layer concatenates them before its keys/values and calls SDPA with
  transformers' sdpa mask (None when nothing is padded) widened by P visible columns. The classifier
  is trained too (PEFT's modules_to_save for sequence classification). Positions are not shifted.

``--family llama``: a tiny ``LlamaForSequenceClassification`` shaped like the bench's Llama rows
(grouped-query attention: ``--heads`` query heads over ``--kv-heads`` key/value heads, rotary
positions, causal, the last token pooled into the ``score`` head), with half of the rows padded on the
LEFT by a quarter of the length (padding on by default; ``--no-padding`` turns it off). Its rows:

* ``floor``: as above (the ``score`` head trained, gradients into the input embeddings).
* ``pet_fast``: ``PrefixConfig(prefix_length=P)``: flat prefix of ``kv_heads`` heads per layer,
  positions shifted by P (``shift_positions=True``, PEFT's positions), the ``score`` copy trained.
* ``peft-style``: what PEFT's prefix tuning does for a decoder (``PeftModelForSequenceClassification``
  with a flat prefix): once per step the (P, layers*2*kv_heads*D) table, expanded over the batch, is
  viewed as (layers*2, B, kv_heads, P, D) and put into a ``DynamicCache`` as P past tokens of every
  layer; the 2-D attention mask is widened by P ones on the left (``torch.ones(B, P)`` cast with the
  mask, as PEFT does); the model derives positions from the cache length (P + arange(T), the same
  positions as pet_fast's shift) and builds transformers' sdpa mask (a dense 4-D bool mask when rows
  are padded) once per forward; each layer's cache update concatenates the prefix before its keys and
  values, and transformers' ``sdpa`` attention repeats the key/value heads (it uses SDPA's
  ``enable_gqa`` only when no mask is passed). The model runs ``attn_implementation="sdpa"``.

  Same configuration as the ``pet_fast`` row: a flat prefix of the same P with ``kv_heads`` heads per
  layer (the number of trained prefix values is equal), the same ``score`` head trained, the same
  positions for the real tokens, the prefix itself without RoPE in both. (PEFT keeps the prefix in a
  cache object the model also returns; pet_fast adds it inside the attention function.)

Columns: aten ops per step (forward, backward and AdamW, counted by a TorchDispatchMode), host ms per
step (median CPU time of this thread), wall ms per step (median, synchronised on CUDA; on CUDA the
backward runs on another thread, so the wall column is the step's time there), their ratios to the
floor, and the ops that differ most from the floor. ``--device cuda`` runs the rows on a GPU: its op
counts name the SDPA kernel each row takes (``_scaled_dot_product_efficient_attention``,
``_scaled_dot_product_cudnn_attention``, ``_scaled_dot_product_flash_attention``, or the math path's
``bmm``/``_softmax``), which is what decides the prefix rows at the bench's Llama shape.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402


def build(layers, hidden, heads, seed=0, family="bert", kv_heads=None, intermediate=None, device="cpu"):
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or 2 * hidden,
                             vocab_size=1000,
                             num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             max_position_embeddings=4096, attention_dropout=0.0)
        cfg._attn_implementation = "sdpa"
        with torch.device(device):
            return tf.LlamaForSequenceClassification(cfg).train()
    cfg = tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, vocab_size=1000, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        return tf.BertForSequenceClassification(cfg).train()


# ---------------------------------------------------------------- the PEFT-style prefix

PEFT_NAME = "profile_peft_style"
_PEFT_PREFIX: list = []  # per layer (pk, pv), each (B, H, P, D), set once per step


def _peft_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    pk, pv = _PEFT_PREFIX[module.layer_idx]
    key = torch.cat([pk.to(key.dtype), key], dim=2)
    value = torch.cat([pv.to(value.dtype), value], dim=2)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            pre = attention_mask.new_ones(*attention_mask.shape[:-1], pk.shape[2])
        else:
            pre = attention_mask.new_zeros(*attention_mask.shape[:-1], pk.shape[2])
        attention_mask = torch.cat([pre, attention_mask], dim=-1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_peft_style():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PEFT_NAME, _peft_attention)
    AttentionMaskInterface.register(PEFT_NAME, sdpa_mask)


class PeftStylePrefix(torch.nn.Module):
    def __init__(self, layers, heads, head_dim, P, projection=None, cache_config=None):
        super().__init__()
        self.layers, self.heads, self.head_dim, self.P = layers, heads, head_dim, P
        self.cache_config = cache_config  # a decoder's config: the prefix goes into a DynamicCache
        out = layers * 2 * heads * head_dim
        if projection is None:
            self.embedding = torch.nn.Embedding(P, out)
            self.mlp = None
        else:  # PEFT's prefix_projection=True: Embedding(P, hidden) -> Linear -> tanh -> Linear
            self.embedding = torch.nn.Embedding(P, heads * head_dim)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(heads * head_dim, projection), torch.nn.Tanh(),
                                           torch.nn.Linear(projection, out))
        self.register_buffer("tokens", torch.arange(P), persistent=False)

    def set_prefix(self, batch_size):
        # PEFT: embedding(tokens expanded over the batch) [-> MLP] -> view -> permute -> split per layer
        table = self.embedding(self.tokens.unsqueeze(0).expand(batch_size, -1))  # (B, P, L*2*H*D)
        if self.mlp is not None:
            table = self.mlp(table)
        kv = table.view(batch_size, self.P, self.layers * 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.cache_config is not None:  # PEFT's get_prompt for decoders: split(2), then a cache
            from transformers import DynamicCache

            return DynamicCache(ddp_cache_data=[tuple(t) for t in kv.split(2)], config=self.cache_config)
        _PEFT_PREFIX[:] = [(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)]
        return None


# ---------------------------------------------------------------- rows

def prepare(kind, args):
    import pet_fast

    model = build(args.layers, args.hidden, args.heads, family=args.family, kv_heads=args.kv_heads,
                  intermediate=args.intermediate, device=args.device)
    head = model.score if args.family == "llama" else model.classifier
    prefix = None
    if kind == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    elif kind == "pet_fast":
        pet_fast.inject(model, pet_fast.PrefixConfig(prefix_length=args.prefix, projection_dim=args.projection), "task")
    elif kind == "peft-style":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        if args.family == "llama":  # PEFT's decoder path: the prefix in a cache, the model's own sdpa
            prefix = PeftStylePrefix(args.layers, args.kv_heads, args.hidden // args.heads, args.prefix,
                                     args.projection, cache_config=model.config).to(args.device)
        else:
            _register_peft_style()
            model.config._attn_implementation = PEFT_NAME
            prefix = PeftStylePrefix(args.layers, args.heads, args.hidden // args.heads, args.prefix,
                                     args.projection).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad] + ([] if prefix is None else list(prefix.parameters()))
    return model, prefix, params


def make_step(kind, args):
    import pet_fast

    model, prefix, params = prepare(kind, args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (args.batch, args.tokens), generator=g)
    mask = torch.ones(args.batch, args.tokens, dtype=torch.long)
    if args.padding:
        mask[::2, : args.tokens // 4] = 0  # left padding (a decoder pools its last token: ids are 0 there)
        if args.family == "llama":
            ids[::2, : args.tokens // 4] = 0
    labels = torch.randint(0, 2, (args.batch,), generator=g)
    ids, mask, labels = ids.to(args.device), mask.to(args.device), labels.to(args.device)
    opt = torch.optim.AdamW(params, lr=1e-5)
    embed = model.get_input_embeddings()
    device_type = torch.device(args.device).type
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext())

    # transformers 5.x names the cache argument `cache` (`past_key_values` still taken, deprecated)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step():
        with pet_fast.use_backend(args.backend), autocast:
            if kind == "floor":
                with torch.no_grad():
                    emb = embed(ids)
                # (Llama pools the last position from inputs_embeds: with left padding, the same token)
                out = model(inputs_embeds=emb.requires_grad_(), attention_mask=mask, labels=labels)
            else:
                kw = {}
                if prefix is not None:
                    cache = prefix.set_prefix(ids.shape[0])
                    if cache is not None:  # PEFT: the cache, and the mask widened by P ones on the left
                        kw[cache_kw] = cache
                        wide = torch.ones(ids.shape[0], prefix.P).to(mask.device)
                        kw["attention_mask"] = torch.cat((wide, mask), dim=1)
                out = model(input_ids=ids, **{"attention_mask": mask, **kw}, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(kinds, args):
    """One dict per row: aten ops of one step, and the median host time of ``args.steps`` steps taken
    in rounds over the rows (one step of each row per round), so that load on a shared machine reaches
    every row alike."""
    args = defaults(args)
    steps = {kind: make_step(kind, args) for kind in kinds}
    rows = {}
    for kind, step in steps.items():
        for _ in range(3):
            step()
        counter = common.AtenOps()
        with counter:
            step()
        rows[kind] = {"row": kind, "aten_ops": sum(counter.ops.values()), "counts": dict(counter.ops)}
    # CPU time of this thread (on the CPU the autograd engine runs on the calling thread): unlike the wall
    # clock, it does not count the time other processes on a shared machine hold the core. On CUDA the
    # backward runs on the engine's device thread: there the wall time (synchronised) is the step's.
    cuda = torch.device(args.device).type == "cuda"
    times = {kind: [] for kind in kinds}
    walls = {kind: [] for kind in kinds}
    for _ in range(args.steps):
        for kind, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            t0, w0 = time.thread_time(), time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times[kind].append(time.thread_time() - t0)
            walls[kind].append(time.perf_counter() - w0)
    for kind in kinds:
        rows[kind]["host_ms"] = round(statistics.median(times[kind]) * 1e3, 3)
        rows[kind]["host_ms_min"] = round(min(times[kind]) * 1e3, 3)
        rows[kind]["wall_ms"] = round(statistics.median(walls[kind]) * 1e3, 3)
    return [rows[kind] for kind in kinds]


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["bert", "llama"], default="bert")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=None, help="query heads (default: 4 for BERT, 8 for Llama)")
    p.add_argument("--kv-heads", type=int, default=2, help="Llama's key/value heads (grouped-query attention)")
    p.add_argument("--intermediate", type=int, default=None, help="Llama's MLP width (default 2 x hidden)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: on CUDA the op counts name the SDPA kernel taken")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prefix", type=int, default=20)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--projection", type=int, default=None,
                   help="MLP re-parametrisation of this width in both prefix rows (default: flat, as the bench)")
    p.add_argument("--padding", action=argparse.BooleanOptionalAction, default=None,
                   help="pad half of the rows (default: off for BERT, as the bench's BERT rows; on, on the left, for Llama)")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast on the CPU (the casts of a GPU step)")
    p.add_argument("--backend", default="eager", help="pet_fast backend for the pet_fast row (eager or auto)")
    p.add_argument("--rows", nargs="+", default=["floor", "pet_fast", "peft-style"])
    p.add_argument("--top", type=int, default=12, help="how many differing ops to list per row")
    p.add_argument("--json")
    return p


def parse(argv=None):
    return defaults(parser().parse_args(argv))


def defaults(args):
    """The family's defaults for the options left unset (idempotent)."""
    if args.heads is None:
        args.heads = 8 if args.family == "llama" else 4
    if args.padding is None:
        args.padding = args.family == "llama"
    if args.family == "bert":
        args.kv_heads = args.heads
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(1)
    rows = measure(args.rows, args)
    floor = next((r for r in rows if r["row"] == "floor"), None)
    print(f"{args.family} {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, batch {args.batch} x {args.tokens}, "
          f"P={args.prefix}, projection={args.projection}, padding={args.padding}, autocast={args.autocast}, torch {torch.__version__}")
    print(f"{'row':12s} {'aten ops':>9s} {'host ms':>9s} {'min ms':>9s} {'x floor':>8s} {'wall ms':>9s} {'x floor':>8s}")
    for r in rows:
        ratio = r["host_ms"] / floor["host_ms"] if floor else float("nan")
        wall = r["wall_ms"] / floor["wall_ms"] if floor else float("nan")
        print(f"{r['row']:12s} {r['aten_ops']:9d} {r['host_ms']:9.3f} {r['host_ms_min']:9.3f} {ratio:8.2f} "
              f"{r['wall_ms']:9.3f} {wall:8.2f}")
    if floor:
        for r in rows:
            if r is floor:
                continue
            diff = collections.Counter(r["counts"])
            diff.subtract(floor["counts"])
            top = [(k, v) for k, v in diff.most_common() if v][: args.top]
            print(f"  {r['row']} - floor: " + ", ".join(f"{k} {v:+d}" for k, v in top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
