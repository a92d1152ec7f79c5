"""Saving and loading tasks; importers for checkpoints written by other libraries.

A pet_fast checkpoint is a folder with two files:

* ``pet_fast_config.json``: the format tag, the task's method config, and facts about the model it
  was trained on (model type, hidden size, number of blocks) and about every tensor;
* ``pet_fast_task.safetensors``: the task's tensors only (the parameters and buffers under
  ``pet_fast_tasks.<name>.``, with ``<name>`` written as ``{task}``). Mask-tuning tasks store their
  masks packed at 1 bit per weight (key ``...mask_bits``, uint8: bit j of byte i is element 8*i+j of
  the row-major flattened mask, least significant bit first) and their scores only when asked.

``save`` writes into a temporary folder beside the target, fsyncs, then renames it into place, so
a crash never leaves a half-written checkpoint under the target name (a checkpoint it replaces is renamed
aside first and put back if the save fails; after a crash between the two renames ``load`` names it). ``load`` validates the
checkpoint against the model and, if anything does not match, restores the model as it was before
raising. Folders that are not pet_fast checkpoints go to the importers (``register_importer``):
AdapterHub bottleneck adapters and AdapterFusion are built in.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import models
from .tasks import (TASK_ATTR, MethodConfig, check_not_a_wrapper, check_not_on_meta, check_task_name, inject,
                    no_tasks_hint, registry, remove, task_hosts)

CONFIG_FILE = "pet_fast_config.json"
WEIGHTS_FILE = "pet_fast_task.safetensors"
FORMAT = "pet_fast"
FORMAT_VERSION = 1
_PLACEHOLDER = "{task}"
_OLD_MARK = ".old-"  # the previous checkpoint's name while a save replaces it


# --------------------------------------------------------------------------------------------
# mask packing

def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 of ceil(numel/8) bytes; bit j of byte i = element 8*i+j (row-major)."""
    flat = mask.detach().reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``pack_mask``: a bool tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask must be uint8 of {(n + 7) // 8} bytes for shape {tuple(shape)}, "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    bits = (packed.view(-1, 1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.view(-1)[:n].view(*shape).to(torch.bool)


# --------------------------------------------------------------------------------------------
# save

def _task_name(model: nn.Module, name: Optional[str]) -> str:
    reg = registry(model)
    if reg is None or not reg.configs:
        raise ValueError(f"model has no pet_fast tasks to save; {no_tasks_hint(model)}")
    if name is None:
        if len(reg.active) != 1:
            raise ValueError(f"name is needed: {len(reg.active)} tasks are active ({list(reg.active)})")
        return reg.active[0]
    if name not in reg.configs:
        raise ValueError(f"unknown task {name!r}; the model has {sorted(reg.configs)}")
    return name


def task_state(model: nn.Module, name: str) -> Dict[str, torch.Tensor]:
    """The task's parameters and buffers by state-dict key."""
    key = f"{TASK_ATTR}.{name}."
    return {k: v for k, v in model.state_dict().items() if key in k}


def _model_facts(model: nn.Module) -> dict:
    facts = {"model_type": models.model_type(model)}
    try:
        facts["hidden_size"] = models.hidden_size(model)
    except ValueError:
        pass
    try:
        facts["num_layers"] = len(models.layers(model))
    except ValueError:
        pass
    return facts


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(model: nn.Module, path, name: Optional[str] = None, *, include_scores: bool = False) -> Path:
    """Write task ``name`` (default: the active task) of ``model`` to the folder ``path``.

    Only the task's tensors and its config are written. Mask tasks store 1-bit masks; their scores
    too with ``include_scores=True`` (to resume training). An existing checkpoint at ``path`` is
    replaced; any other content (a file, other files beside a checkpoint) is refused with ValueError
    before anything is written (:func:`check_save_path`). Returns the folder's path.
    """
    from safetensors.torch import save_file

    from .methods.mask import MaskConfig
    from .ops.mask_packing import unpack_mask as unpack_words  # (pack_for_serving's int32 words)

    name = _task_name(model, name)
    cfg = registry(model).configs[name]
    held, attached = task_hosts(model, name), getattr(registry(model), "hosts", {}).get(name)
    if attached is not None and held != attached:
        raise ValueError(f"save: task {name!r} was attached to {attached} modules and {held} hold it now: modules that "
                         f"held it were replaced (by quantize_dynamic, say), and its checkpoint would miss their part")
    state = task_state(model, name)
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:  # offloaded (accelerate keeps the values elsewhere) or never materialised: no values to write
        raise ValueError(f"save: {on_meta[0]} is on the meta device ({len(on_meta)} of task {name!r}'s tensors are): "
                         f"save the task before offloading the model (accelerate's cpu_offload / dispatch_model)")
    path = check_save_path(path)
    key = f"{TASK_ATTR}.{name}."
    tensors, mask_shapes = {}, {}
    for k, v in state.items():
        k2 = k.replace(key, f"{TASK_ATTR}.{_PLACEHOLDER}.")
        if isinstance(cfg, MaskConfig) and k.endswith(".scores"):
            base = k2[: -len(".scores")]
            mask_shapes[base + ".mask_bits"] = list(v.shape)
            tensors[base + ".mask_bits"] = pack_mask(v > cfg.threshold)
            if not include_scores:
                continue
        if isinstance(cfg, MaskConfig) and k.endswith(".packed"):  # packed for serving (pack_for_serving)
            base = k2[: -len(".packed")]
            shape = list(model.get_submodule(k[: -len(".packed")]).shape)
            mask_shapes[base + ".mask_bits"] = shape
            tensors[base + ".mask_bits"] = pack_mask(unpack_words(v, shape))
            continue
        tensors[k2] = v.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": cfg.to_dict(),
        "model": _model_facts(model),
        "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for k, t in tensors.items()},
        "mask_shapes": mask_shapes,
        "includes_scores": bool(include_scores and isinstance(cfg, MaskConfig) and any(k.endswith(".scores") for k in tensors)),
    }
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    old = None
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        _fsync_file(tmp / WEIGHTS_FILE)
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}{_OLD_MARK}", dir=parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        if old is not None and not path.exists():  # the previous checkpoint goes back under its name
            os.replace(old, path)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and path.exists():  # (kept where it could not go back: the user's only copy)
            shutil.rmtree(old, ignore_errors=True)
    return path


