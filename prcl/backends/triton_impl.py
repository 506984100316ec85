"""Launchers for kernels/pair_bce.py: the forward-only row sums and the panel gradient.

Forward only (2·B·N·D): one launch over the whole B×N, no workspace.
Gradient (6·B·N·D): per panel, one launch writes G = σ(z_ij) − y_ij in the input dtype, then the
two gradient GEMMs G·d and Gᵀ·q run on cuBLAS with float32 outputs; the workspace is one panel,
whatever B·N is. Or, for 16-bit inputs and D ≤ 128 on sm_90-class GPUs (`two_pass`), a row pass and
a column pass that accumulate G·d and Gᵀ·q in registers, G never in memory (docs/design.md,
"Two-pass gradient"). Nothing here reads a tensor value on the host.
"""
import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import numpy
import torch
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from prcl.backends import tuning
from prcl.backends.panels import finish_grads, panel_grads
from prcl.core.contract import triton_interpreting as interpreting


def _kernels() -> ModuleType:
    """kernels/pair_bce.py as prcl.kernels.pair_bce: installed there by a wheel or an editable install
    (pyproject.toml maps kernels/ into the package); a bare source tree (PYTHONPATH=.) has no such
    folder, and the file beside the package is loaded under the same name."""
    name = "prcl.kernels.pair_bce"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in ("prcl.kernels", name):
            raise
    path = Path(__file__).resolve().parents[2] / "kernels" / "pair_bce.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{name}: cannot load {path}")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_pair_bce = _kernels()
pair_pass_kernel, pair_tile_kernel = _pair_bce.pair_pass_kernel, _pair_bce.pair_tile_kernel

ALIGN = 16  # bytes: TMA needs 16-byte aligned bases and row strides
GRADIENT_DESIGNS = ("panels", "two-pass")
_forced_design: str | None = None  # set only by gradient_design()


@contextlib.contextmanager
def gradient_design(design: str | None) -> Iterator[None]:
    """Runs the Triton gradients of the calls inside the block with one design (docs/design.md,
    "Two-pass gradient"): "panels" (G panels and cuBLAS), "two-pass" (for D ≤ TWO_PASS_MAX_D; a larger
    D runs panels) or None (the launcher's choice, `two_pass`). For the tests and prcl.tools.gpu_check.
    Process-wide rather than per thread: a backward on CUDA runs in autograd's device thread, and
    must see the setting of the forward that recorded it."""
    global _forced_design
    if design is not None and design not in GRADIENT_DESIGNS:
        raise ValueError(f"design: expected None or one of {GRADIENT_DESIGNS}, got {design!r}")
    saved, _forced_design = _forced_design, design
    try:
        yield
    finally:
        _forced_design = saved


def _interpreter_index_shim() -> None:
    """Triton < 3.8's interpreter takes int() of a scalar's 1-element array (a loop bound such as
    range(first, last)), which numpy >= 2.4 refuses; like triton 3.8, squeeze it to 0-d first."""
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    # triton >= 3.6 passes a scope that undoes the patches after the launch
    def patched(tensor: Any, *scope: Any) -> None:
        patch_tensor(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patched


# triton's (major, minor) when its interpreter runs the kernels, else None: older interpreters need shims
_INTERPRETER = tuple(map(int, triton.__version__.split(".")[:2])) if interpreting() else None
if _INTERPRETER and _INTERPRETER < (3, 8):
    _interpreter_index_shim()


def _stride_multiple(x: Tensor) -> int:
    """Elements a row stride must be a multiple of: 16 bytes' worth; 16 elements in triton < 3.6's
    interpreter, which checks descriptor strides in elements rather than bytes."""
    return 16 if _INTERPRETER and _INTERPRETER < (3, 6) else ALIGN // x.element_size()


def check_interpreter() -> None:
    """Run both gradient designs' kernels once, tiny, in Triton's interpreter; a RuntimeError naming
    triton's and numpy's versions when this pairing cannot run them (prcl.tools.gpu_check --dry-run)."""
    q, d = torch.randn(20, 16), torch.randn(24, 16)
    t, b = torch.tensor(5.0), torch.tensor(-3.0)
    labels, label_index = torch.ones(20, 1), torch.arange(20)[:, None]  # the diagonal, listed
    try:
        for design in GRADIENT_DESIGNS:
            with gradient_design(design):
                grads(q, d, t, b, labels, label_index, None, t, True)
    except Exception as e:
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter cannot run prcl's kernels with numpy "
                           f"{numpy.__version__}: {type(e).__name__}: {e}") from e


