"""The attention an LLMEncoder runs: the backends it accepts, and one attention function it registers with
transformers for packed batches.

Packed batches (all texts in one row) attend within each text only. With the sdpa backend LLMEncoder
registers `SDPA_VARLEN`: transformers' sdpa for everything, except the packed calls LLMEncoder makes with a
varlen kernel, which run that kernel over the cumulative sequence lengths — torch's FlashAttention varlen
kernel on CUDA, no mask tensor at all. Where no kernel applies (CPU, fp32, an older torch or GPU) a packed
batch takes a (tokens × tokens) block-diagonal mask.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

ATTENTION_BACKENDS = ("sdpa", "flash_attention_2", "eager")
HALF_DTYPES = (torch.bfloat16, torch.float16)
# the transformers attention implementation that LLMEncoder gives an sdpa model: sdpa, plus the varlen path
SDPA_VARLEN = "prcl_sdpa_varlen"


def flash_attn_available() -> bool:
    """True when the flash-attn package imports (attn_implementation="flash_attention_2" needs it)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def torch_varlen_attn() -> Callable | None:
    """torch.nn.attention.varlen.varlen_attn, taking grouped-query heads (enable_gqa) on every torch that has it
    (torch 2.11's has no enable_gqa: key and value heads are repeated for it), else None. A FlashAttention
    kernel: CUDA only, fp16/bf16, Ampere or newer."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        return varlen_attn
    return functools.partial(_repeat_kv_heads, varlen_attn)


def _repeat_kv_heads(varlen_attn, q, k, v, *args, enable_gqa=False, **kwargs):
    """varlen_attn with grouped-query heads for a kernel without enable_gqa: query head h reads key/value head
    h // (query heads / key-value heads), as transformers' repeat_kv lays them out."""
    if enable_gqa:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, *args, **kwargs)


def _sdpa_or_varlen(module, query, key, value, attention_mask, *, dropout=0.0, scaling=None, varlen_attn=None,
                    cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """The SDPA_VARLEN attention function: transformers' sdpa, or — for a packed batch, when LLMEncoder passes
    a varlen kernel with the cumulative sequence lengths — that kernel, full attention within each sequence."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if varlen_attn is None:
        window = kwargs.get("sliding_window")
        if attention_mask is None and window is not None and key.shape[2] >= window:
            # SDPA_VARLEN builds no mask when none is given (a packed batch), so the window would be lost
            raise ValueError(f"{key.shape[2]} tokens without an attention_mask reach the model's sliding_window="
                             f"{window}: pass an attention_mask, from which the sliding-window mask is built")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"packed batches on the varlen kernel have no attention dropout, but the model's is "
                         f"{dropout}: set config.attention_dropout = 0 or use packed=False")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (1, heads, T, head_dim) -> (T, heads, head_dim)
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling,
                      enable_gqa=k.shape[1] != q.shape[1])
    return out[None], None


def _sdpa_mask_unless_packed(*, attention_mask=None, **kwargs):
    """The SDPA_VARLEN mask function: sdpa's, except that a call without a padding mask (a packed batch, whose
    boundaries travel as cumulative lengths) gets none — not even a (tokens × tokens) sliding-window mask."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)


def use_sdpa_varlen(model: torch.nn.Module) -> None:
    """Register SDPA_VARLEN with transformers and switch `model` to it."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(SDPA_VARLEN, _sdpa_or_varlen)
    AttentionMaskInterface.register(SDPA_VARLEN, _sdpa_mask_unless_packed)
    model.set_attn_implementation(SDPA_VARLEN)


def check_backend(attn_implementation: str) -> None:
    """ValueError unless `attn_implementation` is one of ATTENTION_BACKENDS and runs here."""
    if attn_implementation not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_BACKENDS}, got {attn_implementation!r}")
    if attn_implementation == "flash_attention_2" and not flash_attn_available():
        raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package, which does not "
                         "import here; use 'sdpa' (its flash kernel runs when the batch has no padding mask)")


def compute_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model on `device` with `dtype` weights computes in: autocast's where autocast is on there."""
    device_type = torch.device(device).type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype
