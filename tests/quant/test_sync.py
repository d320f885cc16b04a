"""``sync()`` under a real 2-process gloo group: with a batch index, each rank gets bit for bit the state and
qparams one process gets on all the data, for every observer; without one, every rank still agrees."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lit_quant.quant import FakeQuantize, QuantSpec, build_observer, set_batch_index, sync_observers

pytestmark = pytest.mark.ddp

# default options (histograms subsample 65536 of each batch's 131072 elements), per tensor and per channel
SPECS = {
    "minmax": QuantSpec(8, "asym_u"),
    "ema": QuantSpec(8, "asym_u", observer="ema"),
    "avg": QuantSpec(8, "asym_u", observer="avg"),
    "nstd": QuantSpec(8, "asym_s", observer="nstd"),
    "percentile": QuantSpec(8, "asym_u", observer="percentile"),
    "mse": QuantSpec(8, "asym_u", observer="mse"),
    "entropy": QuantSpec(8, "sym", observer="entropy"),
    "minmax_pc": QuantSpec(8, "sym", per_channel=True, axis=1),
    "ema_pc": QuantSpec(8, "asym_u", per_channel=True, axis=1, observer="ema"),
    "avg_pc": QuantSpec(8, "asym_s", per_channel=True, axis=1, observer="avg"),
    "nstd_pc": QuantSpec(8, "sym", per_channel=True, axis=1, observer="nstd"),
}
WORLD = 2


def _batches() -> list[torch.Tensor]:
    """Five batches (rank 0 gets three, rank 1 two) whose ranges grow, shrink and change sign: unsigned ranges
    of different powers of two, signed ones, values a rounding away from zero, so ranks re-bin differently."""
    g = torch.Generator().manual_seed(0)
    shape = (8, 4, 64, 64)  # 131072 elements: subsampled
    relu = (torch.randn(shape, generator=g) * 0.3).clamp_min(0)       # [0, 2^1)
    signed = torch.randn(shape, generator=g) * 1.5                     # [-2^3, 2^3)
    wide = (torch.randn(shape, generator=g) * 7).clamp_min(0) + 1e-3  # [0, 2^5)
    tiny = torch.randn(shape, generator=g) * 1e-6                      # signed, values near zero
    tiny[0, 0, 0, :4] = torch.tensor([-1e-38, -3e-45, 2.0 ** -149, 40.0])  # and one outlier: [-2^6, 2^6)
    small = torch.rand(shape, generator=g) * 0.05                      # [0, 2^-4)
    return [relu, signed, wide, tiny, small]


def _observe(batches: list[tuple[int | None, torch.Tensor]]) -> nn.ModuleDict:
    """Quantizers for every spec, each batch observed with its index (set as ``PTQCalibration`` does)."""
    fqs = nn.ModuleDict({name: FakeQuantize(spec) for name, spec in SPECS.items()})
    for index, b in batches:
        set_batch_index(fqs, index)
        for fq in fqs.values():
            fq.observer(b)
    set_batch_index(fqs, None)
    return fqs


def _results(fqs: nn.ModuleDict) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, fq in fqs.items():
        state = {k: v.clone() for k, v in fq.observer.state_dict().items()}
        scale, zp = fq.observer.calculate_qparams()
        out[name] = {**state, "range": torch.cat(fq.observer.calculate_range()), "scale": scale, "zero_point": zp}
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        batches = _batches()
        mine = list(enumerate(batches))[rank::WORLD]  # whole batches r, r + W, ...: global index = position
        results = {}
        fqs = _observe(mine)
        sync_observers(fqs)
        results["indexed"] = _results(fqs)
        # fewer batches than ranks: rank 1 observes nothing and still joins the merge
        fqs = _observe([(0, batches[0])] if rank == 0 else [])
        sync_observers(fqs)
        results["one_batch"] = _results(fqs)
        # no batch index (QAT's per-step merge): the ranks' states are merged as they are
        fqs = _observe([(None, b) for _, b in mine])
        sync_observers(fqs)
        results["unindexed"] = _results(fqs)
        # one rank without an index on one batch: both ranks decide together to merge without replaying
        fqs = _observe([(None if rank == 1 else i, b) for i, b in mine])
        sync_observers(fqs)
        results["mixed"] = _results(fqs)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), (what, key, value, b[key])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sync")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_every_rank_ends_in_the_same_state(ranks: list[dict]) -> None:
    for case, results in ranks[0].items():
        for name in SPECS:
            _assert_same(ranks[1][case][name], results[name], f"{case} {name}")


@pytest.mark.parametrize("case", ["indexed", "one_batch"])
def test_indexed_batches_merge_bit_for_bit_as_one_process(ranks: list[dict], case: str) -> None:
    batches = _batches()[:1] if case == "one_batch" else _batches()
    single = _results(_observe(list(enumerate(batches))))  # one process, every batch in order
    for name in SPECS:
        for rank in range(WORLD):
            _assert_same(ranks[rank][case][name], single[name], f"{case} {name} rank {rank}")


def test_unindexed_merge_is_close_to_one_process(ranks: list[dict]) -> None:
    single = _results(_observe([(None, b) for b in _batches()]))
    for case in ("unindexed", "mixed"):
        merged = ranks[0][case]
        for name in ("minmax", "minmax_pc"):  # min / max merge exactly in any order
            _assert_same(merged[name], single[name], f"{case} {name}")
        for name in ("avg", "avg_pc", "nstd", "nstd_pc"):  # float64 sums, added in another order
            torch.testing.assert_close(merged[name]["range"], single[name]["range"], rtol=1e-6, atol=0)
        for name in ("percentile", "mse", "entropy"):  # other subsamples (the offset follows each rank's count)
            for key in ("min_val", "max_val", "exp", "signed", "num_batches"):
                assert torch.equal(merged[name][key], single[name][key]), (case, name, key)


@pytest.mark.parametrize("bins", [2048, 1000])
@pytest.mark.parametrize("observer", ["percentile", "mse", "entropy"])
def test_binning_commutes_with_rebinning(observer: str, bins: int) -> None:
    """A histogram built at a narrow range and re-binned to a wider one equals the histogram built at the
    wider range directly, for values on bin edges, tiny negatives and subnormals, at every range (products in
    float32 and in float64, non-power-of-two ``bins`` too): so histograms merge exactly whatever the order."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g) * 0.1
    edges = torch.arange(-64, 64, dtype=torch.float32) / 512  # exact bin edges at many ranges
    specials = torch.tensor([-1e-38, -1e-45, 1e-45, -0.0, 0.0, -2.0 ** -30, 2.0 ** -30, -1e-7, 1e-7])
    x = torch.cat([x, edges, specials, -edges[1:] * (1 - 2.0 ** -24)])
    spec = QuantSpec(8, "asym_u", observer=observer, observer_args={"max_samples": 0, "bins": bins})
    narrow = build_observer(spec)
    narrow(x)
    assert bool(narrow.signed) and float(narrow.hist.sum()) == x.numel()
    for exp in (int(narrow.exp), int(narrow.exp) + 1, int(narrow.exp) + 7, 60, 127):
        rebinned = copy.deepcopy(narrow)
        rebinned._rebin(exp, True)
        direct = build_observer(spec)
        direct.exp.fill_(exp)
        direct.signed.fill_(True)
        direct.num_batches.fill_(1)  # a range already set: the batch is binned at it
        direct(x)
        assert torch.equal(rebinned.hist, direct.hist), exp
    # and tiny ranges (k above 2^127), unsigned into signed
    tiny = build_observer(spec)
    tiny(torch.tensor([0.0, 1e-40, 3e-39]))
    for exp, signed in ((int(tiny.exp), True), (-100, False), (-100, True), (2, True)):
        rebinned = copy.deepcopy(tiny)
        rebinned._rebin(exp, signed)
        direct = build_observer(spec)
        direct.exp.fill_(exp)
        direct.signed.fill_(signed)
        direct.num_batches.fill_(1)
        direct(torch.tensor([0.0, 1e-40, 3e-39]))
        assert torch.equal(rebinned.hist, direct.hist), (exp, signed)