def kernel_config(dtype: torch.dtype, write_g: bool, arch: int, D: int = 768) -> tuning.Config:
    """Tile sizes and launch settings for one launch (`python -m prcl compile-report` reads them too):
    prcl.backends.tuning's choice for (arch, dtype, gradient or forward, D bucket), made once per process."""
    return tuning.pick(arch, dtype, write_g, D)


def _launch_config(q: Tensor, write_g: bool) -> tuple[tuning.Config, int]:
    """(config, programs to aim for). The interpreter gets small tiles so that small test shapes
    still cross several row tiles, column tiles and splits."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1), 4
    major, minor = torch.cuda.get_device_capability(q.device)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return kernel_config(q.dtype, write_g, 10 * major + minor, q.shape[1]), 4 * sms


def _padded_zeros(like: Tensor, rows: int, cols: int) -> Tensor:
    """A (rows, cols) view of zeros whose row stride is padded to 16 bytes, as TMA needs.
    Zeros, not garbage: CPU bf16 GEMMs on such a padded view were seen to read the padding (NaN·0)."""
    per = _stride_multiple(like)
    return like.new_zeros(rows, triton.cdiv(cols, per) * per)[:, :cols]


def _aligned(x: Tensor) -> Tensor:
    """x itself when TMA can read it (rows apart, 16-byte strides and base), else an aligned copy."""
    per = _stride_multiple(x)
    if (x.stride(1) == 1 and x.stride(0) >= x.shape[1] and x.stride(0) % per == 0
            and x.data_ptr() % ALIGN == 0):
        return x
    padded = _padded_zeros(x, *x.shape)
    padded.copy_(x)
    return padded


def _on(device: torch.device) -> AbstractContextManager[Any]:
    """Triton launches on the current CUDA device, which need not be q's (DDP without set_device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _desc(x: Tensor, block: list[int]) -> TensorDescriptor:
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block)


def fp32_matmul_allows_tf32() -> bool:
    """Whether float32 matmuls may use TF32, read through the current API. On torch >= 2.9 reading
    the legacy `torch.backends.cuda.matmul.allow_tf32` raises once a user has set the new
    `fp32_precision` settings; "none" defers to the global `torch.backends.fp32_precision`."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = torch.backends.fp32_precision  # type: ignore[attr-defined]
    return precision == "tf32"


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's precision. 16-bit products are exact in any; float32 gets float32 products, as eager
    float32 matmul does, unless torch's matmul setting allows TF32."""
    return "tf32" if dtype != torch.float32 or fp32_matmul_allows_tf32() else "ieee"


def _label_args(y: Tensor, index: Tensor | None) -> tuple[Tensor, int, tuple[int, ...]]:
    """A kernel's listed-label arguments: the index tensor, K and its strides; for dense labels y
    stands in for the index (never read) with K = 0."""
    if index is None:
        return y, 0, (0, 0)
    return index, index.shape[1], index.stride()


