"""Observers: one range statistic per class, feeding the single qparams function.

Contract (shared by every class, enforced in :class:`Observer`):

* ``forward(x)`` records statistics of ``x`` under ``no_grad`` and returns ``x`` itself; empty tensors are
  ignored; NaN / Inf raise :class:`CalibrationError` (detected from the min / max, no extra pass);
* all state lives in registered buffers, so ``state_dict``, ``.to()`` and DDP broadcast work, and buffers
  resize themselves when a state dict with other shapes (per-channel sizes) is loaded;
* ``calculate_range()`` gives the clipping range ``(min, max)``; ``calculate_qparams()`` passes it to
  :func:`lit_quant.quant.functional.calculate_qparams`; both raise before any data was seen;
* ``reset()`` forgets everything; ``sync()`` merges statistics across ``torch.distributed`` ranks so every
  rank computes identical qparams (no-op when not initialised).

Distributed calibration. While :attr:`Observer.batch_index` holds the global number of the batch being
observed (:func:`lit_quant.quant.fake_quant.set_batch_index`; ``PTQCalibration`` and ``calibrate`` set it),
``sync()`` gives every rank bit for bit the state one process reaches observing all ranks' batches in
index order, for every observer: ``minmax`` and the histograms merge exactly in any order (min, max and
integer counts), and ``ema``, ``avg`` and ``nstd``, whose merge depends on order or on the association of
float sums, keep each batch's statistics and replay them all in index order. This holds when the same
global batch is the same tensor however many ranks there are (whole batches dealt out to ranks). Without a
batch index on every batch of every rank (QAT's per-step merge) all ranks still end in the same state, but
not necessarily one process's: ``ema`` averages the ranks' running values, ``avg`` / ``nstd`` add their sums
(equal up to float64 rounding), and a subsampling histogram places each batch's sample by its own rank's
batch count.

Histogram observers (``percentile``, ``mse``, ``entropy``) keep a fixed number of bins over a range
``[0, 2^e]`` or ``[-2^e, 2^e]``. A value ``v`` falls in bin ``floor(v * k)`` (plus ``bins / 2`` for a signed
range), ``k = bins / 2^e`` (``bins / 2^(e+1)`` signed), with the product computed exactly; growing the range
multiplies ``k`` by a power of two, and ``floor(floor(y) / 2^d) == floor(y / 2^d)``, so a histogram built at a
narrower range and re-binned to a wider one equals the histogram built at the wider range directly:
histograms of any batches, seen in any order and on any rank, re-bin to a common range and add up exactly.
To stay cheap they bin a deterministic subsample of at most ``max_samples`` elements per batch: blocks of
16 consecutive elements (one 64-byte cache line each) spread evenly over the tensor, at a spacing that
shares no factor with image sizes and an offset that moves every batch (with the batch index, the same
positions of the same batch on any number of ranks). Min and max remain exact; the range search runs once,
vectorised over the histogram, in ``calculate_range()``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from lit_quant.quant.errors import CalibrationError, NonFiniteError, QuantConfigError
from lit_quant.quant.functional import calculate_qparams, fake_quantize
from lit_quant.quant.spec import OBSERVER_NAMES, QuantSpec

_INF = float("inf")


class ResizingBuffersMixin:
    """Lets ``load_state_dict`` resize buffers and parameters whose shape depends on data seen (per-channel
    sizes, a histogram observer's first range), so a calibrated state dict loads into a fresh model."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, buf in list(self._buffers.items()):  # type: ignore[attr-defined]
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)  # type: ignore
        for name, param in list(self._parameters.items()):  # type: ignore[attr-defined]
            key = prefix + name
            if param is not None and key in state_dict and state_dict[key].shape != param.shape:
                self._parameters[name] = nn.Parameter(  # type: ignore[attr-defined]
                    torch.empty_like(state_dict[key], device=param.device), requires_grad=param.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op: Any, group: Any = None) -> torch.Tensor:
    """All-reduce a copy of ``t`` (float64 sums stay exact; gloo wants contiguous tensors)."""
    out = t.detach().clone().contiguous()
    dist.all_reduce(out, op=op, group=group)
    return out


