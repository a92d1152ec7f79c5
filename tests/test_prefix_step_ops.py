"""The host work of a prefix-tuning training step, counted in aten ops (benchmarks/profile_prefix_step.py):
pet_fast's prefix tuning must stay within a few ops per layer of the frozen floor, and below a PEFT-style
prefix (the prefix concatenated in every layer from a table viewed once per step)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
profile = pytest.importorskip("benchmarks.profile_prefix_step")


def _over_floor(layers, extra):
    args = profile.parser().parse_args(["--layers", str(layers), "--hidden", "32", "--tokens", "8", "--batch", "2",
                                        "--prefix", "5", "--steps", "1"] + extra)
    rows = {r["row"]: r for r in profile.measure(["floor", "pet_fast", "peft-style"], args)}
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
