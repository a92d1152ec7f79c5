"""Architecture families and their attach points.

``family(model)`` recognises BERT/RoBERTa, GPT-2 and the Llama family (Llama, Mistral, Qwen2) from
the model's config; everything else is ``"generic"`` (methods then need ``target_modules``).
"""
from __future__ import annotations

import functools
import inspect
from typing import List

from torch import nn

FAMILIES = {
    "bert": ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    "gpt2": ("gpt2",),
    "llama": ("llama", "mistral", "qwen2", "qwen3"),
}


@functools.lru_cache(maxsize=256)
def signature(fn) -> inspect.Signature:
    """``inspect.signature(fn)`` computed once per function (it costs tens of microseconds, and the hooks
    that ask run in every forward). Pass plain functions (``type(module).forward``), not bound methods,
    which would keep their module alive in the cache."""
    return inspect.signature(fn)


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def family(model: nn.Module) -> str:
    mt = model_type(model)
    for fam, types in FAMILIES.items():
        if mt in types:
            return fam
    return "generic"


# The task heads of transformers models that every task gets its own trainable copy of (attach_task_head): the
# model's direct children that its task class adds on the backbone (BART's and T5's classification_head,
# DistilBERT's pre_classifier, DeBERTa's pooler, XLNet's sequence_summary). Not LM heads (tied to the
# embeddings or pretrained) nor a backbone's own pooler (BERT's: pretrained, inside model.bert).
TASK_HEADS = ("classifier", "score", "qa_outputs", "classification_head", "pre_classifier", "pooler", "sequence_summary")
# Heads given a per-task copy only since 2026-11-29: checkpoints saved before lack their copies (load keeps the
# copy made from the model's own head, which such a task ran with).
LATER_TASK_HEADS = ("classification_head", "pre_classifier", "pooler", "sequence_summary")


def task_heads(model: nn.Module) -> List[str]:
    """Names of ``model``'s children that are task heads (TASK_HEADS); a bare backbone (BertModel: its own
    pretrained pooler is a direct child) has none of its pooler."""
    bare = backbone(model) is model
    return [n for n, _ in model.named_children() if n in TASK_HEADS and not (bare and n == "pooler")]


# --------------------------------------------------------------------------------------------
# Attach points per family

def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its task head (``model.base_model`` for transformers models)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError("cannot tell the model's hidden size from model.config (hidden_size / n_embd / d_model)")