class Observer(ResizingBuffersMixin, nn.Module):
    """Base class: records a statistic of every tensor it sees; see the module docstring for the contract.

    Subclasses set :attr:`name`, :attr:`DEFAULTS` (their options) and implement ``_observe``,
    ``_compute_range``, ``_init_state`` and ``_sync``.

    Attributes:
        spec: the :class:`QuantSpec` whose range this observer estimates.
        options: observer options (``DEFAULTS`` updated with the spec's ``observer_args``).
    """

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: True when the statistic of a per-tensor batch is its min and max only: such an observer can take them
    #: from the fake-quant pass itself (:meth:`observe_range`) instead of reading the tensor once more.
    RANGE_ONLY: ClassVar[bool] = False
    #: True when merging ranks' states is not exact (it depends on the order of batches or on how float sums
    #: associate): such an observer folds each batch in through :meth:`_add_batch`, which keeps the batch's
    #: statistics while :attr:`batch_index` is set, and :meth:`sync` replays every rank's batches in index order.
    REPLAY: ClassVar[bool] = False
    #: Global number of the batch being observed (the same batch has the same number on any number of ranks),
    #: or ``None``; set on every observer of a model by :func:`lit_quant.quant.fake_quant.set_batch_index`.
    batch_index: int | None = None

    def __init__(self, spec: QuantSpec, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            allowed = ", ".join(self.DEFAULTS) or "none"
            raise QuantConfigError(f"unknown option(s) {', '.join(unknown)} for observer {self.name!r}; "
                                   f"allowed: {allowed}")
        self.spec = spec
        self.options: dict[str, Any] = {**self.DEFAULTS, **options}
        for key, default in self.DEFAULTS.items():
            value = self.options[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise QuantConfigError(f"observer option {key!r} must be a number (default {default}); got {value!r}")
        self._validate_options()
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))
        self._init_state(torch.device("cpu"))
        # (batch index, order of arrival, statistics) of every batch since reset, or None when some batch had
        # no index or the state did not come from reset (merged, or loaded): then sync cannot replay
        self._records: list[tuple[int, int, tuple[torch.Tensor, ...]]] | None = []

    @property
    def axis(self) -> int | None:
        """Channel axis for per-channel statistics, ``None`` per tensor."""
        return self.spec.axis if self.spec.per_channel else None

    @property
    def has_data(self) -> bool:
        """True once a non-empty tensor has been observed (or merged in by :meth:`sync`)."""
        return bool(self.num_batches > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record statistics of ``x`` and return ``x`` unchanged (same object, autograd untouched)."""
        if x.numel() == 0:
            return x
        with torch.no_grad():
            self._observe(x.detach().float())
            self.num_batches += 1
        return x

    def observe_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Record a per-tensor batch given by its min and max, shape ``(1,)`` (a :attr:`RANGE_ONLY` observer
        whose batch was read elsewhere): the same statistic as ``forward`` on that batch."""
        if not self.RANGE_ONLY or self.axis is not None:
            raise QuantConfigError(f"observer {self.name!r} (axis {self.axis}) needs the tensor, not its range")
        with torch.no_grad():
            self._check_finite(lo, hi)
            self._observe_range(lo.float(), hi.float())
            self.num_batches += 1

    def calculate_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range ``(min, max)``, float32 tensors of shape ``(1,)`` or ``(C,)``.

        Raises:
            CalibrationError: no data observed yet.
        """
        if not self.has_data:
            raise CalibrationError(f"{type(self).__name__} ({self.name!r}) has observed no data: run calibration "
                                   "batches through the model (or load a stats file) before asking for qparams")
        lo, hi = self._compute_range()
        return lo.float(), hi.float()

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for :meth:`calculate_range` under :attr:`spec` (the one qparams function)."""
        return calculate_qparams(*self.calculate_range(), self.spec)

    def reset(self) -> None:
        """Forget all statistics (buffers back to their initial values, on the same device)."""
        self.num_batches.zero_()
        self._init_state(self.num_batches.device)
        self._records = []

    def sync(self, group: Any = None) -> None:
        """Merge statistics across ranks of ``group`` so all ranks compute the same qparams; no-op if not DDP.

        With a :attr:`batch_index` on every batch since :meth:`reset` on every rank, the merged state is bit
        for bit the state of one process observing all the batches in index order (module docstring).
        """
        records, self._records = self._records, None  # a merged state is not a sequence of this rank's batches
        if not _distributed():
            return
        if self.REPLAY and self._all_recorded(records, group):
            self._replay(records, group)
        else:
            self._sync(group)
        self.num_batches.copy_(_all_reduce(self.num_batches, dist.ReduceOp.SUM, group))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._records = [] if int(self.num_batches) == 0 else None  # loaded statistics have no batch records

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"bits={self.spec.bits}, scheme={self.spec.scheme}, axis={self.axis}" + (f", {opts}" if opts else "")

    # --- helpers for subclasses -------------------------------------------------------------------------
    def _add_batch(self, *stats: torch.Tensor) -> None:
        """Fold one batch's statistics into the state (:meth:`_accumulate`, for :attr:`REPLAY` observers),
        keeping a copy for :meth:`sync` while every batch since reset came with a :attr:`batch_index` under
        ``torch.distributed`` (one process has nothing to merge, and keeps nothing)."""
        if self._records is not None:
            if self.batch_index is None or not _distributed():
                self._records = None
            else:
                self._records.append((int(self.batch_index), len(self._records),
                                      tuple(s.detach().to("cpu", copy=True) for s in stats)))
        self._accumulate(*stats)

    def _accumulate(self, *stats: torch.Tensor) -> None:
        """Update the state from one batch's statistics (those passed to :meth:`_add_batch`)."""
        raise NotImplementedError

    def _all_recorded(self, records: list | None, group: Any) -> bool:
        """Whether every rank kept the statistics of every batch it observed (one collective decision)."""
        kept = torch.tensor(int(records is not None), device=self.num_batches.device)
        return bool(_all_reduce(kept, dist.ReduceOp.MIN, group))

    def _replay(self, records: list, group: Any) -> None:
        """Rebuild the state from reset by folding in every rank's batches in the order of their index (then
        rank, then arrival: a module called twice in one batch keeps its order), as one process would."""
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, records, group=group)
        batches = sorted(((index, rank, seq, stats) for rank, rank_records in enumerate(gathered)
                          for index, seq, stats in rank_records), key=lambda r: r[:3])
        device = self.num_batches.device
        self._init_state(device)
        for *_, stats in batches:
            self._accumulate(*(s.to(device) for s in stats))

    def _validate_options(self) -> None:
        """Check option values; subclasses override."""

    def _init_state(self, device: torch.device) -> None:
        """Running min / max; ``(0,)``-shaped until data arrives (size 1 per tensor, C per channel)."""
        self.register_buffer("min_val", torch.empty(0, device=device))
        self.register_buffer("max_val", torch.empty(0, device=device))

    def _observe(self, x: torch.Tensor) -> None:
        self._observe_range(*self._batch_minmax(x))

    def _observe_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Update the state from one batch's (checked) min and max; :attr:`RANGE_ONLY` observers override."""
        self._update_running_minmax(lo, hi)

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def _sync(self, group: Any) -> None:
        self._sync_buffers(group, mins=("min_val",), maxs=("max_val",))

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a ``(C, N)`` matrix along the channel axis (per channel) or ``(1, N)`` (per tensor)."""
        if self.axis is None:
            return x.reshape(1, -1)
        if x.dim() <= self.axis:
            raise QuantConfigError(f"per-channel observer along axis {self.axis} got a tensor of shape "
                                   f"{tuple(x.shape)}; it needs more than {self.axis} dimension(s)")
        return x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)

    def _batch_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of this batch (per channel or ``(1,)``); NaN / Inf raise, read off the result."""
        # NaN propagates through min/max and Inf shows up in them: checking 2 (or 2C) numbers is enough.
        if self.axis is None:
            lo, hi = torch.aminmax(x)
            lo, hi = lo.reshape(1), hi.reshape(1)
        else:
            lo, hi = torch.aminmax(self._channels(x), dim=1)
        self._check_finite(lo, hi)
        return lo, hi

    def _check_finite(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Raise when a batch's min / max hold NaN or Inf."""
        if lo.numel() == 1:
            finite = math.isfinite(lo.item()) and math.isfinite(hi.item())  # two reads, not five tensor ops
        else:
            finite = bool(torch.isfinite(lo).all() & torch.isfinite(hi).all())
        if not finite:
            raise NonFiniteError(f"observer {self.name!r} got a tensor with NaN or Inf values "
                                   f"(min {lo.min().item()}, max {hi.max().item()})")

    def _update_running_minmax(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo.clone(), hi.clone()
            return
        self._check_channels(lo)
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    def _check_channels(self, lo: torch.Tensor) -> None:
        if lo.shape != self.min_val.shape:
            raise CalibrationError(f"observer {self.name!r} saw {lo.numel()} channel(s) after "
                                   f"{self.min_val.numel()}: per-channel size must not change")

    def _sync_buffers(self, group: Any, mins: tuple[str, ...] = (), maxs: tuple[str, ...] = (),
                      sums: tuple[str, ...] = ()) -> None:
        """All-reduce buffers with MIN / MAX / SUM; ranks without data join with neutral values."""
        size = _all_reduce(torch.tensor(self.min_val.numel(), device=self.num_batches.device), dist.ReduceOp.MAX,
                           group).item()
        for names, op, fill in ((mins, dist.ReduceOp.MIN, _INF), (maxs, dist.ReduceOp.MAX, -_INF),
                                (sums, dist.ReduceOp.SUM, 0.0)):
            for name in names:
                buf = getattr(self, name)
                if buf.numel() == 0 and size:
                    buf = torch.full((size,), fill, dtype=buf.dtype, device=buf.device)
                setattr(self, name, _all_reduce(buf, op, group))


class MinMaxObserver(Observer):
    """Running minimum and maximum (per tensor, or per channel with ``spec.per_channel``).

    Same statistic and qparams as torch.ao's ``MinMaxObserver`` / ``PerChannelMinMaxObserver``.
    ``sync()``: MIN / MAX all-reduce — identical to observing all ranks' data in one process.
    """

    name = "minmax"
    RANGE_ONLY = True


class EMAMinMaxObserver(Observer):
    """Exponential moving average of per-batch min / max: ``m <- m + c * (batch_min - m)``, first batch as is.

    Same as torch.ao's ``MovingAverageMinMaxObserver`` (and its per-channel variant); ``c`` is the option
    ``averaging_constant`` (default 0.01). An EMA depends on the order of the batches: with a batch index on
    every batch, ``sync()`` replays all ranks' per-batch min / max in index order, bit for bit the EMA of one
    process seeing the batches in that order; without one it averages the ranks' running values (the same on
    every rank, not the EMA of any one sequence).
    """

    name = "ema"
    DEFAULTS = {"averaging_constant": 0.01}
    RANGE_ONLY = True
    REPLAY = True

    def _validate_options(self) -> None:
        if not 0.0 < self.options["averaging_constant"] <= 1.0:
            raise QuantConfigError(f"averaging_constant must be in (0, 1], got {self.options['averaging_constant']}")

    def _observe_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self._add_batch(lo, hi)

    def _accumulate(self, lo: torch.Tensor, hi: torch.Tensor) -> None:  # type: ignore[override]
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo.clone(), hi.clone()
            return
        self._check_channels(lo)
        c = self.options["averaging_constant"]
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)

    def _sync(self, group: Any) -> None:
        has = torch.tensor(float(self.min_val.numel() > 0), dtype=torch.float64, device=self.num_batches.device)
        ranks = _all_reduce(has, dist.ReduceOp.SUM, group)
        self._sync_buffers(group, sums=("min_val", "max_val"))
        self.min_val = (self.min_val.double() / ranks).float()
        self.max_val = (self.max_val.double() / ranks).float()


class AvgMinMaxObserver(Observer):
    """Distiller's ``avg`` clipping: the mean over batches of each batch's min and max.

    Cuts the occasional extreme batch that a running min / max keeps forever. ``sync()`` gives the mean over
    every batch seen anywhere: with a batch index on every batch, by replaying all ranks' per-batch extremes
    in index order (the float64 sums one process forms, bit for bit); without, by adding the ranks' sums.
    """

    name = "avg"
    RANGE_ONLY = True
    REPLAY = True

    def _init_state(self, device: torch.device) -> None:
        super()._init_state(device)
        self.register_buffer("sum_min", torch.empty(0, dtype=torch.float64, device=device))
        self.register_buffer("sum_max", torch.empty(0, dtype=torch.float64, device=device))

    def _observe_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self._add_batch(lo, hi)

    def _accumulate(self, lo: torch.Tensor, hi: torch.Tensor) -> None:  # type: ignore[override]
        if self.sum_min.numel() == 0:
            self.sum_min, self.sum_max = torch.zeros_like(lo, dtype=torch.float64), torch.zeros_like(
                hi, dtype=torch.float64)
        self._update_running_minmax(lo, hi)
        self.sum_min += lo
        self.sum_max += hi

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_batches.double()
        return self.sum_min / n, self.sum_max / n

    def _sync(self, group: Any) -> None:
        self._sync_buffers(group, mins=("min_val",), maxs=("max_val",), sums=("sum_min", "sum_max"))


class NStdObserver(Observer):
    """Distiller's ``n_std`` clipping: ``[mean - n * std, mean + n * std]`` clamped to the observed min / max.

    Mean and (population) standard deviation are over every element seen, from float64 running sums of
    ``x`` and ``x^2`` (per channel with ``spec.per_channel``). Option ``n_std`` (default 3). ``sync()`` gives
    the statistics of all the data: with a batch index on every batch, by replaying all ranks' per-batch sums
    in index order (the float64 sums one process forms, bit for bit); without, by adding the ranks' sums
    (equal up to the rounding of float64 additions).
    """

    name = "nstd"
    DEFAULTS = {"n_std": 3.0}
    REPLAY = True

    def _validate_options(self) -> None:
        if self.options["n_std"] <= 0:
            raise QuantConfigError(f"n_std must be positive, got {self.options['n_std']}")

    def _init_state(self, device: torch.device) -> None:
        super()._init_state(device)
        for name in ("count", "sum", "sum_sq"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64, device=device))

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_minmax(x)
        y = self._channels(x)
        self._add_batch(lo, hi, torch.full_like(lo, y.shape[1], dtype=torch.float64),
                        y.sum(dim=1, dtype=torch.float64), (y * y).sum(dim=1, dtype=torch.float64))

    def _accumulate(self, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor,  # type: ignore[override]
                    total: torch.Tensor, total_sq: torch.Tensor) -> None:
        self._update_running_minmax(lo, hi)
        if self.sum.numel() == 0:
            self.count, self.sum, self.sum_sq = (torch.zeros_like(lo, dtype=torch.float64) for _ in range(3))
        self.count += count
        self.sum += total
        self.sum_sq += total_sq

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.count
        std = (self.sum_sq / self.count - mean * mean).clamp_min(0.0).sqrt()
        n = self.options["n_std"]
        lo = torch.maximum(mean - n * std, self.min_val.double())
        hi = torch.minimum(mean + n * std, self.max_val.double())
        return lo, hi

    def _sync(self, group: Any) -> None:
        self._sync_buffers(group, mins=("min_val",), maxs=("max_val",), sums=("count", "sum", "sum_sq"))


