"""The native CPU kernel (kernels/pair_bce_cpu.cpp, built by CMakeLists.txt into prcl/libprcl_cpu.so).

    rows(q, d, t, b, Y)     = [Σ_j l_ij]_i,  l = softplus(z) − y·z                          (B,) float32
    grads(q, d, t, b, Y, w, c, rounded) = rows, c·G·d, c·Gᵀ·q, Σ G∘S, Σ G  with G_ij = w_i (σ(z_ij) − y_ij)
                            (prcl.backends.panels; c·G·d and c·Gᵀ·q in q's dtype when rounded, else float32)

The same backend interface as prcl.backends.torch_impl (labels Y in the layout of prcl.core.ops), served by the C++
ops `prcl::native_loss_rows` and `prcl::native_loss_grads`: one fused, tiled, multi-threaded pass
that never allocates B×N.
float64 inputs (gradcheck through the ops) go to the PyTorch twin; the C++ kernel computes in float32.

The library is loaded when this module is first imported, from the package directory. When it is
missing (the build skipped it: prcl_cpu.not_built says why), was built against another torch, or fails
to load, `available()` is False, `status()` says why, one log message says so, and prcl runs its PyTorch
path instead; with PRCL_REQUIRE_NATIVE=1 that first import raises RuntimeError instead, naming why.

Environment:
    PRCL_NATIVE=0        never load the library (tests of the fallback; debugging)
    PRCL_REQUIRE_NATIVE=1   an unavailable library is an error, not a fallback (CI)
    PRCL_NATIVE_LIB=path load this file instead of searching the package directory
    PRCL_NATIVE_ISA=avx2|base    cap the instruction set of the kernel's vectorised epilogue
    PRCL_NATIVE_TILES=TM,TN[,TN_MIN]   tile shape override, for tuning
"""
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from prcl.backends import torch_impl

_log = logging.getLogger(__name__)
_LIB_GLOBS = ("libprcl_cpu*.so", "libprcl_cpu*.dylib", "prcl_cpu*.dll")
_VERSION_FILE = "prcl_cpu.torch_version"
_NOT_BUILT_FILE = "prcl_cpu.not_built"  # written by CMakeLists.txt when it skips the kernel


def _search_dirs() -> list[Path]:
    # CMakeLists.txt installs the library into prcl/; an editable install may keep built files apart
    # from the sources: the package path lists both
    import prcl

    dirs = [Path(__file__).resolve().parents[1]] + [Path(p).resolve() for p in getattr(prcl, "__path__", ())]
    return list(dict.fromkeys(dirs))


def _find_library() -> Path | None:
    if os.environ.get("PRCL_NATIVE_LIB"):
        return Path(os.environ["PRCL_NATIVE_LIB"])
    for directory in _search_dirs():
        for pattern in _LIB_GLOBS:
            found = sorted(directory.glob(pattern))
            if found:
                return found[0]
    return None


def _built_against(lib: Path) -> str | None:
    stamp = lib.parent / _VERSION_FILE
    return stamp.read_text().strip() if stamp.is_file() else None


def _try_load() -> tuple[bool, str, int]:
    if os.environ.get("PRCL_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return False, "disabled by PRCL_NATIVE=0", logging.INFO
    lib = _find_library()
    if lib is None:
        skipped = [d / _NOT_BUILT_FILE for d in _search_dirs() if (d / _NOT_BUILT_FILE).is_file()]
        why = (f"the build skipped it: {skipped[0].read_text().strip()}" if skipped
               else "build it with `pip install --no-build-isolation -e .`")
        return False, f"libprcl_cpu not found in {', '.join(map(str, _search_dirs()))} ({why})", logging.WARNING
    built = _built_against(lib)
    if built is not None and built != torch.__version__:
        # a library built against another torch may load and then crash: refuse it up front
        return False, f"{lib} was built against torch {built}, running {torch.__version__}", logging.WARNING
    try:
        torch.ops.load_library(str(lib))
        info = torch.ops.prcl.native_info()
        _register_fakes()
    except (OSError, RuntimeError, AttributeError) as err:
        return False, f"{lib} failed to load: {err}", logging.WARNING
    return True, f"loaded from {lib} ({info})", logging.DEBUG


def _load() -> tuple[bool, str]:
    loaded, message, level = _try_load()
    if not loaded and os.environ.get("PRCL_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"PRCL_REQUIRE_NATIVE=1 but the native CPU kernel is unavailable: {message}")
    if not loaded:
        _log.log(level, "prcl: native CPU kernel unavailable, using the PyTorch path: %s", message)
    return loaded, message


def available() -> bool:
    """True when the native library is built, matches this torch and loaded."""
    return _state[0]


def status() -> str:
    """Where the native library was loaded from (and its ISA, tiles, threads), or why it was not."""
    return _state[1]


def _require() -> None:
    loaded, message = _state
    if not loaded:
        raise RuntimeError(f"prcl native CPU kernel unavailable: {message}")


def rows(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
         threshold: Tensor | None = None) -> Tensor:
    if q.dtype == torch.float64:
        return torch_impl.rows(q, d, scale, bias, labels, label_index, threshold)
    _require()
    return torch.ops.prcl.native_loss_rows(q, d, scale, bias, labels, label_index, *_given(threshold))


def grads(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
          w: Tensor | None, grad_scale: Tensor, rounded: bool,
          threshold: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row sums and the gradient pieces of Σ_i w_i Σ_j l_ij; see prcl.backends.panels."""
    if q.dtype == torch.float64:
        return torch_impl.grads(q, d, scale, bias, labels, label_index, w, grad_scale, rounded, threshold)
    _require()
    return torch.ops.prcl.native_loss_grads(q, d, scale, bias, labels, label_index, w, grad_scale, rounded,
                                            *_given(threshold))


def _given(threshold: Tensor | None) -> tuple[Tensor, ...]:
    # passed only when set, so that a library built before the false-negative mask serves other calls
    return () if threshold is None else (threshold,)


def _register_fakes() -> None:
    # shapes for torch.compile / FakeTensor (opcheck): the C++ library registers only CPU kernels
    f32 = torch.float32

    @torch.library.register_fake("prcl::native_loss_rows")
    def _(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
          threshold: Tensor | None = None) -> Tensor:
        return q.new_empty(q.shape[0], dtype=f32)

    @torch.library.register_fake("prcl::native_loss_grads")
    def _(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
          w: Tensor | None, grad_scale: Tensor | None = None, rounded: bool = False,
          threshold: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (q.new_empty(q.shape[0], dtype=f32), q.new_empty(q.shape, dtype=q.dtype if rounded else f32),
                d.new_empty(d.shape, dtype=d.dtype if rounded else f32), q.new_empty((), dtype=f32),
                q.new_empty((), dtype=f32))


# Loaded once, when this module is first imported (the backend choice imports it on a loss's first
# call): Python's import lock keeps threads from loading it twice, and torch.compile runs the import
# of a module that a traced function imports without tracing it, so a compiled step that is the
# process's first prcl call sees only the result.
_state = _load()  # (loaded, human-readable status)
