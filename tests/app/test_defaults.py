"""The defaults hold on a model users bring: torchvision's resnet18 (standard stem) trained briefly on digits
at 32 px with train.py's default recipe, then quantized with quantize.py's default flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import quantize
import train

pytestmark = pytest.mark.slow

#: One test image of the digits split (359 images), in points.
IMAGE = 100 / 359


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.ckpt of ``train.py --model resnet18 --image-size 32 --epochs 2`` (the torchvision CNN recipe)."""
    root = tmp_path_factory.mktemp("zoo") / "checkpoints"
    assert train.main(["--model", "resnet18", "--image-size", "32", "--epochs", "2", "--run-name", "resnet18",
                       "--checkpoint-dir", str(root), "--no-progress"]) == 0
    return root / "resnet18" / "best.ckpt"


@pytest.fixture(scope="module")
def reports(resnet18: Path) -> dict[str, dict[str, dict]]:
    """The report rows, by variant, of the default W8A8 run (``default``) and of one asking for 8-bit logits
    (``logits8``)."""
    out = {}
    for name, extra in (("default", []), ("logits8", ["--io-bits", "8"])):
        assert quantize.main(["--ckpt", str(resnet18), "--bits", "8", *extra, "--no-latency", "--no-progress",
                              "--name", name]) == 0
        data = json.loads((resnet18.parent / "quantize" / name / "report.json").read_text())
        out[name] = {r["variant"]: r for r in data["rows"]}
    return out


def test_default_w8a8_of_torchvision_resnet18_stays_within_two_images_of_fp32(reports: dict) -> None:
    """A trained network (a useful fp32 top-1 after two epochs of the family's recipe) loses at most two test
    images at the default W8A8, whose plan keeps the logits float and the image's range whole."""
    rows = reports["default"]
    fp32, ptq = rows["fp32"]["top1"], rows["ptq"]["top1"]
    assert fp32 >= 90.0
    assert ptq >= fp32 - 2 * IMAGE - 1e-6
    assert "overrides: input act observer=minmax, @output act float" in rows["ptq"]["note"]


def test_asked_for_8_bit_logits_report_what_they_cost(reports: dict) -> None:
    """--io-bits 8 quantizes the logits; the row's note gives the top-1 with them float, which is the default
    run's row (the same plan apart from the logits), and the difference."""
    asked, default = reports["logits8"]["ptq"], reports["default"]["ptq"]
    assert f"with float logits (the default) top-1 would be {default['top1']:.2f}" in asked["note"]
    assert f"cost {default['top1'] - asked['top1']:+.2f} points" in asked["note"]