def check_save_path(path) -> Path:
    """``path`` as a Path where :func:`save` may write: absent, an empty folder, or a folder holding a pet_fast
    checkpoint and nothing else (which the save replaces); ValueError otherwise (before anything is written)."""
    path = Path(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise ValueError(f"path {str(path)!r} exists and is not a folder; refusing to overwrite it")
    entries = sorted(e.name for e in path.iterdir())
    others = [e for e in entries if e not in (CONFIG_FILE, WEIGHTS_FILE)]
    if entries and CONFIG_FILE not in entries:
        raise ValueError(f"path {str(path)!r} exists and is not a pet_fast checkpoint folder; refusing to overwrite it")
    if others:
        raise ValueError(f"{str(path)!r} holds a pet_fast checkpoint and other files ({', '.join(others[:5])}"
                         f"{', ...' if len(others) > 5 else ''}), which saving there would delete; save to another "
                         f"folder or move them")
    return path


# --------------------------------------------------------------------------------------------
# load

Importer = Tuple[Callable[[Path], bool], Callable[[nn.Module, Path, Optional[str]], str]]
IMPORTERS: List[Importer] = []


def register_importer(detect: Callable[[Path], bool], load_fn: Callable[[nn.Module, Path, Optional[str]], str]) -> None:
    """Teach ``load`` a foreign checkpoint format: ``detect(path) -> bool`` says whether a folder
    is in that format; ``load_fn(model, path, name) -> task name`` attaches it (and must leave the
    model unchanged when it raises). Importers are tried in registration order."""
    if not callable(detect) or not callable(load_fn):
        raise TypeError("detect and load_fn must be callables")
    IMPORTERS.append((detect, load_fn))


class _Snapshot:
    """What loading may change, to put back when a check fails after attaching."""

    def __init__(self, model: nn.Module):
        self.reg = registry(model)
        self.had_reg = self.reg is not None
        self.active = self.reg.active if self.reg else ()
        self.frozen = self.reg.base_frozen if self.reg else False
        self.grad = {id(p): p.requires_grad for p in model.parameters()}

    def restore(self, model: nn.Module, name: str) -> None:
        reg = registry(model)
        if reg is not None and name in reg.configs:
            remove(model, name)
        if not self.had_reg:
            model.__dict__.pop("_pet_fast_registry", None)
        else:
            reg.active = self.active
            reg.base_frozen = self.frozen
        for p in model.parameters():
            if id(p) in self.grad:
                p.requires_grad_(self.grad[id(p)])


def attach_and_fill(model: nn.Module, config: MethodConfig, name: str, fill: Callable[[Dict[str, torch.Tensor]], None]) -> str:
    """``inject(model, config, name)``, then ``fill(task_state)`` copies values in (raising
    ValueError on any mismatch). On failure the model is restored and the error re-raised.
    Shared by ``load`` and the importers."""
    check_task_name(name)
    reg = registry(model)
    if reg is not None and name in reg.configs:
        raise ValueError(f"model already has a task named {name!r}; load it under another name (name=...)")
    snap = _Snapshot(model)
    inject(model, config, name)
    try:
        with torch.no_grad():
            fill(task_state(model, name))
    except BaseException:
        snap.restore(model, name)
        raise
    return name


def _check_facts(model: nn.Module, facts: dict, where: str) -> None:
    mine = _model_facts(model)
    for key in ("model_type", "hidden_size", "num_layers"):
        if key in facts and key in mine and facts[key] != mine[key]:
            raise ValueError(f"{where} was saved from a model with {key}={facts[key]!r}, but this model has {key}={mine[key]!r}")


def _copy_checked(state: Dict[str, torch.Tensor], values: Dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(state) - set(values))
    extra = sorted(set(values) - set(state))
    if missing or extra:
        raise ValueError(f"{where} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    bad = [(k, tuple(values[k].shape), tuple(state[k].shape)) for k in state if values[k].shape != state[k].shape]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"{where}: shape mismatch for {k}: checkpoint {got}, model {want} ({len(bad)} tensors differ)")
    for k, t in state.items():
        t.copy_(values[k])


def is_checkpoint(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def load(model: nn.Module, path, name: Optional[str] = None) -> str:
    """Attach the task saved at ``path`` to ``model`` as task ``name`` (default: its saved name) and
    make it active. Several tasks can be loaded on one base (``set_active`` switches). A checkpoint
    that does not fit the model (config, model facts, tensor names or shapes) raises ValueError and
    leaves the model as it was. Folders in another library's format go to the importers. Returns
    the task's name."""
    from .methods.mask import MaskConfig

    check_not_a_wrapper(model, "load")
    check_not_on_meta(model, "load")
    path = Path(path)
    if not path.is_dir():
        left = sorted(path.parent.glob(f".{path.name}{_OLD_MARK}*")) if not path.exists() else []
        hint = (f"; a save there was interrupted between its two renames, and the checkpoint it was replacing is "
                f"{str(left[-1])!r}" if left else "")
        raise ValueError(f"checkpoint folder {str(path)!r} does not exist{hint}")
    if not is_checkpoint(path):
        for detect, load_fn in IMPORTERS:
            if detect(path):
                return load_fn(model, path, name)
        raise ValueError(f"{str(path)!r} is neither a pet_fast checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a format "
                         f"an importer recognises")
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{CONFIG_FILE} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                         f"expected {FORMAT!r} version {FORMAT_VERSION}")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("name"), str):
        raise ValueError(f"{CONFIG_FILE} in {str(path)!r} lacks its 'config' object or the task 'name'")
    try:
        config = MethodConfig.from_dict(meta["config"])
    except TypeError as exc:
        raise ValueError(f"{CONFIG_FILE} in {str(path)!r} holds an invalid config: {exc}") from exc
    name = meta["name"] if name is None else name
    check_task_name(name)
    _check_facts(model, meta.get("model", {}), f"checkpoint {str(path)!r}")
    stored = read_tensors(path / WEIGHTS_FILE)
    key = f"{TASK_ATTR}.{name}."
    values = {}
    for k, t in stored.items():
        k2 = k.replace(f"{TASK_ATTR}.{_PLACEHOLDER}.", key)
        if k.endswith(".mask_bits"):
            if not isinstance(config, MaskConfig):
                raise ValueError(f"checkpoint has mask bits but its config is {config.method!r}")
            shape = meta.get("mask_shapes", {}).get(k)
            if shape is None:
                raise ValueError(f"checkpoint lacks the shape of {k}")
            scores_key = k2[: -len(".mask_bits")] + ".scores"
            if scores_key.replace(key, f"{TASK_ATTR}.{_PLACEHOLDER}.") in stored:
                continue  # scores were saved: they are used as they are
            mask = unpack_mask(t, shape)
            values[scores_key] = torch.where(mask, torch.tensor(config.threshold + 1.0), torch.tensor(config.threshold - 1.0))
        else:
            values[k2] = t

    def fill(state):
        # a checkpoint saved before these heads were copied per task: the copies keep the model's own head
        older = {k for k in set(state) - set(values) if k.split(".", 1)[0] in models.LATER_TASK_HEADS
                 and k.startswith(f"{k.split('.', 1)[0]}.{TASK_ATTR}.{name}.")}
        _copy_checked({k: v for k, v in state.items() if k not in older}, values, f"checkpoint {str(path)!r}")

    attach_and_fill(model, config, name, fill)
    return name


# --------------------------------------------------------------------------------------------
# AdapterHub importers

AH_CONFIG = "adapter_config.json"
AH_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
AH_FUSION_CONFIG = "adapter_fusion_config.json"
AH_FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
# AdapterHub activation names -> pet_fast's.
AH_ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_orig": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "tanh": "tanh", "linear": "identity"}
_LOC = r"(attention\.output|output|attention_adapters|output_adapters)"


def read_tensors(f: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a pickled ``.bin`` read with ``weights_only=True`` (no
    code from the file ever runs). Anything unreadable, truncated or not a dict of tensors raises
    ValueError naming the file."""
    f = Path(f)
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(f))
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, unpickling and zip errors all mean: not a usable file
        raise ValueError(f"cannot read the tensors of {str(f)!r} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{str(f)!r} does not hold a dict of named tensors")
    return state


def read_json(f: Path) -> dict:
    """A JSON object from ``f``, or ValueError naming the file."""
    try:
        meta = json.loads(Path(f).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(f)!r} as JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{str(f)!r} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _read_weights(path: Path, names) -> Dict[str, torch.Tensor]:
    for fname in names:
        f = path / fname
        if f.is_file():
            return read_tensors(f)
    raise ValueError(f"{str(path)!r} has none of the weight files {list(names)}")


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_\-]", "_", str(name))
    return s if re.match(r"^[A-Za-z_]", s) else "_" + s


def _ah_detect(path: Path) -> bool:
    if not (path / AH_CONFIG).is_file() or not any((path / w).is_file() for w in AH_WEIGHTS):
        return False
    try:
        meta = json.loads((path / AH_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    cfg = meta.get("config") if isinstance(meta, dict) else None
    return isinstance(cfg, dict) and "peft_type" not in meta and cfg.get("architecture") in (None, "bottleneck") \
        and "reduction_factor" in cfg


def _ah_placement(c: dict) -> str:
    unsupported = {k: c.get(k) for k, ok in (("ln_before", False), ("ln_after", False), ("use_gating", False),
                                              ("adapter_residual_before_ln", False), ("phm_layer", False),
                                              ("cross_adapter", False)) if c.get(k, ok) != ok}
    if c.get("inv_adapter"):
        unsupported["inv_adapter"] = c["inv_adapter"]
    if unsupported:
        raise ValueError(f"AdapterHub adapter uses options pet_fast does not implement: {unsupported}")
    if c.get("is_parallel"):
        if not c.get("original_ln_after", True):
            raise ValueError("AdapterHub parallel adapter with original_ln_after=False is not supported")
        return "parallel"
    flags = (bool(c.get("original_ln_before")), bool(c.get("original_ln_after")), c.get("residual_before_ln"))
    if flags == (True, True, True):
        return "pfeiffer"
    if flags == (False, True, True):
        return "houlsby"
    raise ValueError(f"AdapterHub adapter with original_ln_before={flags[0]}, original_ln_after={flags[1]}, "
                     f"residual_before_ln={flags[2]!r} matches none of seq_bn / double_seq_bn / par_bn")


def _site_host(model: nn.Module, layer: int, loc: str, placement: str) -> nn.Module:
    fam = models.family(model)
    blocks = models.layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"checkpoint has an adapter in layer {layer}, the model has {len(blocks)} layers")
    parts = models.block_parts(blocks[layer], fam)
    if fam == "bert":
        return parts["mh" if loc == "mh" else "output"]
    if placement == "pfeiffer":
        return parts["block"]
    return parts["attn" if loc == "mh" else "mlp"]


def _ah_groups(state: Dict[str, torch.Tensor], pattern: str) -> Dict[Tuple[int, str], Dict[str, torch.Tensor]]:
    rx = re.compile(r"(?:^|\.)(\d+)\." + _LOC + r"\." + pattern + r"\.(.+)$")
    groups: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for k, t in state.items():
        m = rx.search(k)
        if m is None:
            raise ValueError(f"unexpected tensor {k!r} in the AdapterHub checkpoint")
        loc = "mh" if m.group(2) in ("attention.output", "attention_adapters") else "output"
        groups.setdefault((int(m.group(1)), loc), {})[m.group(3)] = t
    return groups


def import_adapterhub_adapter(model: nn.Module, path, name: Optional[str] = None) -> str:
    """Attach an AdapterHub bottleneck adapter (``adapter_config.json`` + ``adapter.safetensors`` or
    ``pytorch_adapter.bin``) as an AdapterConfig task. ``seq_bn``, ``double_seq_bn`` and ``par_bn``
    layouts (with any reduction factor, activation and scaling) are supported; other options raise."""
    from .methods.adapter import AdapterConfig

    path = Path(path)
    meta = json.loads((path / AH_CONFIG).read_text())
    c = meta["config"]
    placement = _ah_placement(c)
    act = c.get("non_linearity")
    act = act.lower() if isinstance(act, str) else act
    if act == "gelu" and "version" not in meta:
        act = "gelu_new"  # adapter-transformers checkpoints said "gelu" for the tanh approximation
    if act not in AH_ACTIVATIONS:
        raise ValueError(f"AdapterHub activation {c.get('non_linearity')!r} is not supported (known: {sorted(AH_ACTIVATIONS)})")
    if meta.get("hidden_size") is not None and meta["hidden_size"] != models.hidden_size(model):
        raise ValueError(f"AdapterHub adapter is for hidden size {meta['hidden_size']}, the model has {models.hidden_size(model)}")
    saved_type, model_type = meta.get("model_type"), models.model_type(model)
    if isinstance(saved_type, str) and saved_type and model_type and saved_type != model_type:
        raise ValueError(f"AdapterHub adapter was saved from model_type {saved_type!r}; this model is {model_type!r} "
                         f"(its sites are another architecture's)")
    ah_name = meta.get("name") or path.name
    state = _read_weights(path, AH_WEIGHTS)
    groups = _ah_groups(state, r"adapters\." + re.escape(ah_name))
    if not groups:
        raise ValueError(f"no weights of adapter {ah_name!r} in {str(path)!r}")
    sizes = {g["adapter_down.0.weight"].shape[0] for g in groups.values() if "adapter_down.0.weight" in g}
    if len(sizes) != 1:
        raise ValueError(f"AdapterHub adapter has bottleneck sizes {sorted(sizes)}; pet_fast needs one size per task")
    locs = {loc for _, loc in groups}
    scaling = c.get("scaling", 1.0)
    n_layers = len(models.layers(model))
    present = {i for i, _ in groups}
    saved_leave_out = c.get("leave_out") or []
    if max(present) >= n_layers or (isinstance(saved_leave_out, list)
                                    and set(range(n_layers)) - set(saved_leave_out) - present):
        raise ValueError(f"AdapterHub adapter has weights for layers {sorted(present)} (leave_out={saved_leave_out!r}); "
                         f"this model has {n_layers} layers: it was saved from another model")
    leave_out = sorted(set(range(n_layers)) - present)
    config = AdapterConfig(placement=placement, bottleneck=sizes.pop(), activation=AH_ACTIVATIONS[act],
                           scaling=scaling if isinstance(scaling, str) else float(scaling), init="bert",
                           mh_adapter="mh" in locs, output_adapter="output" in locs, leave_out=leave_out, train_head=False)
    rename = {"adapter_down.0.weight": "w_down", "adapter_down.0.bias": "b_down", "adapter_up.weight": "w_up",
              "adapter_up.bias": "b_up", "scaling": "scaling"}
    for g in groups.values():
        unknown = set(g) - set(rename)
        if unknown:
            raise ValueError(f"AdapterHub adapter has tensors pet_fast does not implement: {sorted(unknown)}")
    name = _safe_name(ah_name) if name is None else name

    def fill(task_state):
        values = {}
        for (layer, loc), g in groups.items():
            host = _site_host(model, layer, loc, placement)
            adapter = getattr(host, TASK_ATTR)[name]
            prefix = next(k for k, v in task_state.items() if v.data_ptr() == adapter.w_down.data_ptr())[: -len("w_down")]
            for src, t in g.items():
                dst = prefix + rename[src]
                if src == "scaling" and dst in task_state:
                    t = t.reshape(task_state[dst].shape) if t.numel() == task_state[dst].numel() else t
                values[dst] = t
        _copy_checked(task_state, values, f"AdapterHub adapter {str(path)!r}")

    return attach_and_fill(model, config, name, fill)


def _ah_fusion_detect(path: Path) -> bool:
    return (path / AH_FUSION_CONFIG).is_file() and any((path / w).is_file() for w in AH_FUSION_WEIGHTS)


def import_adapterhub_fusion(model: nn.Module, path, name: Optional[str] = None) -> str:
    """Attach an AdapterHub AdapterFusion (``adapter_fusion_config.json`` +
    ``pytorch_model_adapter_fusion.bin``) as a FusionConfig task. The fused adapters must already be
    tasks of the model under their AdapterHub names (import them first). The task's default name is
    the AdapterHub fusion name with commas as underscores."""
    from .methods.fusion import FusionConfig

    path = Path(path)
    meta = read_json(path / AH_FUSION_CONFIG)
    names = meta.get("adapter_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{str(path / AH_FUSION_CONFIG)!r} needs adapter_names (a list of the fused adapters' names), "
                         f"got {names!r}")
    c = dict(meta.get("config", {}))
    fields = ("key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
              "value_before_softmax", "value_initialized", "dropout_prob")
    config = FusionConfig(adapters=[_safe_name(n) for n in names], train_head=False, **{k: c[k] for k in fields if k in c})
    fusion_name = meta.get("name") or ",".join(names)
    state = _read_weights(path, AH_FUSION_WEIGHTS)
    # AdapterHub saves every fusion layer whose name starts with this one's ("a,b" takes "a,b,c"'s too)
    own = f"adapter_fusion_layer.{fusion_name}."
    state = {k: t for k, t in state.items() if own in k or "adapter_fusion_layer." not in k}
    groups = _ah_groups(state, r"adapter_fusion_layer\." + re.escape(fusion_name))
    placement = None
    reg = registry(model)
    first = reg.configs.get(config.adapters[0]) if reg else None
    if first is not None:
        placement = first.placement
    if placement == "parallel":
        raise ValueError("AdapterHub fuses parallel adapters with the sublayer's input added twice (the fusion's "
                         "residual and the parallel adapter's own) and, with residual_before, to the keys and values; "
                         "pet_fast's fusion of parallel adapters adds it once: not imported")
    unused_dense = not (config.query or config.key or config.value)  # AdapterHub then keeps an unused Linear
    name = _safe_name(fusion_name) if name is None else name

    def fill(task_state):
        values = {}
        for (layer, loc), g in groups.items():
            host = _site_host(model, layer, loc, placement)
            fusion = getattr(host, TASK_ATTR)[name]
            for proj, lin in (("query", fusion.query), ("key", fusion.key), ("value", fusion.value)):
                if lin is None:
                    continue
                for pname, param in lin.named_parameters():
                    k = next(k for k, v in task_state.items() if v.data_ptr() == param.data_ptr())
                    src = f"{proj}.{pname}"
                    if src in g:
                        values[k] = g[src]
            unknown = set(g) - {"query.weight", "query.bias", "key.weight", "key.bias", "value.weight"}
            if unused_dense:
                unknown -= {"dense.weight", "dense.bias"}
            if unknown:
                raise ValueError(f"AdapterHub fusion has tensors pet_fast does not implement: {sorted(unknown)}")
            steps = fusion._buffers.get("temperature_steps")  # (AdapterHub keeps no annealing state: it starts over)
            if steps is not None:
                values[next(k for k, v in task_state.items() if v.data_ptr() == steps.data_ptr())] = torch.zeros_like(steps)
        _copy_checked(task_state, values, f"AdapterHub fusion {str(path)!r}")

    return attach_and_fill(model, config, name, fill)


register_importer(_ah_detect, import_adapterhub_adapter)
register_importer(_ah_fusion_detect, import_adapterhub_fusion)


def _prefix_importer(load_fn):
    """Adapt a prefix importer (which needs a task name) to ``register_importer``'s contract."""

    def run(model: nn.Module, path, name: Optional[str] = None) -> str:
        if name is None:
            meta = read_json(Path(path) / "adapter_config.json")  # the detector has read it already
            name = _safe_name(meta.get("name") or Path(path).name)
        load_fn(model, path, check_task_name(name))
        return name

    return run


def _register_prefix_importers():
    from .methods import prefix

    register_importer(prefix.peft_prefix_detect, _prefix_importer(prefix.peft_prefix_load))
    register_importer(prefix.adapterhub_prefix_detect, _prefix_importer(prefix.adapterhub_prefix_load))


_register_prefix_importers()
