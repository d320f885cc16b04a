"""Paired accuracy comparison: the exact McNemar test against scipy's binomial test, and the outcomes a real
Lightning test run records image by image."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from scipy.stats import binomtest

from lit_quant.app.classifier import LitClassifier
from lit_quant.app.data import ClassificationDataModule
from lit_quant.app.measure import paired_comparison
from lit_quant.app.models import build_model


def _outcomes(only_a: int, only_b: int, both: int, neither: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor([1] * only_a + [0] * only_b + [1] * both + [0] * neither, dtype=torch.bool)
    b = torch.tensor([0] * only_a + [1] * only_b + [1] * both + [0] * neither, dtype=torch.bool)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))
    return a[perm], b[perm]


@pytest.mark.parametrize("only_a,only_b", [(0, 5), (1, 9), (9, 1), (12, 20), (20, 23), (0, 0), (7, 7), (3, 60)])
def test_exact_mcnemar_is_the_two_sided_binomial_test(only_a: int, only_b: int) -> None:
    a, b = _outcomes(only_a, only_b, both=500, neither=17)
    cmp = paired_comparison(a, b)
    assert (cmp.only_a, cmp.only_b) == (only_a, only_b)
    n = only_a + only_b
    expected = 1.0 if n == 0 else binomtest(only_a, n, 0.5).pvalue
    assert cmp.p_value == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert paired_comparison(b, a).p_value == cmp.p_value  # symmetric


def test_paired_comparison_by_hand_and_at_large_n() -> None:
    # 0 against 5: p = 2 * C(5,0) / 2^5
    assert paired_comparison(*_outcomes(0, 5, 10, 0)).p_value == 2 / 32
    # 1 against 9: p = 2 * (C(10,0) + C(10,1)) / 2^10
    assert paired_comparison(*_outcomes(1, 9, 10, 0)).p_value == 2 * 11 / 1024
    # thousands of discordant images: no float underflow on the way (2^-6000 alone would be 0.0)
    balanced = paired_comparison(*_outcomes(3000, 3000, 0, 0))
    assert balanced.p_value == 1.0
    near = paired_comparison(*_outcomes(2950, 3050, 0, 0))
    assert near.p_value == pytest.approx(binomtest(2950, 6000, 0.5).pvalue, rel=1e-9) and 0.05 < near.p_value < 1
    with pytest.raises(ValueError, match="same images"):
        paired_comparison(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


def test_test_run_records_each_image_outcome() -> None:
    torch.manual_seed(0)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=24, fake_size=64)
    dm.setup()
    lit = LitClassifier(build_model("resnet20", 3, 10).eval(), 10)
    result = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).test(
        lit, datamodule=dm, verbose=False)[0]
    with torch.no_grad():
        expected = torch.cat([lit.model(x).argmax(1) == y for x, y in dm.test_dataloader()])
    assert lit.test_correct is not None and torch.equal(lit.test_correct, expected)
    assert float(lit.test_correct.float().mean()) == pytest.approx(result["test/top1"], abs=1e-6)