_MIN_EXP = -126  # range exponent used for an all-zero tensor: any later data re-bins it cleanly
_BLOCK = 16  # consecutive float32 elements per sampled block: one 64-byte cache line


def _coprime_stride(stride: int) -> int:
    """Smallest stride >= ``stride`` sharing no factor 2, 3, 5, 7 with image sizes (avoids aliasing a grid)."""
    while math.gcd(stride, 210) != 1:
        stride += 1
    return stride


class HistogramObserverBase(Observer):
    """Shared histogram state for ``percentile``, ``mse`` and ``entropy`` (see the module docstring).

    Buffers: ``hist`` (float64 counts, ``bins`` long), ``exp`` (the range is ``2^exp``), ``signed`` (range
    ``[-2^exp, 2^exp]`` instead of ``[0, 2^exp]``), plus exact running ``min_val`` / ``max_val``.
    Options: ``bins`` (default 2048), ``max_samples`` per batch (default 65536 in blocks of 16, 0 bins every
    element). Why a sample: binning every element of a large activation costs more than the forward pass,
    and 65536 values per batch keep the histogram's tail, which ``mse`` and ``percentile`` ranges read,
    close to the whole tensor's.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {"bins": 2048, "max_samples": 65536}

    def _validate_options(self) -> None:
        bins, samples = self.options["bins"], self.options["max_samples"]
        if not isinstance(bins, int) or bins < 16 or bins % 2:
            raise QuantConfigError(f"bins must be an even integer >= 16, got {bins!r}")
        if not isinstance(samples, int) or samples < 0:
            raise QuantConfigError(f"max_samples must be a non-negative integer (0 = all), got {samples!r}")

    def _init_state(self, device: torch.device) -> None:
        super()._init_state(device)
        self.register_buffer("hist", torch.zeros(self.options["bins"], dtype=torch.float64, device=device))
        self.register_buffer("exp", torch.tensor(_MIN_EXP, dtype=torch.int64, device=device))
        self.register_buffer("signed", torch.tensor(False, device=device))

    def _edges(self, exp: int | None = None, signed: bool | None = None) -> tuple[float, float]:
        exp = int(self.exp) if exp is None else exp
        signed = bool(self.signed) if signed is None else signed
        top = math.ldexp(1.0, exp)
        return (-top if signed else 0.0), top

    def _sample(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The values to bin and whether they are a copy (free to modify in place): all of ``x``, or at most
        ``max_samples`` of them in blocks of :data:`_BLOCK` consecutive elements.

        Blocks rather than single elements at a stride: gathering ``n`` elements one per cache line reads
        ``n`` cache lines, ``n / 16`` in blocks, and the gather was the most expensive step of binning.
        """
        flat = x.reshape(-1)
        limit, numel = self.options["max_samples"], flat.numel()
        if not limit or numel <= limit:
            return flat, False
        blocks = max(1, limit // _BLOCK)
        spacing = _coprime_stride(max(_BLOCK, -(-numel // blocks)))  # ceil: the blocks span all of x
        # A different offset each batch so repeated calibration batches cover every position; from the global
        # batch index when there is one, so a batch is sampled alike however batches are spread over ranks.
        batch = int(self.num_batches) if self.batch_index is None else int(self.batch_index)
        offset = (batch * _BLOCK) % (spacing - _BLOCK + 1)
        count = min(blocks, (numel - offset - _BLOCK) // spacing + 1)
        view = flat.as_strided((count, _BLOCK), (spacing, 1), flat.storage_offset() + offset)
        return view.reshape(-1), True

    def _rebin(self, exp: int, signed: bool) -> None:
        """Move counts to the (wider or equal) range ``exp`` / ``signed``, in integers: the bin width grows by
        ``2^d``, so bin ``i`` (``j = i - offset`` from the bin starting at 0) moves to ``floor(j / 2^d) + offset'``,
        exactly the bin :meth:`_bin_counts` gives its values at the new range."""
        old_exp, old_signed = int(self.exp), bool(self.signed)
        if exp == old_exp and signed == old_signed:
            return
        bins = self.options["bins"]
        shift = (exp + signed) - (old_exp + old_signed)
        if shift < 0:
            raise CalibrationError(f"histogram range can only grow (2^{old_exp} to 2^{exp})")
        j = torch.arange(bins, dtype=torch.int64, device=self.hist.device) - (bins // 2 if old_signed else 0)
        index = ((j >> shift) + (bins // 2 if signed else 0)).clamp_(0, bins - 1)  # >>: floor division by 2^d
        self.hist = torch.zeros_like(self.hist).index_add_(0, index, self.hist)
        self.exp.fill_(exp)
        self.signed.fill_(signed)

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_minmax(x)
        self._update_running_minmax(lo, hi)
        lo_f, hi_f = lo.item(), hi.item()
        amax = max(-lo_f, hi_f)
        exp = math.frexp(amax)[1] if amax > 0 else _MIN_EXP  # amax < 2^exp
        if int(self.num_batches) == 0:
            self.exp.fill_(exp)
            self.signed.fill_(lo_f < 0)
        else:
            self._rebin(max(exp, int(self.exp)), bool(self.signed) or lo_f < 0)
        self.hist += self._bin_counts(*self._sample(x))

    def _bin_counts(self, values: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """Counts of ``values`` per bin: bin ``floor(v * k)``, plus ``bins / 2`` for a signed range, with
        ``k = bins / (hi - lo)``.

        The index is ``floor`` of the exact product, never a product rounded after shifting by ``lo`` (which
        rounds differently at each range), so binning commutes with :meth:`_rebin`. With ``bins`` a power of
        two, ``k`` is one too, and ``v * k`` is exact in float32 when ``1 <= k <= 2^127`` (``k`` representable,
        ``|v * k| < bins``, and scaling up by a power of two never rounds, subnormal ``v`` included); otherwise
        the product is formed in float64 (exact for float32 values and ``bins`` below ``2^29``), always so for
        other ``bins``, so that every range uses the same arithmetic.
        ``bincount`` on int32 indices is several times faster than ``torch.histc`` on CPU (and about twice as
        fast as on int64 ones). ``owned``: ``values`` is a copy that may be overwritten.
        """
        bins = self.options["bins"]
        signed = bool(self.signed)
        k = math.ldexp(float(bins), -(int(self.exp) + signed))
        if bins & (bins - 1) == 0 and 1.0 <= k <= 2.0 ** 127:
            scaled = values.mul_(k) if owned else values * k
        else:
            scaled = values.double().mul_(k)
        index = scaled.floor_().to(torch.int32)
        if signed:
            index += bins // 2
        return torch.bincount(index.clamp_(0, bins - 1), minlength=bins)

    def _sync(self, group: Any) -> None:
        exp = int(_all_reduce(self.exp, dist.ReduceOp.MAX, group))
        signed = bool(_all_reduce(self.signed.long(), dist.ReduceOp.MAX, group))
        self._rebin(exp, signed)
        self._sync_buffers(group, mins=("min_val",), maxs=("max_val",), sums=("hist",))

    def _histogram(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Bin centers and counts between the first and last non-empty bin, and the index of the bin holding 0."""
        lo, hi = self._edges()
        bins = self.options["bins"]
        w = (hi - lo) / bins
        nonzero = torch.nonzero(self.hist).flatten()
        first, last = int(nonzero[0]), int(nonzero[-1]) + 1
        centers = lo + (torch.arange(first, last, dtype=torch.float64, device=self.hist.device) + 0.5) * w
        zero_bin = (bins // 2 if bool(self.signed) else 0) - first
        return centers, self.hist[first:last], zero_bin

    def _clamp_range(self, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` kept inside the exact observed range, as ``(1,)`` tensors."""
        lo_t = torch.maximum(torch.tensor([lo], dtype=torch.float64), self.min_val.double().cpu())
        hi_t = torch.minimum(torch.tensor([hi], dtype=torch.float64), self.max_val.double().cpu())
        return lo_t.to(self.min_val.device), hi_t.to(self.min_val.device)

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.hist.any()):
            return self.min_val, self.max_val
        return self._search()

    def _search(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PercentileObserver(HistogramObserverBase):
    """Clip at a percentile: ``max`` at the ``percentile``-th, ``min`` at the ``(100 - percentile)``-th.

    Read off the cumulative histogram with linear interpolation inside the bin —
    no sort of the data. The lower bound only moves for data with negative values (for ReLU outputs it is
    the minimum, 0). Option ``percentile`` (default 99.99).
    """

    name = "percentile"
    DEFAULTS = {**HistogramObserverBase.DEFAULTS, "percentile": 99.99}

    def _validate_options(self) -> None:
        super()._validate_options()
        if not 50.0 < self.options["percentile"] <= 100.0:
            raise QuantConfigError(f"percentile must be in (50, 100], got {self.options['percentile']}")

    def _search(self) -> tuple[torch.Tensor, torch.Tensor]:
        edge_lo, _ = self._edges()
        w = (self._edges()[1] - edge_lo) / self.options["bins"]
        cdf = torch.cumsum(self.hist, 0)
        total = float(cdf[-1])

        def quantile(fraction: float) -> float:
            target = fraction * total
            j = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype, device=cdf.device)).clamp(
                max=cdf.numel() - 1))
            below = float(cdf[j - 1]) if j > 0 else 0.0
            inside = (target - below) / float(self.hist[j]) if float(self.hist[j]) > 0 else 1.0
            return edge_lo + (j + min(max(inside, 0.0), 1.0)) * w

        p = self.options["percentile"] / 100.0
        lo = quantile(1.0 - p) if float(self.min_val.min()) < 0 else float(self.min_val.min())
        return self._clamp_range(lo, quantile(p))


def _range_errors(centers: torch.Tensor, counts: torch.Tensor, zero_bin: int, lo: torch.Tensor, hi: torch.Tensor,
                  spec: QuantSpec) -> torch.Tensor:
    """Estimated squared quantization error of the histogram for each candidate range ``(lo[k], hi[k])``.

    With ``scale``, ``zero_point`` from :func:`calculate_qparams` for the candidate, the representable range
    is ``[(qmin - zp) * scale, (qmax - zp) * scale]``. A bin's mass at center ``c`` outside it costs
    ``(c - bound)^2`` (clipping, exact per bin); a value inside costs the uniform rounding noise
    ``scale^2 / 12``, except the bin holding 0, which is exact on every grid (the spike of ReLU zeros would
    otherwise count as noise). With prefix sums of ``n``, ``n c``, ``n c^2`` each candidate costs O(1).
    """
    scale, zp = calculate_qparams(lo, hi, spec)
    s, z = scale.double(), zp.double()
    low, high = (spec.quant_min - z) * s, (spec.quant_max - z) * s
    zeros = counts.new_zeros(1)
    c0, c1, c2 = (torch.cat([zeros, torch.cumsum(counts * centers ** p, 0)]) for p in range(3))
    below = torch.searchsorted(centers, low)            # bins [0, below) lie under the lower bound
    above = torch.searchsorted(centers, high, right=True)  # bins [above, n) lie over the upper bound
    n = centers.numel()
    clip_low = c2[below] - 2 * low * c1[below] + low * low * c0[below]
    clip_high = (c2[n] - c2[above]) - 2 * high * (c1[n] - c1[above]) + high * high * (c0[n] - c0[above])
    inside = c0[above] - c0[below]
    if 0 <= zero_bin < n:
        inside = inside - torch.where((below <= zero_bin) & (zero_bin < above), counts[zero_bin], 0.0)
    return clip_low + clip_high + inside * s * s / 12.0


class MSEObserver(HistogramObserverBase):
    """Range that minimises the expected squared quantization error (the job of torch.ao's HistogramObserver).

    Candidates are fractions of the observed extremes: ``grid`` values on one axis when only one side needs
    choosing (``sym``, or data of one sign), else a 32 x 32 lattice over (lower, upper) refined once by a
    32 x 32 lattice around the best cell. Candidates are scored together by :func:`_range_errors`.
    Option ``grid`` (default 128): 1-D candidates.
    """

    name = "mse"
    DEFAULTS = {**HistogramObserverBase.DEFAULTS, "grid": 128}

    def _search(self) -> tuple[torch.Tensor, torch.Tensor]:
        centers, counts, zero_bin = self._histogram()
        mn, mx = float(self.min_val.min()), float(self.max_val.max())
        n = int(self.options["grid"])
        frac = torch.linspace(1.0 / n, 1.0, n, dtype=torch.float64, device=centers.device)
        if self.spec.scheme == "sym" or mn >= 0 or mx <= 0:
            amax = max(-mn, mx)
            lo = (-frac * amax) if mn < 0 else torch.full_like(frac, min(mn, 0.0))
            hi = (frac * amax) if mx > 0 else torch.full_like(frac, max(mx, 0.0))
        else:  # both sides free: a coarse lattice, then the same lattice over the best cell's neighbourhood
            fa = fb = torch.linspace(1.0 / 32, 1.0, 32, dtype=torch.float64)
            for _ in range(2):
                lo = (fa[:, None] * mn).expand(len(fa), len(fb)).reshape(-1)
                hi = (fb[None, :] * mx).expand(len(fa), len(fb)).reshape(-1)
                best = int(torch.argmin(_range_errors(centers, counts, zero_bin, lo, hi, self.spec)))
                a, b, step = float(lo[best]) / mn, float(hi[best]) / mx, float(fa[1] - fa[0])
                fa = torch.linspace(max(a - step, step / 32), min(a + step, 1.0), 32, dtype=torch.float64)
                fb = torch.linspace(max(b - step, step / 32), min(b + step, 1.0), 32, dtype=torch.float64)
            return self._clamp_range(float(lo[best]), float(hi[best]))
        best = int(torch.argmin(_range_errors(centers, counts, zero_bin, lo, hi, self.spec)))
        return self._clamp_range(float(lo[best]), float(hi[best]))


class ChannelMSEObserver(Observer):
    """``mse`` per channel, for weights: per output channel, the clipping range among ``grid`` fractions of
    the channel's extremes that minimises the exact squared quantization error of the tensor,

        f_c = argmin_f sum_i (w_ci - q(w_ci; f min_c, f max_c))^2,   range_c = (f_c min_c, f_c max_c)

    (both ends shrink by the same fraction; ``sym`` uses the larger magnitude). A weight is observed whole,
    once per qparams update (its quantizer resets the observer first), so the search runs on the tensor
    itself, not on a histogram; several observed tensors keep the last one's ranges. At 4 bits and below
    clipping a channel's few outlying weights buys a finer step for all the others (the ``minmax`` step is
    set by the single largest weight). Option ``grid`` (default 128): candidate fractions ``1/grid .. 1``.
    """

    name = "mse"
    DEFAULTS: ClassVar[dict[str, Any]] = {"grid": 128}
    #: Candidates quantized at once: bounds the temporary to ``chunk`` copies of the tensor.
    _CHUNK = 16

    def _validate_options(self) -> None:
        if not isinstance(self.options["grid"], int) or self.options["grid"] < 1:
            raise QuantConfigError(f"observer 'mse' option grid must be a positive integer, got {self.options['grid']!r}")

    def _init_state(self, device: torch.device) -> None:
        super()._init_state(device)
        self.register_buffer("best_min", torch.empty(0, device=device))
        self.register_buffer("best_max", torch.empty(0, device=device))

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_minmax(x)
        self._update_running_minmax(lo, hi)
        w = self._channels(x)
        n = int(self.options["grid"])
        fractions = torch.linspace(1.0 / n, 1.0, n, device=w.device)
        errors = []
        for part in fractions.split(self._CHUNK):
            f = part[:, None]                                   # (k, 1) x (C,) -> (k, C) candidate ranges
            scale, zp = calculate_qparams(f * lo, f * hi, self.spec)
            x = w.expand(len(part), *w.shape).reshape(-1, w.shape[1])  # one row per (candidate, channel)
            q = fake_quantize(x, scale.reshape(-1), zp.reshape(-1), self.spec.quant_min, self.spec.quant_max, 0)
            errors.append((q - x).square().sum(-1).reshape(len(part), -1))  # (k, C)
        best = fractions[torch.cat(errors).argmin(0)]
        self.best_min, self.best_max = best * lo, best * hi

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.best_min, self.best_max

    def _sync(self, group: Any) -> None:
        # weights are the same tensor on every rank, so every rank found the same ranges already
        self._sync_buffers(group, mins=("min_val", "best_min"), maxs=("max_val", "best_max"))


class EntropyObserver(HistogramObserverBase):
    """TensorRT's KL-divergence calibration (Migacz 2017): the threshold whose quantized distribution loses
    the least information.

    On the histogram of ``|x|`` (a signed histogram folds exactly around 0), for each candidate threshold
    ``t`` (in bins, from the number of levels ``L`` up to the last non-empty bin): ``P`` = bins below ``t``
    with everything above added to the last one; ``Q`` = the first ``t`` bins merged into ``L`` levels and
    spread back evenly over the non-empty bins. Pick ``argmin KL(P || Q)``, all candidates at once. The bin
    holding 0 is left out of both (zero is exact on every grid; ReLU's zeros would drag the threshold down).
    ``L`` is ``qmax - qmin`` for non-negative data with an affine scheme, ``(qmax - qmin) // 2`` otherwise
    (128 at 8 bits, as TensorRT). Range: ``[max(min, -T), min(max, T)]``. Option ``candidates`` (default
    128) caps the thresholds tried.
    """

    name = "entropy"
    DEFAULTS = {**HistogramObserverBase.DEFAULTS, "candidates": 128}

    def _search(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.options["bins"] // 2
        hist = self.hist[half:] + self.hist[:half].flip(0) if bool(self.signed) else self.hist
        lo_edge, hi_edge = self._edges()
        width = (hi_edge - lo_edge) / self.options["bins"]
        mn, mx = float(self.min_val.min()), float(self.max_val.max())
        one_sided = mn >= 0 and self.spec.scheme != "sym"
        levels = (self.spec.quant_max - self.spec.quant_min) // (1 if one_sided else 2)
        hist = hist.clone()
        hist[0] = 0.0  # the bin holding 0 is exact on every grid; ReLU's spike of zeros would bias KL low
        nonzero = torch.nonzero(hist).flatten()
        last = int(nonzero[-1]) + 1 if nonzero.numel() else 0
        if last <= levels:
            return self.min_val, self.max_val
        hist = hist[:last]
        step = max(1, -(-(last - levels) // int(self.options["candidates"])))
        t = torch.arange(last, levels - 1, -step, device=hist.device).flip(0)  # always includes ``last``
        best_t = int(t[int(torch.argmin(_kl_divergences(hist, t, levels)))])
        threshold = best_t * width
        return self._clamp_range(max(mn, -threshold), min(mx, threshold))


def _kl_divergences(hist: torch.Tensor, thresholds: torch.Tensor, levels: int) -> torch.Tensor:
    """``KL(P_t || Q_t)`` for every threshold ``t`` (see :class:`EntropyObserver`), shape ``(len(thresholds),)``.

    Level ``l`` of threshold ``t`` holds bins ``[ceil(l t / L), ceil((l + 1) t / L))``, so with prefix sums
    of ``h``, ``h log h`` and of the non-empty-bin indicator every level's mass and size is a difference:
    ``KL = sum_j p_j log p_j - sum_l P_l log q_l`` costs O(L) per threshold, not O(bins). Where ``P`` has mass
    and ``Q`` none (an outlier bin whose level was empty) ``q`` is floored at 1e-12, as TensorRT smooths.
    """
    h = hist.double()
    zero = h.new_zeros(1)
    ch = torch.cat([zero, torch.cumsum(h, 0)])
    cnz = torch.cat([zero, torch.cumsum((h > 0).double(), 0)])
    hlogh = torch.cat([zero, torch.cumsum(torch.xlogy(h, h), 0)])
    total = ch[-1]
    t = thresholds.long()
    tail = total - ch[t]  # mass above each threshold, added to P's last bin
    last = h[t - 1]
    ell = torch.arange(levels + 1, device=h.device)
    bounds = -torch.div(-ell[None, :] * t[:, None], levels, rounding_mode="floor")  # ceil(l t / L)
    sums = ch[bounds[:, 1:]] - ch[bounds[:, :-1]]  # Q's mass per level (without the tail)
    counts = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]  # non-empty P bins per level
    counts[:, -1] += ((last == 0) & (tail > 0)).double()
    p_mass = sums.clone()
    p_mass[:, -1] += tail
    q_total = torch.where(counts > 0, sums, 0.0).sum(1, keepdim=True)
    q = torch.where(counts > 0, sums / counts.clamp_min(1) / q_total.clamp_min(1e-300), 0.0).clamp_min(1e-12)
    p_log_p = (hlogh[t - 1] + torch.xlogy(last + tail, last + tail)) / total - torch.log(total)
    return p_log_p - torch.where(p_mass > 0, p_mass / total * torch.log(q), 0.0).sum(1)


#: Observer class per name (the names in :data:`lit_quant.quant.spec.OBSERVER_NAMES`).
OBSERVERS: dict[str, type[Observer]] = {cls.name: cls for cls in (
    MinMaxObserver, EMAMinMaxObserver, PercentileObserver, MSEObserver, EntropyObserver, NStdObserver,
    AvgMinMaxObserver)}
if set(OBSERVERS) != set(OBSERVER_NAMES):  # a real check: ``python -O`` strips asserts
    raise ImportError(f"observer classes {sorted(OBSERVERS)} do not match spec.OBSERVER_NAMES {sorted(OBSERVER_NAMES)}")


def build_observer(spec: QuantSpec) -> Observer:
    """The observer named by ``spec.observer``, with ``spec.observer_args`` as options (per-channel ``mse``:
    :class:`ChannelMSEObserver`)."""
    cls = ChannelMSEObserver if spec.per_channel and spec.observer == "mse" else OBSERVERS[spec.observer]
    return cls(spec, **spec.observer_options)
