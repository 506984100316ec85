"""The implementations compared. Each `fn(q, d, labels, label_index)` returns the scalar loss; every
one computes the same number for the cases it supports (the library's default scale, bias −log(N−1),
mean over queries).
"""
import importlib.util
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

import prcl
from prcl.backends import reference
from prcl.core.contract import DEFAULT_SCALE, default_bias
from prcl.core.ops import auto_backend
from prcl.tools.bench import first_line
from prcl.tools.bench.timing import LossFn

SCALE = DEFAULT_SCALE  # every implementation at the library's default: what a user of prcl gets

PEERS = ("open_clip", "siglip-kernel")  # optional packages: left out of the CLI table when absent


class Unsupported(Exception):
    """The implementation cannot run this case (label form, shape, device); the message says why."""


def resolved_backend(device: str | torch.device) -> str:
    return auto_backend(torch.device(device))


def prcl_loss(backend: str | None = None) -> LossFn:
    def fn(q, d, labels, label_index):
        return prcl.fused_pair_bce(q, d, labels, label_index=label_index, scale=SCALE, backend=backend)

    return fn


def reference_loss(q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor | None,
                   label_index: torch.Tensor | None) -> torch.Tensor:
    return reference.pair_bce(q, d, labels, label_index=label_index, scale=SCALE)


def compiled_reference() -> LossFn:
    """torch.compile of the eager reference. Compilation happens on the first call (on CPU it needs a
    C++ compiler), so callers treat an exception there as "n/a" with the reason."""
    # Every label form, mode and size is a recompile of the same function: the default limit (8)
    # was hit in one sweep, after which dynamo silently runs the eager code and the numbers lie.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(reference_loss)


def diagonal_square(name: str, q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor | None) -> None:
    if labels is not None or q.shape[0] != d.shape[0]:
        raise Unsupported(f"{name} takes diagonal labels on square batches only")


def open_clip_loss_module() -> ModuleType:
    try:
        import open_clip.loss as loss_module

        return loss_module
    except ImportError:
        pass
    # open_clip's package __init__ imports its image transforms and so torchvision, which PyPI's build
    # cannot load beside torch's CPU wheel ("operator torchvision::nms does not exist"). loss.py needs
    # torch alone: load that one file, without the package, to compare the loss wherever it installs.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open-clip-torch is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    loss_spec = importlib.util.spec_from_file_location("prcl_bench_open_clip_loss", path)
    loss_module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(loss_module)
    return loss_module


def open_clip_loss() -> LossFn:
    """open_clip's SigLipLoss (one process): −Σ logsigmoid(±z)/B with z = t·q·dᵀ + b, diagonal labels."""
    siglip = open_clip_loss_module().SigLipLoss()

    def fn(q, d, labels, label_index):
        diagonal_square("open_clip SigLipLoss", q, d, labels)
        return siglip(q, d, SCALE, default_bias(d.shape[0]))

    return fn


def siglip_kernel_loss() -> LossFn:
    """siglip-kernel's fused_siglip_loss(img, txt, log_temperature, bias) (looked up in its 0.1.2
    source): its router picks chunked cuBLAS + Triton for 16-bit inputs, a fused kernel for fp32."""
    if not torch.cuda.is_available():
        raise ImportError("siglip-kernel runs on CUDA only")
    from siglip_kernel import fused_siglip_loss

    def fn(q, d, labels, label_index):
        diagonal_square("siglip-kernel", q, d, labels)
        if q.device.type != "cuda":
            raise Unsupported("siglip-kernel runs on CUDA only")
        log_t = torch.tensor(math.log(SCALE), device=q.device)
        bias = torch.tensor(default_bias(d.shape[0]), device=q.device)
        return fused_siglip_loss(q, d, log_t, bias)

    return fn


class ThreeGemms(torch.autograd.Function):
    """The hardware floor: S = q·dᵀ forward, G·d and Gᵀ·q backward (G := S: the values do not matter
    for time). Its forward returns one element of S, so nothing else runs."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        S = q @ d.T
        ctx.save_for_backward(q, d, S)
        return S[0, 0].float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, d, S = ctx.saved_tensors
        return S @ d, S.T @ q


def gemm_floor() -> LossFn:
    def fn(q, d, labels, label_index):
        return ThreeGemms.apply(q, d)

    return fn


@dataclass
class Impl:
    name: str            # stable key: table rows, pytest ids, report lines
    factory: object      # () -> fn; raises ImportError/RuntimeError when not usable here
    bytes_per_pair: int  # rough peak per B·N pair, fwd+bwd, for skipping cases that cannot fit
    label: str = ""      # longer name for the CLI table

    def make(self) -> tuple[LossFn | None, str | None]:
        """(fn, None) or (None, reason it is not available)."""
        try:
            return self.factory(), None
        except Exception as e:  # noqa: BLE001 (an optional peer failing to import must not end a run)
            return None, f"{type(e).__name__}: {first_line(e)}"


def implementations(device: str | torch.device, compile_reference: bool = True, peers: bool = True,
                    floor: bool = False) -> list[Impl]:
    """[Impl] in table order: prcl on the auto backend (and, on CPU, the bounded-memory torch path
    when auto picked another), the eager reference, torch.compile of it, the optional peers, and the
    three-GEMM floor."""
    device = torch.device(device)
    auto = resolved_backend(device)
    # The eager reference keeps S, z, the dense label matrix, the per-pair loss and its masked copy
    # plus their gradients alive; the compiled one fuses the elementwise chain; open_clip keeps
    # logits, ±1 labels and their product. prcl's panels are a constant workspace.
    impls = [Impl("prcl", lambda: prcl_loss(None), 0, f"prcl ({auto})")]
    if device.type == "cpu" and auto != "torch":
        impls.append(Impl("prcl-torch", lambda: prcl_loss("torch"), 0, "prcl (torch)"))
    impls.append(Impl("eager", lambda: reference_loss, 24, "eager reference"))
    if compile_reference:
        impls.append(Impl("compiled", compiled_reference, 12, "torch.compile(reference)"))
    if peers:
        impls.append(Impl("open_clip", open_clip_loss, 20, "open_clip SigLipLoss"))
        impls.append(Impl("siglip-kernel", siglip_kernel_loss, 2, "siglip-kernel"))
    if floor:
        impls.append(Impl("gemm-floor", gemm_floor, 4, "3 GEMMs (floor)"))
    return impls


def implementation(name: str, device: str | torch.device, **kw: bool) -> Impl:
    kw = {"compile_reference": True, "peers": True, "floor": True, **kw}
    for impl in implementations(device, **kw):
        if impl.name == name:
            return impl
    raise ValueError(f"no implementation {name!r} on {device}")