def _launch(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, y: Tensor, index: Tensor | None, col0: int,
            w: Tensor | None, G: Tensor | None,
            threshold: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Runs the tile kernel over q (M, D) × d (N, D) with labels in the ops' layout (dense tile, or
    (M, K) lists matched against documents col0 + j) and the rows' false-negative thresholds (M,) or
    None. Returns (loss row sums (M,), Σ G∘S, Σ G)."""
    (M, D), N = q.shape, d.shape[0]
    write_g = G is not None
    cfg, programs = _launch_config(q, write_g)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    m_tiles, n_tiles = triton.cdiv(M, BM), triton.cdiv(N, BN)
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, max(1, programs // m_tiles)))
    split = triton.cdiv(n_tiles, tiles_per_split)
    rows = q.new_empty(split, M, dtype=torch.float32)
    stats = q.new_empty(m_tiles * split, 2, dtype=torch.float32) if write_g else rows
    listed, K, listed_strides = _label_args(y, index)
    pair_tile_kernel[(m_tiles, split)](
        _desc(q, [BM, BK]), _desc(d, [BN, BK]), _desc(G if G is not None else q, [BM, BN]),
        scale, bias, w if w is not None else rows, threshold if threshold is not None else rows, y,
        listed, rows, stats, M, N, D, K, col0, *y.stride(), *listed_strides, tiles_per_split,
        WRITE_G=write_g, HAS_W=w is not None, DENSE_Y=index is None, HAS_THR=threshold is not None,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, INTERPRET=interpreting(),
        MANY_LABELS=index is not None and K != 1, RAGGED_N=N % BN != 0,
        INPUT_PRECISION=input_precision(q.dtype),
        **cfg,
    )
    if not write_g:
        return rows.sum(0), None, None
    total = stats.sum(0)
    return rows.sum(0), total[0], total[1]


def rows(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
         threshold: Tensor | None = None) -> Tensor:
    with _on(q.device):
        return _launch(_aligned(q), _aligned(d), scale, bias, labels, label_index, 0, None, None, threshold)[0]


def two_pass(q: Tensor) -> bool:
    """Whether the gradient runs as two passes (no G in memory) rather than G panels and cuBLAS."""
    D = q.shape[1]
    if _forced_design is not None or interpreting():
        return _forced_design == "two-pass" and D <= tuning.TWO_PASS_MAX_D
    major, minor = torch.cuda.get_device_capability(q.device)
    return q.dtype != torch.float32 and tuning.gpu_class(10 * major + minor) == "sm90" and D <= tuning.TWO_PASS_CROSSOVER_D


def _pass(own: Tensor, streamed: Tensor, scale: Tensor, bias: Tensor, y: Tensor, index: Tensor | None,
          w: Tensor | None,          threshold: Tensor | None, row_pass: bool) -> tuple[Tensor, ...]:
    """One launch of pair_pass_kernel: own (O, D) against streamed (S, D), the queries being own in the
    row pass. Returns (Σ over streamed rows of G·streamed, (O, D) float32; and in the row pass the loss
    row sums (O,), Σ G∘S, Σ G)."""
    (O, D), S = own.shape, streamed.shape[0]
    if interpreting():
        cfg, programs = dict(BLOCK_O=16, BLOCK_S=16, num_warps=1, num_stages=1), 4
    else:
        cfg = tuning.two_pass_config(D)
        programs = 4 * torch.cuda.get_device_properties(own.device).multi_processor_count
    BO, BS = cfg["BLOCK_O"], cfg["BLOCK_S"]
    BD = max(16, triton.next_power_of_2(D))
    o_tiles, s_tiles = triton.cdiv(O, BO), triton.cdiv(S, BS)
    tiles_per_split = triton.cdiv(s_tiles, min(s_tiles, max(1, programs // o_tiles)))
    split = triton.cdiv(s_tiles, tiles_per_split)
    acc = own.new_empty(split, O, D, dtype=torch.float32)
    rows = own.new_empty(split, O, dtype=torch.float32) if row_pass else acc
    stats = own.new_empty(o_tiles * split, 2, dtype=torch.float32) if row_pass else acc
    listed, K, listed_strides = _label_args(y, index)
    pair_pass_kernel[(o_tiles, split)](
        _desc(own, [BO, BD]), _desc(streamed, [BS, BD]), scale, bias, w if w is not None else acc,
        threshold if threshold is not None else acc, y, listed, rows, stats, acc, O, S, D, K, *y.stride(),
        *listed_strides, tiles_per_split,
        BLOCK_D=BD, ROW_PASS=row_pass, HAS_W=w is not None, DENSE_Y=index is None, HAS_THR=threshold is not None,
        UPCAST=interpreting() and own.dtype == torch.bfloat16, INTERPRET=interpreting(),
        MANY_LABELS=index is not None and K != 1, RAGGED_S=S % BS != 0,
        INPUT_PRECISION=input_precision(own.dtype),
        **cfg,
    )
    if not row_pass:
        return (acc.sum(0),)
    total = stats.sum(0)
    return acc.sum(0), rows.sum(0), total[0], total[1]


def grads(q: Tensor, d: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, label_index: Tensor | None,
          w: Tensor | None, grad_scale: Tensor, rounded: bool,
          threshold: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row sums and the gradient pieces of Σ_i w_i Σ_j l_ij; see prcl.backends.panels."""
    q, d = _aligned(q), _aligned(d)
    out_dtype = q.dtype if rounded else None
    if two_pass(q):
        with _on(q.device):
            gd, rows, gs, g = _pass(q, d, scale, bias, labels, label_index, w, threshold, True)
            gq, = _pass(d, q, scale, bias, labels, label_index, w, threshold, False)
        return (rows, *finish_grads(gd, gq, grad_scale, out_dtype), gs, g)
    workspace: list[Tensor] = []

    def block(q_i: Tensor, d_j: Tensor, y: Tensor, index: Tensor | None, col: int, w_i: Tensor | None,
              thr_i: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not workspace:  # one panel of G, its row stride padded for TMA, reused by every panel
            workspace.append(_padded_zeros(q, q_i.shape[0], d_j.shape[0]))
        G = workspace[0][: q_i.shape[0], : d_j.shape[0]]
        rows, gs, g = _launch(q_i, d_j, scale, bias, y, index, col, w_i, G, thr_i)
        return rows, G, cast(Tensor, gs), cast(Tensor, g)  # a launch that writes G returns its sums

    with _on(q.device):
        return panel_grads(q, d, labels, label_index, w, block, tuning.TRITON_PANEL_ELEMS, grad_scale, out_dtype,
                           threshold)
