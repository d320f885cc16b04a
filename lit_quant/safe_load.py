"""Loading files that may come from elsewhere (checkpoints, CIFAR batches) without running code from them.

Both formats are pickles, and a pickle can name any importable callable and have the loader call it (a
``__reduce__`` returning ``(os.system, ("...",))``), so an unrestricted load of a downloaded or shared file
runs whatever its author chose. Every load here goes through an unpickler that builds only the data types the
format needs and refuses anything else with one line naming the file and the refused global:

* :func:`load_checkpoint` (``train.py --resume``, ``quantize.py --ckpt`` / ``--eval`` / ``--resume``, and
  Lightning's own ``fit(ckpt_path=...)`` / ``test(ckpt_path=...)`` through
  :class:`lit_quant.app.training.AtomicCheckpointIO`): ``torch.load(weights_only=True)``. The checkpoints
  lit-quant writes (Lightning's ``best.ckpt`` / ``last.ckpt`` of fp32 and QAT runs, with their optimizer,
  scheduler, callback, RNG and precision-plugin state; ``quantize.py``'s ``ptq-*.ckpt`` / ``qat-*.ckpt``) hold
  only tensors, plain containers and scalars, which torch's weights-only unpickler builds by default, so no
  further global is allowed (:data:`CHECKPOINT_GLOBALS` is empty).
* :func:`load_cifar_batch`: CIFAR-10/100's python batches, a dict of a ``uint8`` numpy array and lists; only
  the few numpy functions that rebuild an array are allowed (:data:`CIFAR_GLOBALS`).
"""

from __future__ import annotations

import codecs
import pickle
import re
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from lit_quant.errors import UserError

#: Globals allowed on top of torch's weights-only defaults when loading a checkpoint. Empty: every checkpoint
#: lit-quant and Lightning write loads without one (see the module docstring); an addition here must be a
#: class or function that cannot run code chosen by the file (no ``eval``, no imports, no file or process
#: access).
CHECKPOINT_GLOBALS: tuple[Any, ...] = ()

#: torch's weights-only unpickler names the global it refused in this form.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _refusal(what: str, name: str | Path, global_name: str) -> UserError:
    """The one-line error for a file that names a global outside the allow-list."""
    return UserError(f"{what} {name} holds code or Python objects lit-quant does not load (GLOBAL {global_name}): "
                     "refused, nothing in it was run")


def _first_line(text: str) -> str:
    """The first non-empty line of ``text`` (exception messages of torch and pickle span several)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load the torch checkpoint at ``path`` onto the CPU with torch's weights-only unpickler.

    ``what`` names the kind of file in the messages (``"checkpoint"``, ``"quantized checkpoint"``). Raises
    :class:`UserError` with one line when the file is missing, unreadable, damaged, or names a Python global
    outside torch's defaults and :data:`CHECKPOINT_GLOBALS` (the load stops before calling it). The result is
    whatever the file holds; callers check its keys.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            # torch warns on any pickle protocol but its own default; the unpickler's checks do not depend on it
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        refused = _REFUSED_GLOBAL.search(text)
        if refused:
            raise _refusal(what, path, refused.group(1)) from None
        # torch's own text leads with advice to load with weights_only=False, which is never ours to give:
        # its detail line is what matters
        if "WeightsUnpickler error:" not in text and "weights_only" in text:
            raise UserError(f"{what} {path} holds code or Python objects lit-quant does not load: refused, "
                            "nothing in it was run") from None
        detail = _first_line(text.split("WeightsUnpickler error:", 1)[-1])
        raise UserError(f"cannot read {what} {path}: {type(exc).__name__}: {detail}") from None
    except Exception as exc:  # torch.load raises many types for corrupt or truncated files
        raise UserError(f"cannot read {what} {path}: {type(exc).__name__}: {_first_line(str(exc))}") from exc


def _cifar_globals() -> dict[tuple[str, str], Any]:
    """``(module, name)`` -> object for every global a pickled numpy array may name, and nothing else.

    * ``numpy.ndarray`` and ``numpy.dtype``: the array's class and element type, rebuilt from plain values;
    * ``_reconstruct`` (``numpy.core.multiarray`` in numpy 1 and Python 2 pickles such as the original CIFAR
      files, ``numpy._core.multiarray`` in numpy 2): protocols 0-4 rebuild an empty array with it, then fill it
      from a byte string;
    * ``_frombuffer`` (``numpy.core.numeric`` / ``numpy._core.numeric``): protocol 5's array from a buffer;
    * ``_codecs.encode``: how protocols 0-2 in Python 3 write a ``bytes`` object (the array's data), as
      ``encode(text, "latin1")``; codecs only transform bytes and text.

    Both numpy spellings map to the installed numpy's functions, so numpy's deprecated ``numpy.core``
    package is never imported and no module the file names is imported at all.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


#: The globals :func:`load_cifar_batch` allows, as ``(module, name)`` pairs (see :func:`_cifar_globals`).
CIFAR_GLOBALS: dict[tuple[str, str], Any] = _cifar_globals()


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list; told apart from a damaged file's unpickling errors."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`CIFAR_GLOBALS`; dicts, lists, strings, bytes and numbers need
    no global. Any other global raises :class:`RefusedGlobal` naming it, before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for ``module.name``; :class:`RefusedGlobal` for anything else."""
        try:
            return CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def load_cifar_batch(fh_or_path: str | Path | IO[bytes]) -> dict[str, Any]:
    """Unpickle one CIFAR python batch (``data_batch_1``, ``test_batch``, CIFAR-100's ``train`` / ``test``).

    ``encoding="latin1"``, as torchvision: the original files are Python 2 pickles with byte-string keys.
    A global outside :data:`CIFAR_GLOBALS` raises :class:`UserError` with one line naming the file and the
    global, before anything is called. A damaged file's own errors (``EOFError``, ``pickle.UnpicklingError``
    ...) propagate unchanged, for the caller to report with its context. The result is what the file holds;
    callers check its keys.
    """
    if isinstance(fh_or_path, (str, Path)):
        with open(fh_or_path, "rb") as fh:
            return _load_cifar(fh, fh_or_path)
    return _load_cifar(fh_or_path, getattr(fh_or_path, "name", "<stream>"))


def _load_cifar(fh: IO[bytes], name: str | Path) -> dict[str, Any]:
    """:func:`load_cifar_batch` on an open binary file called ``name`` in messages."""
    try:
        return _CifarUnpickler(fh, encoding="latin1").load()
    except RefusedGlobal as exc:
        raise _refusal("CIFAR batch", name, str(exc)) from None
