"""Mixed-precision maths: the cost model's formulas, the SQNR, the sensitivity record's JSON form and the
greedy narrowing order."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_quant.quant import QuantPlan, prepare
from lit_quant.quant.mixed import (
    MAX_SQNR_DB,
    Knob,
    KnobScore,
    LayerCost,
    Sensitivity,
    Step,
    assignment,
    bit_operations,
    layer_costs,
    packed_weight_bytes,
    scores_from_dict,
    sqnr_db,
    step_order,
)


def test_costs_follow_their_formulas() -> None:
    """Conv 3->8, 3x3, padding 1 on 6x6, then Linear 288->5: MACs 6*6*8*27 and 288*5; packed bytes
    ceil(n * bits / 8); bit-operations MACs x weight bits x input bits."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(288, 5)).eval()
    q = prepare(model, QuantPlan.from_bits(8, 8))
    costs = layer_costs(q, torch.randn(2, 3, 6, 6))
    assert costs["0"] == LayerCost(8 * 27, 6 * 6 * 8 * 27, ("input", "act"))
    assert costs["3"] == LayerCost(288 * 5, 288 * 5, ("0", "act"))  # the ReLU's output, governed by the conv
    widths = {("0", "weight"): 3, ("3", "weight"): 4, ("input", "act"): 8, ("0", "act"): 2}
    assert packed_weight_bytes(costs, widths) == math.ceil(216 * 3 / 8) + 288 * 5 * 4 // 8
    assert bit_operations(costs, widths) == 6 * 6 * 8 * 27 * 3 * 8 + 288 * 5 * 4 * 2


def test_sqnr() -> None:
    z = torch.tensor([[3.0, 4.0]])
    assert sqnr_db(z, z + torch.tensor([[0.3, 0.4]])) == pytest.approx(20.0)  # noise 1/100 of the signal
    assert sqnr_db(z, z) == MAX_SQNR_DB


def sens(table: dict[int, dict[str, float]]) -> Sensitivity:
    """A sensitivity result from {width: {"name|kind": SQNR dB}}."""
    return Sensitivity(90.0, 100, {b: {Knob.parse(k): KnobScore(v, 0.0) for k, v in knobs.items()}
                                   for b, knobs in table.items()})


def test_sensitivity_json_round_trips_and_knob_keys_split_at_the_last_bar() -> None:
    s = sens({8: {"layers.0.add|act": 40.0, "fc|weight": 30.5}, 4: {"fc|weight": 12.0}})
    data = s.to_dict()
    assert list(data["widths"]) == ["8", "4"] and data["widths"]["8"]["knobs"]["fc|weight"] == {
        "sqnr_db": 30.5, "drop": 0.0}
    assert {int(b): scores_from_dict(w["knobs"]) for b, w in data["widths"].items()} == s.widths
    assert Knob.parse("a|b|act") == ("a|b", "act") and Knob("fc", "weight").key == "fc|weight"
    assert s.noise_power(Knob("fc", "weight"), 4) == pytest.approx(10 ** -1.2)


def test_step_order_takes_the_least_noise_per_saved_byte_one_width_at_a_time() -> None:
    costs = {"a": LayerCost(1000, 1, None), "b": LayerCost(100, 1, None)}
    knobs = [("a", "weight"), ("b", "weight"), ("a", "act")]
    s = sens({8: {"a|weight": 50, "b|weight": 50, "a|act": 50},
              4: {"a|weight": 30, "b|weight": 30, "a|act": 10},
              2: {"a|weight": 10, "b|weight": 25, "a|act": 5}})
    order = step_order(s, knobs, [2, 4, 8], costs, "size")
    # activations save no weight bytes, so the size objective never narrows them
    assert all(step.knob[1] == "weight" for step in order)
    # a: 8->4 saves 500 bytes for 1e-3 noise, rate 2e-6; b: 8->4 saves 50 for the same, 2e-5; a: 4->2 saves
    # 250 for 0.099, 4e-4; b: 4->2 saves 25 for ~2.2e-3, 9e-5
    assert [(s.knob[0], s.bits) for s in order] == [("a", 4), ("b", 4), ("b", 2), ("a", 2)]
    assert assignment(knobs, 8, order[:2]) == {("a", "weight"): 4, ("b", "weight"): 4, ("a", "act"): 8}
    assert isinstance(order[0], Step) and order[0].saving == 500
