"""The host work of a prefix-tuning training step, counted in aten ops (benchmarks/profile_prefix_step.py):
pet_fast's prefix tuning must stay within a few ops per layer of the frozen floor, and below a PEFT-style
prefix (BERT: the prefix concatenated in every layer from a table viewed once per step; Llama: PEFT's
decoder path, the prefix as P past tokens in a DynamicCache and the mask widened by P ones)."""
import collections
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
profile = pytest.importorskip("benchmarks.profile_prefix_step")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _rows(layers, extra):
    args = profile.parse(["--layers", str(layers), "--hidden", "32", "--tokens", "8", "--batch", "2",
                          "--prefix", "5", "--steps", "1"] + extra)
    return {r["row"]: r for r in profile.measure(["floor", "pet_fast", "peft-style"], args)}


def _over_floor(layers, extra):
    rows = _rows(layers, extra)
    floor = rows["floor"]["counts"]
    over = rows["pet_fast"]["aten_ops"] - rows["floor"]["aten_ops"]
    peft_over = rows["peft-style"]["aten_ops"] - rows["floor"]["aten_ops"]
    return over, peft_over, rows["pet_fast"]["counts"], floor


@pytest.mark.parametrize("extra", [[], ["--padding"], ["--projection", "16"]])
def test_prefix_step_op_count(extra):
    over, peft_over, counts, floor = _over_floor(3, extra)
    assert over < peft_over, counts
    assert counts.get("select_backward", 0) == floor.get("select_backward", 0)  # one unbind, not selects
    if "--padding" not in extra:
        assert counts.get("where", 0) == floor.get("where", 0)  # no mask reaches SDPA


def test_prefix_step_ops_per_layer():
    """Per layer over the floor: two cats, four slices and two copies of the key/value gradients in the
    backward: 8 ops (the prefix itself costs the same whatever the number of layers)."""
    over2 = _over_floor(2, [])[0]
    over4 = _over_floor(4, [])[0]
    assert (over4 - over2) / 2 <= 8


LLAMA = ["--family", "llama", "--autocast"]  # GQA 8/2 heads, left padding, rotary positions, bf16 autocast


def _per_layer(rows2, rows4, row):
    """Per layer: the counts of ``row`` minus the floor's (from the difference of 4 and 2 layers)."""
    d = collections.Counter(rows4[row]["counts"])
    d.subtract(rows2[row]["counts"])
    d.subtract(rows4["floor"]["counts"])
    d.update(rows2["floor"]["counts"])
    return {k: v / 2 for k, v in d.items() if v}


def test_llama_prefix_step_ops():
    """Llama with left padding: fewer ops than PEFT's cache path, both in all and per layer; per layer
    at most the two cats of the prefix onto the keys and values and their backward (slices) over the
    floor (and views), no mask conversion (SDPA gets the additive mask built once per forward: no where) and no
    casts of the prefix or of the keys/values per layer."""
    rows2, rows4 = _rows(2, LLAMA), _rows(4, LLAMA)
    assert rows4["pet_fast"]["aten_ops"] < rows4["peft-style"]["aten_ops"]
    ours, peft = _per_layer(rows2, rows4, "pet_fast"), _per_layer(rows2, rows4, "peft-style")
    assert sum(ours.values()) < sum(peft.values()), (ours, peft)
    # what a layer adds over the floor (ops it saves, e.g. the floor's mask where, count negative): the two cats,
    # the slices of their backward, and views (metadata only; torch 2.11 records two where 2.13 has none)
    added = {k: v for k, v in ours.items() if v > 0}
    assert set(added) <= {"cat", "slice", "view"}, ours
    assert added.get("cat", 0) <= 2 and added.get("slice", 0) <= 2 * added.get("cat", 0) and added.get("view", 0) <= 2, ours
    per_layer_where = rows4["pet_fast"]["counts"].get("where", 0) - rows2["pet_fast"]["counts"].get("where", 0)
    assert per_layer_where == 0 and ours.get("_to_copy", 0) <= 0, ours
    assert ours.get("repeat_interleave", 0) <= 0 and ours.get("index_select", 0) <= 0, ours


def test_llama_rows_train_the_same_parts():
    """pet_fast's row and the PEFT-style row configure the same thing: a flat prefix of P rows of
    layers*2*kv_heads*head_dim values, the score head trained, nothing else."""
    args = profile.parse(["--layers", "2", "--hidden", "32", "--prefix", "5"] + LLAMA)
    sizes = {}
    for kind in ("pet_fast", "peft-style"):
        model, prefix, params = profile.prepare(kind, args)
        sizes[kind] = sorted(tuple(p.shape) for p in params)
    head_dim = args.hidden // args.heads
    assert (5, 2 * 2 * args.kv_heads * head_dim) in sizes["pet_fast"]
    assert sizes["pet_fast"] == sizes["peft-style"]
