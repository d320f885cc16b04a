"""The benchmarks run, at their ``--smoke`` sizes, and report sane figures.

Each benchmark runs as a user runs it (a subprocess, ``--smoke --json PATH``) and the test reads the JSON it
writes: every ratio and time positive and finite, and for the calibration benchmark the one comparison
whose answer is known exactly, our ``minmax`` observer against torch.ao's ``MinMaxObserver`` on the same
tensors (equal qparams, so equal errors). The timings themselves mean nothing at these sizes.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import ROOT, run_script
from torch import nn

from lit_quant.quant import QuantOutput, QuantPlan, calibrate, prepare

pytestmark = pytest.mark.slow

#: Keys whose values are ratios or times: each must be a positive, finite number.
POSITIVE_KEYS = ("ratio", "geomean_ratio", "seconds", "ms_per_step", "fp32_ms", "ao_ms", "ours_ms", "ao_speedup",
                 "ours_speedup", "ours_over_ao", "rel_err_ours", "rel_err_ao")


def run_benchmark(script: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run ``benchmarks/<script> --smoke --json ... args`` and return the JSON it wrote."""
    out = tmp_path / "report.json"
    proc = run_script(f"benchmarks/{script}", "--smoke", "--json", str(out), *args, timeout=240)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def numbers(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every leaf of a JSON tree whose key is in :data:`POSITIVE_KEYS`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in POSITIVE_KEYS and not isinstance(value, (dict, list)):
                yield f"{path}/{key}", value
            else:
                yield from numbers(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from numbers(value, f"{path}[{i}]")


def assert_sane(report: dict[str, Any], expected: int) -> None:
    """At least ``expected`` ratios / times in ``report``, every one a positive finite number."""
    found = list(numbers({k: v for k, v in report.items() if k != "args"}))
    assert len(found) >= expected, f"only {len(found)} figures in {report}"
    bad = [(p, v) for p, v in found if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v) or v <= 0]
    assert not bad, f"figures not positive and finite: {bad}"


def test_calibration_benchmark(tmp_path: Path) -> None:
    report = run_benchmark("calibration.py", tmp_path)
    observers = report["errors"]
    timing = report["timing"]
    assert set(timing) >= {"fp32 forward", "torch.ao histogram", *observers}
    assert_sane(report, expected=len(timing) * 2 + len(observers) * 2 * 3)

    tensors = {row["tensors"] for obs in observers.values() for row in obs["vs"].values()}
    assert len(tensors) == 1 and tensors.pop() > 0, "every comparison covers the same activation tensors"
    minmax = observers["minmax"]
    assert minmax["counterpart"] == "MinMaxObserver"
    same = minmax["vs"]["MinMaxObserver"]
    # the same statistic on the same tensors gives bit-equal qparams, hence equal errors on every tensor
    assert same["rel_err_ours"] == pytest.approx(same["rel_err_ao"], rel=1e-9)
    assert same["geomean_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert same["no_worse"] == same["tensors"]
    # measuring a tensor other than the quantized one made every error ~100x torch.ao's; a 10x margin keeps
    # that out without betting on how close the MSE search lands at smoke sizes
    mse = observers["mse"]
    assert mse["counterpart"] == "HistogramObserver"
    assert mse["vs"]["HistogramObserver"]["geomean_ratio"] < 10


def test_qat_step_benchmark(tmp_path: Path) -> None:
    report = run_benchmark("qat_step.py", tmp_path)
    timing = report["timing"]
    assert timing["fp32"]["ratio"] == 1.0
    assert len(timing) == 5
    assert_sane(report, expected=2 * len(timing))


def test_export_latency_benchmark(tmp_path: Path) -> None:
    report = run_benchmark("export_latency.py", tmp_path)
    rows = report["timing"]
    assert [row["batch"] for row in rows] == report["args"]["batches"]
    runtimes = report["runtimes"]
    assert [(r["runtime"], r["batch"]) for r in runtimes] == [("onnx", b) for b in report["args"]["batches"]]
    assert_sane(report, expected=6 * len(rows) + 3 * len(runtimes))


def load_calibration_benchmark() -> ModuleType:
    """``benchmarks/calibration.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("calibration_benchmark", ROOT / "benchmarks" / "calibration.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_benchmark_sees_the_quantized_tensor() -> None:
    """A ReLU fused into its output quantizer: the benchmark's hook gets ``relu(x)``, not the input ``x``."""
    bench = load_calibration_benchmark()
    q = prepare(bench.make_model(0), QuantPlan.from_bits(8, 8))
    inputs: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    relus = {name: m for name, m in q.named_modules() if isinstance(m, QuantOutput) and type(m.module) is nn.ReLU}
    assert relus, "the model has no ReLU fused into an output quantizer: the test checks nothing"
    handles = [m.register_forward_pre_hook(lambda _m, a, n=f"{name}.act_quant": inputs.setdefault(n, a[0].clone()))
               for name, m in relus.items()]
    handles += bench.hook_observed(q, lambda name, x: seen.setdefault(name, x.clone()))
    try:
        calibrate(q, [bench.load_images(4, 0)[0]])
    finally:
        for h in handles:
            h.remove()
    for name, x in inputs.items():
        assert bool((x < 0).any()), f"{name}: no negative input, so relu(x) == x and the check is void"
        torch.testing.assert_close(seen[name], torch.relu(x), rtol=0, atol=0)


def test_layerwise_benchmark(tmp_path: Path) -> None:
    report = run_benchmark("layerwise.py", tmp_path)
    assert {"GPTQ", "AdaRound", "bias correction"} <= set(report)
    assert all(report[step]["layers"] == 22 for step in ("GPTQ", "AdaRound", "bias correction"))
    assert report["GPTQ"]["rel_err_ours"] < report["GPTQ"]["rel_err_nearest"]  # GPTQ's objective, any size
    assert_sane(report, expected=1 + 3 * 3)


#: Peer column -> the module it needs.
PEER_MODULES = {"Brevitas": "brevitas", "Brevitas + GPTQ": "brevitas", "NNCF": "nncf"}


def test_peers_benchmark(tmp_path: Path, trained: Path) -> None:
    """Ours, torch.ao and each peer on the same test images; a peer that is not installed (CI installs none)
    or that has no per-layer widths (NNCF) gets its reason instead of a figure."""
    report = run_benchmark("peers.py", tmp_path, "--ckpt", str(trained / "tiny" / "best.ckpt"))
    results = report["results"]
    assert list(results) == ["W8A8", "W4A4-fl8"]
    for setting, row in results.items():
        ours = row["ours"]
        assert ours["fp32"] == pytest.approx(report["fp32"], abs=1e-4), "quantize.py and the peers are scored " \
            "on different test images"
        assert ("--first-last-bits 8" in ours["command"]) == (setting == "W4A4-fl8")
        assert (ours["torch.ao"] is not None) == (setting == "W8A8")  # torch.ao is int8 only
        for peer, module in PEER_MODULES.items():
            result = row[peer]
            if peer == "NNCF" and setting == "W4A4-fl8":  # not offered, installed or not
                assert result["top1"] is None and "no per-layer widths" in result["reason"]
            elif importlib.util.find_spec(module) is None:
                assert result == {"top1": None, "reason": f"not installed ({module})"}
            else:
                assert 0 <= result["top1"] <= 100 and result["seconds"] > 0, result
    # 8 bits on a trained model: ours and torch.ao within a few test images of fp32
    w8 = results["W8A8"]["ours"]
    assert abs(w8["top1"] - report["fp32"]) < 5 and abs(w8["torch.ao"]["top1"] - report["fp32"]) < 5