def layers(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks, in order, for the known families (ValueError otherwise)."""
    fam = family(model)
    base = backbone(model)
    if fam == "bert":
        encoder = getattr(base, "encoder", None)
        blocks = getattr(encoder, "layer", None)
    elif fam == "gpt2":
        blocks = getattr(base, "h", None)
    elif fam == "llama":
        blocks = getattr(base, "layers", None)
    else:
        blocks = None
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"cannot find the transformer blocks of this {model_type(model) or type(model).__name__} model; "
                         "pass target_modules")
    return list(blocks)


def block_parts(block: nn.Module, fam: str) -> dict:
    """Named parts of one block: for BERT the two post-LN output modules; for pre-LN families the
    attention, the MLP and the norms in front of them."""
    if fam == "bert":
        return {"mh": block.attention.output, "output": block.output}
    if fam == "gpt2":
        return {"attn": block.attn, "mlp": block.mlp, "norm_attn": block.ln_1, "norm_mlp": block.ln_2, "block": block}
    if fam == "llama":
        return {"attn": block.self_attn, "mlp": block.mlp, "norm_attn": block.input_layernorm,
                "norm_mlp": block.post_attention_layernorm, "block": block}
    raise ValueError(f"no attach points known for family {fam!r}")


def match_targets(model: nn.Module, target_modules, *, kinds: tuple = (nn.Module,)) -> List[tuple]:
    """(name, module) pairs whose name equals an entry of ``target_modules`` or ends with ``"." + entry``."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    # A task head is copied per task and trains whole (attach_task_head): its modules are no targets.
    heads = tuple(n + "." for n in task_heads(model))
    found, in_heads = [], []
    for name, mod in model.named_modules():
        if "pet_fast_tasks" in name.split("."):
            continue
        if any(name == t or name.endswith("." + t) for t in targets) and isinstance(mod, kinds):
            if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and type(mod).forward is nn.Module.forward:
                # (a container without a forward of its own is never called: nothing attached there would run)
                raise ValueError(f"target_modules entry matches {name!r}, a {type(mod).__name__} (a container, which "
                                 f"is never called): name the modules inside it")
            (in_heads if (name + ".").startswith(heads) and heads else found).append((name, mod))
    if not found:
        also = f" outside the task head ({', '.join(n for n, _ in in_heads)} is in it)" if in_heads else ""
        raise ValueError(f"target_modules {targets} match no module of the model{also}")
    return found


_BLOCK_LISTS = ("layer", "layers", "h", "block", "blocks")


def layer_index(name: str) -> int:
    """The block index in a module name such as ``bert.encoder.layer.3.output`` (-1 if none): the outermost
    numbered block list's (T5's ``encoder.block.3.layer.1.SelfAttention``: 3, not its sub-layer's 1)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit() and parts[i - 1] in _BLOCK_LISTS:
            return int(parts[i])
    return -1


def without_left_out(found: List[tuple], leave_out) -> List[tuple]:
    """(name, module) pairs of ``target_modules`` outside the blocks of ``leave_out``; with a ``leave_out``,
    ValueError for a target whose name holds no block index (it could not be left out)."""
    if not leave_out:
        return list(found)
    unknown = [n for n, _ in found if layer_index(n) < 0]
    if unknown:
        raise ValueError(f"leave_out needs each target's block index in its name ('<{'|'.join(_BLOCK_LISTS)}>.<i>'), "
                         f"and {unknown[0]} has none ({len(unknown)} targets); choose the targets without leave_out")
    check_leave_out(leave_out, sorted({layer_index(n) for n, _ in found}))
    return [(n, m) for n, m in found if layer_index(n) not in leave_out]


def check_leave_out(leave_out, blocks) -> None:
    """ValueError for a ``leave_out`` index that names none of ``blocks`` (a negative index, or one past the
    last block, would skip nothing)."""
    stray = sorted(set(leave_out) - set(blocks))
    if stray:
        raise ValueError(f"leave_out {stray} names no block of the model (its blocks: {min(blocks)}..{max(blocks)})"
                         if blocks else f"leave_out {stray}: the model has no blocks")


def linear_like(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), whose weight is stored (in, out)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def attach_task_head(model: nn.Module, name: str, registry) -> List[nn.Parameter]:
    """Give task ``name`` its own copy of the task head (the classifier), so that tasks on one base
    keep their heads apart and a saved task restores its head. The copies live at
    ``<head>.pet_fast_tasks.<name>`` and run while the task is active."""
    import copy

    from .tasks import TASK_ATTR, task_holder
    from .methods import _sites

    params = []
    heads = task_heads(model)
    for child_name, child in list(model.named_children()):
        if child_name not in heads:
            continue
        try:
            _sites.check_installable(child, "head")
        except ValueError as exc:
            raise ValueError(f"the task head {child_name!r}: {exc} (or inject with train_head=False)") from None
        holder = child._modules.get(TASK_ATTR)
        memo = {}
        if holder is not None:
            memo[id(holder)] = None
        override = child.__dict__.get("forward")
        if override is not None:
            memo[id(override)] = None
        twin = copy.deepcopy(child, memo)
        twin._modules.pop(TASK_ATTR, None)
        twin.__dict__.pop("forward", None)
        _sites.install(child, "head", registry)
        task_holder(child)[name] = twin
        params.extend(twin.parameters())
    return params