def test_histograms_do_not_depend_on_the_order_of_batches() -> None:
    batches = _batches()
    for name in ("percentile", "mse", "entropy"):
        spec = QuantSpec(8, "asym_u", observer=name, observer_args={"max_samples": 0})
        forward, backward = build_observer(spec), build_observer(spec)
        for b in batches:
            forward(b)
        for b in reversed(batches):
            backward(b)
        _assert_same(forward.state_dict(), backward.state_dict(), name)


def test_calibration_batches_are_dealt_out_whole() -> None:
    """``RankBatchSampler`` (the calibration loader under DDP): global batch ``b`` is one process's batch ``b``
    on any number of ranks; a rank left without a batch gets one empty batch, collated to empty tensors."""
    from lit_quant.app.data import CollateOrEmpty, RankBatchSampler

    one = list(RankBatchSampler(range(10), 3))
    for world in (2, 3, 4):
        ranks = [list(RankBatchSampler(range(10), 3, num_replicas=world, rank=r)) for r in range(world)]
        assert [len(RankBatchSampler(range(10), 3, num_replicas=world, rank=r)) for r in range(world)] == [
            len(b) for b in ranks]
        for r, batches in enumerate(ranks):
            assert batches == one[r::world]  # the i-th batch of rank r is global batch i * world + r
    ranks = [list(RankBatchSampler(range(3), 3, num_replicas=2, rank=r)) for r in range(2)]
    assert ranks == [[[0, 1, 2]], [[]]]
    assert [list(RankBatchSampler(range(0), 3, num_replicas=2, rank=r)) for r in range(2)] == [[], []]
    data = [(torch.full((2, 4, 4), float(i)), i) for i in range(3)]
    images, labels = CollateOrEmpty(data)([])
    assert images.shape == (0, 2, 4, 4) and images.dtype == torch.float32 and labels.shape == (0,)
    images, labels = CollateOrEmpty(data)(data[1:])
    assert images.shape == (2, 2, 4, 4) and labels.tolist() == [1, 2]


def test_sync_without_distributed_is_a_no_op() -> None:
    obs = build_observer(QuantSpec(8))
    obs(torch.arange(5.0))
    before = obs.calculate_qparams()
    obs.sync()
    torch.testing.assert_close(obs.calculate_qparams(), before, atol=0, rtol=0)
