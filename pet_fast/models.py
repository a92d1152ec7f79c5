"""Architecture families and their attach points.

``family(model)`` recognises BERT/RoBERTa, GPT-2 and the Llama family (Llama, Mistral, Qwen2) from
the model's config; everything else is ``"generic"`` (methods then need ``target_modules``).
"""
from __future__ import annotations

from typing import List

from torch import nn

FAMILIES = {
    "bert": ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    "gpt2": ("gpt2",),
    "llama": ("llama", "mistral", "qwen2", "qwen3"),
}


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def family(model: nn.Module) -> str:
    mt = model_type(model)
    for fam, types in FAMILIES.items():
        if mt in types:
            return fam
    return "generic"


# Names of task heads in transformers models (kept trainable when a config says train_head=True).
HEAD_NAMES = ("classifier", "score", "qa_outputs", "cls", "lm_head", "pooler")


def head_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of the task head: top-level children named like a head, except a language-model
    head whose weight is tied to the input embeddings (training it would change the base)."""
    params = []
    for child_name, child in model.named_children():
        if child_name not in HEAD_NAMES:
            continue
        if child_name in ("lm_head", "cls", "pooler"):
            continue  # LM heads are tied or pretrained; the pooler is pretrained. Methods opt in explicitly.
        params.extend(child.parameters())
    return params
