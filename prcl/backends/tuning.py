"""Tile configurations for the pair kernel and the panel shape, chosen without a GPU where possible.

`candidates(arch, dtype, grad, D)` is a short list per (GPU class, dtype, gradient or forward, D
bucket), best guess first; `pick` returns the first (no GPU timing available), or times every
candidate once on the caller's real shapes and keeps the fastest. Either way the choice is cached
for the process per (arch, dtype, grad, D bucket): every later call runs the same tiles, so results
stay bitwise reproducible within a process. Timing synchronises once per key: pick during a warm-up
step, not inside CUDA-graph capture.

GPU classes: sm_80 (164 KB shared memory per SM), datacenter Hopper/Blackwell (sm_90, sm_100: 228 KB,
wgmma/tcgen05 and TMA), and consumer parts with ~100 KB (sm_86, sm_89, sm_120, sm_121), which get
smaller, shallower tiles. Every candidate's shared-memory estimate (`shared_bytes`) fits its class.
"""
import math
from collections.abc import Callable

import torch

Config = dict[str, int]  # a launch's tile sizes, num_warps and num_stages

CONSUMER = frozenset({86, 89, 120, 121})
# Largest dynamic shared memory per block, bytes
MAX_SHARED = {"sm80": 163 * 1024, "sm90": 227 * 1024, "consumer": 99 * 1024}
D_BUCKETS = (64, 256, 1024)  # D ≤ 64, ≤ 256, ≤ 1024, and larger


def _cfg(m: int, n: int, k: int, warps: int, stages: int) -> Config:
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages)


# (class, 16-bit or fp32, grad) -> candidates for 64 < D ≤ 1024; `candidates` adjusts K and stages for
# the other D buckets
_TABLE = {
    ("sm90", "16", False): [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4)],
    ("sm90", "16", True): [_cfg(128, 64, 64, 8, 3), _cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 3)],
    ("sm90", "32", False): [_cfg(64, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 3)],
    ("sm90", "32", True): [_cfg(64, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 3)],
    ("sm80", "16", False): [_cfg(64, 64, 64, 8, 3), _cfg(128, 64, 32, 8, 3), _cfg(64, 64, 64, 4, 3)],
    ("sm80", "16", True): [_cfg(64, 64, 64, 8, 3), _cfg(64, 64, 64, 4, 3)],
    ("sm80", "32", False): [_cfg(64, 64, 16, 8, 3), _cfg(64, 64, 16, 4, 3)],
    ("sm80", "32", True): [_cfg(64, 64, 16, 8, 3), _cfg(64, 64, 16, 4, 3)],
    ("consumer", "16", False): [_cfg(64, 64, 64, 4, 3), _cfg(64, 64, 32, 4, 2)],
    ("consumer", "16", True): [_cfg(64, 64, 64, 4, 2), _cfg(64, 64, 32, 4, 2)],
    ("consumer", "32", False): [_cfg(64, 64, 16, 4, 2)],
    ("consumer", "32", True): [_cfg(64, 64, 16, 4, 2)],
}


# The two-pass gradient (docs/design.md, "Two-pass gradient"): its BLOCK_O × D float32 accumulator
# lives in registers, so D ≤ TWO_PASS_MAX_D; the launcher chooses it for 16-bit inputs on sm_90-class
# GPUs at D ≤ TWO_PASS_CROSSOVER_D. Timed on an H200 (gpu_check, B = N = 65536, bf16 fwd+bwd) it took
# 10.4 / 12.4 / 18.9 ms against the panels' 16.9 / 17.7 / 27.0 ms at D = 64 / 128 / 256, a win up to its
# limit (256); the crossover stays 0 until the GPU check's correctness section has passed with it on a
# GPU (so far only the interpreter has checked it). 4 warps: ≥ 2 blocks per SM at every D.
TWO_PASS_MAX_D = 256
TWO_PASS_CROSSOVER_D = 0
_TWO_PASS = dict(BLOCK_O=64, BLOCK_S=64, num_warps=4, num_stages=2)


