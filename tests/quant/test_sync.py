"""``sync()`` under a real 2-process gloo group: each rank gets the qparams one process gets on all the data."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_quant.quant import QuantSpec, build_observer

SPECS = {
    "minmax": QuantSpec(8, "asym_u"),
    "minmax_pc": QuantSpec(8, "sym", per_channel=True, axis=1),
    "nstd": QuantSpec(8, "asym_s", observer="nstd"),
    "avg": QuantSpec(8, "asym_u", observer="avg"),
    "mse": QuantSpec(8, "asym_u", observer="mse", observer_args={"max_samples": 0}),
    "entropy": QuantSpec(8, "sym", observer="entropy", observer_args={"max_samples": 0}),
    "percentile": QuantSpec(8, "asym_u", observer="percentile", observer_args={"max_samples": 0}),
    "ema": QuantSpec(8, "asym_u", observer="ema"),
}


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(4):
        b = (torch.randn(4, 3, 6, 6, generator=g) * (1 + 0.2 * i)).clamp(-3.5, 3.5)
        b[0, 0, 0, :2] = torch.tensor([-3.9, 3.9])  # every batch spans the same power-of-two histogram range
        out.append(b)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for name, spec in SPECS.items():
            obs = build_observer(spec)
            for b in _batches()[rank::2]:  # each rank sees half of the batches
                obs(b)
            obs.sync()
            results[name] = obs.calculate_qparams()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_gives_every_rank_the_single_process_qparams(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, spec in SPECS.items():
        for r in ranks:  # identical on both ranks
            torch.testing.assert_close(r[name], ranks[0][name], atol=0, rtol=0)
        if name == "ema":
            continue  # an average of per-rank EMAs is not the EMA of one sequence: only rank agreement
        single = build_observer(spec)
        for b in _batches():
            single(b)
        scale, zp = single.calculate_qparams()
        torch.testing.assert_close(ranks[0][name][0], scale, atol=0, rtol=1e-6 if name == "nstd" else 0)
        assert ranks[0][name][1].tolist() == zp.tolist(), name


def test_sync_without_distributed_is_a_no_op() -> None:
    obs = build_observer(QuantSpec(8))
    obs(torch.arange(5.0))
    before = obs.calculate_qparams()
    obs.sync()
    torch.testing.assert_close(obs.calculate_qparams(), before, atol=0, rtol=0)