def two_pass_config(D: int) -> Config:
    """Tiles of the two-pass kernels for D ≤ TWO_PASS_MAX_D (a fresh dict)."""
    if D > TWO_PASS_MAX_D:
        raise ValueError(f"D: the two-pass gradient holds D ≤ {TWO_PASS_MAX_D} in registers, got {D}")
    return dict(_TWO_PASS)


def gpu_class(arch: int) -> str:
    """"sm80", "sm90" (datacenter Hopper/Blackwell) or "consumer" (~100 KB shared memory)."""
    if not isinstance(arch, int) or arch < 80:
        raise ValueError(f"arch: the kernel needs sm_80 or newer as an int like 90, got {arch!r}")
    if arch in CONSUMER:
        return "consumer"
    return "sm90" if arch >= 90 else "sm80"


def d_bucket(D: int) -> float:
    if D < 1:
        raise ValueError(f"D: expected a positive embedding width, got {D}")
    return next((b for b in D_BUCKETS if D <= b), math.inf)


def shared_bytes(cfg: Config, dtype: torch.dtype, grad: bool) -> int:
    """Upper estimate of the kernel's shared memory: the pipelined q and d tiles, and the staged G tile."""
    size = torch.empty((), dtype=dtype).element_size()
    tiles = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * size
    return tiles + (cfg["BLOCK_M"] * cfg["BLOCK_N"] * size if grad else 0)


def candidates(arch: int, dtype: torch.dtype, grad: bool, D: int) -> list[Config]:
    """Tile configurations to try, best guess first (a list of fresh dicts)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    bucket = d_bucket(D)
    out = []
    for cfg in _TABLE[gpu_class(arch), "32" if dtype == torch.float32 else "16", bool(grad)]:
        cfg = dict(cfg)
        if bucket <= 64:  # one or two K steps: a deep pipeline only holds idle buffers
            cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 64)
            cfg["num_stages"] = min(cfg["num_stages"], 2)
        elif bucket == math.inf:  # many K steps: one stage deeper hides more load latency, where it fits
            deeper = dict(cfg, num_stages=cfg["num_stages"] + 1)
            if shared_bytes(deeper, dtype, grad) <= MAX_SHARED[gpu_class(arch)]:
                cfg = deeper
        if cfg not in out:
            out.append(cfg)
    return out


_picked: dict[tuple[int, torch.dtype, bool, float], Config] = {}


def pick(arch: int, dtype: torch.dtype, grad: bool, D: int,
         measure: Callable[[Config], float] | None = None) -> Config:
    """The tile configuration for this key, chosen once per process.

    measure(cfg) -> time of one run with cfg on the real inputs; None: no timing,
    the first candidate. Ties go to the earlier candidate."""
    key = (arch, dtype, bool(grad), d_bucket(D))
    if key not in _picked:
        options = candidates(arch, dtype, grad, D)
        _picked[key] = options[0] if measure is None or len(options) == 1 else min(options, key=measure)
    return dict(_picked[key])


# Elements of one panel of the pair matrix, per backend. The PyTorch twin's float32 S and G panels:
# 4 MiB each, a few alive at a time. The Triton gradient's G workspace: 128 MiB of bf16, panels of
# 8192 × 8192, large enough to keep the two gradient GEMMs on it efficient.
TORCH_PANEL_ELEMS = 1 << 20
TRITON_PANEL_ELEMS = 1 << 26


def panel_shape(B: int, N: int, panel_elems: int) -> tuple[int, int]:
    """(rows, cols) of a G panel of at most P = panel_elems: rows = min(B, √P), cols = min(N, P / rows),
    so a short B gets wide panels (B = 512, N = 65536 is one panel, not eight thin ones); then rows
    grow to min(B, P / cols), so a short N gets tall ones."""
    if panel_elems < 1:
        raise ValueError(f"panel_elems: expected ≥ 1, got {panel_elems}")
    rows = max(1, min(B, math.isqrt(panel_elems)))
    cols = max(1, min(N, panel_elems // rows))
    return max(1, min(B, panel_elems // cols)), cols
