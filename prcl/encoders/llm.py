"""LLMEncoder: a transformers decoder LLM as a bidirectional text encoder.

    emb = normalize(Σ_t w_t · h_t),   h = model(instruction ⊕ text) with full (non-causal) attention,
    w = pooling weights over the text tokens only (the instruction's tokens attend and are attended, never pooled)

Bidirectionality goes through transformers' own switch: `merge_with_config_defaults` on the base model's
forward reads `config.is_causal` on every call, hands `is_causal=False` to the attention functions (sdpa,
flash-attention, eager) and makes `create_causal_mask` build the bidirectional mask. Setting it on the
loaded config is all it takes: passing `is_causal=False` to `from_pretrained`/`AutoConfig` is silently
dropped, and the attention modules' own `self.is_causal = True` is overridden by the kwarg. How packed
batches attend: prcl.encoders.attention.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from prcl.encoders.attention import (
    HALF_DTYPES,
    SDPA_VARLEN,
    check_backend,
    compute_dtype,
    torch_varlen_attn,
    use_sdpa_varlen,
)
from prcl.encoders.models import BIDIRECTIONAL_MODEL_TYPES, load_pretrained
from prcl.files import regular_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "last", "weighted_mean")
# one text's tokens: (token ids, number of leading instruction tokens)
Sequence = tuple[list[int], int]


def check_pooling(pooling: str) -> None:
    """ValueError naming `pooling` unless it is one of POOLINGS (the CLIs ask before loading a model)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")


@contextlib.contextmanager
def _quiet_peft():
    """peft's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning
    in every run that is not ours to fix, so that one message is silenced around peft's wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def instruction_prefix(instruction: str) -> str:
    """The text put before every text for `instruction` (a space joins them unless it ends in whitespace)."""
    return instruction if instruction[-1].isspace() else instruction + " "


def _pool_weights(n_tokens: int, n_instruction: int, pooling: str) -> torch.Tensor:
    """(n_tokens,) float32 weights over one sequence; zero on the instruction's tokens."""
    w = torch.zeros(n_tokens)
    n_text = n_tokens - n_instruction
    if pooling == "mean":
        w[n_instruction:] = 1.0 / n_text
    elif pooling == "last":
        w[-1] = 1.0
    else:  # weighted_mean (SGPT): later text tokens have seen more of the text in a causal model; weight ∝ rank
        ranks = torch.arange(1, n_text + 1, dtype=torch.float32)
        w[n_instruction:] = ranks / ranks.sum()
    return w


class LLMEncoder:
    """A transformers decoder LLM (Llama, Mistral, Qwen2/3, Gemma; base model or *ForCausalLM) as a
    bidirectional text encoder.

    `.model` is the module that runs (the base model, a peft model after `add_lora`); `.tokenizer` a
    fast tokenizer (offsets locate the instruction). Embeddings are pooled and L2-normalised (unless
    normalize=False) in float32; `encode` returns them in float32, `embed` in the model's compute dtype
    (see `embed`). An instruction is joined to each text with a space unless it ends in whitespace.
    A text without a single token (e.g. "" with a tokenizer that adds no BOS) is a ValueError naming its
    position: there is nothing to pool.

    varlen_attn: the kernel for packed batches under the sdpa backend, with the signature of
    torch.nn.attention.varlen.varlen_attn. None: torch's own, where it runs (CUDA, fp16/bf16 weights or
    autocast, Ampere or newer); elsewhere packed batches take a block-diagonal mask. Given, it runs every
    packed batch on any device (tests pass a per-sequence sdpa to run the varlen wiring on CPU).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, pooling: str = "mean", max_length: int = 512,
                 normalize: bool = True, attn_implementation: str | None = None, gradient_checkpointing: bool = False,
                 varlen_attn: Callable | None = None) -> None:
        if hasattr(model, "peft_config"):
            raise ValueError("model is already a peft model: pass the plain transformers model, then use "
                             "add_lora() or load_adapter()")
        model_type = getattr(model.config, "model_type", None)
        if model_type not in BIDIRECTIONAL_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} cannot be made bidirectional through config.is_causal "
                             f"in this transformers version; supported: {BIDIRECTIONAL_MODEL_TYPES}")
        check_pooling(pooling)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer must be a fast tokenizer (offset mapping locates the instruction's "
                             f"tokens), got {type(tokenizer).__name__}")
        model = model.base_model  # *ForCausalLM -> its decoder; a base model returns itself
        if attn_implementation is not None:
            check_backend(attn_implementation)
            model.set_attn_implementation(attn_implementation)
        backend = model.config._attn_implementation
        backend = "sdpa" if backend == SDPA_VARLEN else backend  # a model that an LLMEncoder held before
        check_backend(backend)
        if varlen_attn is not None and backend != "sdpa":
            raise ValueError(f"varlen_attn runs under the sdpa attention backend, not {backend!r}")
        if backend == "sdpa":
            use_sdpa_varlen(model)
        model.config.is_causal = False
        self.model, self.tokenizer, self.varlen_attn = model, tokenizer, varlen_attn
        self.pooling, self.max_length, self.normalize = pooling, max_length, normalize
        self._warned_truncation = False
        if gradient_checkpointing:
            # non-reentrant: reentrant checkpointing drops LoRA grads when the inputs (token ids) need none
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None,
                        gguf_file: str | None = None, pooling: str = "mean", max_length: int = 512,
                        normalize: bool = True, gradient_checkpointing: bool = False,
                        varlen_attn: Callable | None = None, **model_kwargs: Any) -> LLMEncoder:
        """Load a local checkpoint (a directory, or a .gguf file / `gguf_file=` inside `path`).

        Example:
            enc = LLMEncoder.from_pretrained(prcl.encoders.smollm2_gguf(), dtype=torch.bfloat16)
        """
        check_backend(attn_implementation)
        model, tokenizer = load_pretrained(path, attn_implementation=attn_implementation, dtype=dtype,
                                           gguf_file=gguf_file, **model_kwargs)
        return cls(model, tokenizer, pooling=pooling, max_length=max_length, normalize=normalize,
                   gradient_checkpointing=gradient_checkpointing, varlen_attn=varlen_attn)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def packed_attention(self) -> str:
        """How a packed batch attends, here and now (device, dtype, autocast): "varlen" (varlen_attn over the
        cumulative sequence lengths), "flash_attention_2" (the flash-attn package's varlen kernel), or
        "block mask" (sdpa/eager with a (tokens × tokens) block-diagonal mask)."""
        backend = self.model.config._attn_implementation
        if backend == "flash_attention_2":
            return backend
        return "varlen" if backend == SDPA_VARLEN and self._varlen_kernel() is not None else "block mask"

    def _varlen_kernel(self):
        if self.varlen_attn is not None:
            return self.varlen_attn
        dev = self.device  # torch's kernel is FlashAttention's: CUDA, 16-bit, Ampere or newer
        if (dev.type == "cuda" and self._compute_dtype() in HALF_DTYPES
                and torch.cuda.get_device_capability(dev) >= (8, 0)):
            return torch_varlen_attn()
        return None

    def _compute_dtype(self):
        return compute_dtype(self.device, self.model.get_input_embeddings().weight.dtype)

    @property
    def has_lora(self) -> bool:
        """True when the model carries a LoRA adapter (add_lora or load_adapter)."""
        return self._is_peft()

    # ---- tokens ------------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str], instruction: str | None = None) -> list[Sequence]:
        """[(token ids, number of leading instruction tokens)] per text, truncated to max_length."""
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError(f"instruction must be a str or None, got {type(instruction).__name__}")
        prefix = instruction_prefix(instruction) if instruction else ""
        enc = self.tokenizer([prefix + t for t in texts], add_special_tokens=True, truncation=False,
                             return_offsets_mapping=True, return_special_tokens_mask=True)
        out, truncated = [], False
        for i, (ids, offsets, special) in enumerate(zip(enc["input_ids"], enc["offset_mapping"],
                                                       enc["special_tokens_mask"])):
            if not ids:
                raise ValueError(f"texts[{i}] = {texts[i]!r:.40} has no tokens (the tokenizer adds no special "
                                 f"tokens to it), so there is nothing to pool: remove it")
            # the instruction ends at the first non-special token reaching into the text: a token that
            # straddles the boundary is text (byte-level BPE puts the joining space into the text's first
            # token, "Ġopen", offsets included); a leading BOS counts as instruction
            n_inst = 0
            if prefix:
                n_inst = next((i for i, ((_, e), sp) in enumerate(zip(offsets, special))
                               if not sp and e > len(prefix)), len(ids))
                if n_inst >= self.max_length:
                    raise ValueError(f"instruction takes {n_inst} tokens, leaving none of max_length="
                                     f"{self.max_length} for the text")
            if len(ids) > self.max_length:
                ids, truncated = ids[: self.max_length], True
            if len(ids) == n_inst:  # empty text after an instruction: pool the instruction rather than nothing
                n_inst = 0
            out.append((ids, n_inst))
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning("texts longer than max_length=%d tokens are truncated (said once per encoder)",
                           self.max_length)
        return out

    # ---- forward -----------------------------------------------------------------------------------------

    def _pad_id(self):
        tok = self.tokenizer
        return next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    def _forward_padded(self, seqs):
        """seqs: [(ids, n_inst)] -> (B, H) pooled hidden states, float32, not normalised."""
        lengths = [len(ids) for ids, _ in seqs]
        B, L = len(seqs), max(lengths)
        input_ids = torch.full((B, L), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        weights = torch.zeros(B, L)
        left = self.tokenizer.padding_side == "left"
        for b, ((ids, n_inst), n) in enumerate(zip(seqs, lengths)):
            cols = slice(L - n, L) if left else slice(0, n)
            input_ids[b, cols] = torch.tensor(ids)
            mask[b, cols] = 1
            weights[b, cols] = _pool_weights(n, n_inst, self.pooling)
        # positions count real tokens only, as in a packed row or a batch of one, whatever the padding side
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        dev = self.device
        hidden = self.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev),
                            position_ids=position_ids.to(dev), use_cache=False).last_hidden_state
        with torch.autocast(dev.type, enabled=False):  # pool in float32, autocast or not
            return torch.einsum("bl,blh->bh", weights.to(dev), hidden.float())

    def _forward_packed(self, seqs):
        """All of seqs in one row: per-sequence positions, attention confined to each sequence's block."""
        lengths = torch.tensor([len(ids) for ids, _ in seqs])
        T, dev = int(lengths.sum()), self.device
        input_ids = torch.tensor([i for ids, _ in seqs for i in ids], device=dev)[None]
        seq_of = torch.repeat_interleave(torch.arange(len(seqs)), lengths)  # (T,) which sequence owns a token
        starts = torch.cumsum(lengths, 0) - lengths
        position_ids = (torch.arange(T) - starts[seq_of])[None].to(dev)
        weights = torch.zeros(len(seqs), T)
        for b, ((ids, n_inst), s) in enumerate(zip(seqs, starts.tolist())):
            weights[b, s: s + len(ids)] = _pool_weights(len(ids), n_inst, self.pooling)
        window = getattr(self.model.config, "sliding_window", None)
        if window is not None and int(lengths.max()) > window:
            raise ValueError(f"packed=True attends without the model's sliding_window={window}, "
                             f"but a sequence has {int(lengths.max())} tokens; use packed=False")
        kwargs, path = {}, self.packed_attention
        if path != "block mask":
            # a varlen kernel: sequence boundaries as cumulative lengths, no mask tensor at all
            cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(dev, torch.int32)
            n_max = int(lengths.max())
            kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n_max, max_length_k=n_max)
            if path == "varlen":
                kwargs["varlen_attn"] = self._varlen_kernel()
            attention_mask = None
        else:
            # transformers' bidirectional mask ignores position_ids, so packed sequences would see each
            # other; a 4-D mask is passed to the attention function as-is
            same = (seq_of[:, None] == seq_of[None, :]).to(dev)[None, None]  # (1, 1, T, T)
            if self.model.config._attn_implementation == "eager":  # eager adds the mask to the scores
                dtype = self.model.get_input_embeddings().weight.dtype
                attention_mask = torch.zeros(same.shape, dtype=dtype, device=dev)
                attention_mask.masked_fill_(~same, torch.finfo(dtype).min)
            else:
                attention_mask = same  # sdpa's boolean mask: True attends
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False, **kwargs).last_hidden_state
        with torch.autocast(dev.type, enabled=False):  # pool in float32, autocast or not
            return weights.to(dev) @ hidden[0].float()

    def _embed_tokens(self, seqs, packed, max_tokens=None):
        if packed:
            pooled = torch.cat([self._forward_packed(part) for part in pack_by_tokens(seqs, max_tokens)])
        else:
            pooled = self._forward_padded(seqs)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    # ---- public ------------------------------------------------------------------------------------------

    def embed(self, texts: Iterable[str], instruction: str | None = None, *, packed: bool = False,
              max_tokens: int | None = None) -> torch.Tensor:
        """(len(texts), hidden) embeddings with autograd into the model: one forward for the batch, in the
        model's current mode (call `.model.train()` for LoRA dropout and gradient checkpointing).
        packed=True with max_tokens: one packed forward per run of consecutive texts of at most max_tokens
        tokens in all (a longer text alone), which bounds a block mask's (tokens × tokens) size.

        Pooled and normalised in float32, then returned in the model's compute dtype when that is bf16/fp16
        (16-bit weights, or autocast) — the loss takes them as they are, on its 16-bit kernels — else float32.
        """
        texts = text_list(texts)
        dtype = self._compute_dtype()
        dtype = dtype if dtype in HALF_DTYPES else torch.float32
        if not texts:
            return torch.zeros(0, self.hidden_size, device=self.device, dtype=dtype)
        return self._embed_tokens(self.tokenize(texts, instruction), packed, max_tokens).to(dtype)

    @torch.no_grad()
    def encode(self, texts: Iterable[str], instruction: str | None = None, batch_size: int = 32, *,
               packed: bool = False, progress: bool = False) -> torch.Tensor:
        """(len(texts), hidden) float32 embeddings for inference: eval mode, no grad, batches of batch_size
        texts of similar length (less padding), returned in input order; `progress` shows a tqdm bar."""
        texts = text_list(texts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not texts:
            return torch.zeros(0, self.hidden_size, device=self.device)
        seqs = self.tokenize(texts, instruction)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]), reverse=True)
        out = torch.empty(len(seqs), self.hidden_size, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with tqdm(total=len(order), unit="text", desc="encode", disable=not progress) as bar:
                for k in range(0, len(order), batch_size):
                    idx = order[k: k + batch_size]
                    out[idx] = self._embed_tokens([seqs[i] for i in idx], packed)
                    bar.update(len(idx))
        finally:
            self.model.train(was_training)
        return out

    # ---- LoRA --------------------------------------------------------------------------------------------

    def add_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                 target_modules: str | list[str] = "all-linear", **lora_kwargs: Any) -> LLMEncoder:
        """Wrap the model in a peft LoRA adapter (llm2vec's defaults); base weights are frozen."""
        from peft import LoraConfig, get_peft_model

        if self._is_peft():
            raise ValueError("the model already carries a LoRA adapter; merge_lora() it first")
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            **lora_kwargs)
        with _quiet_peft():
            self.model = get_peft_model(self.model, config)
        return self

    def save_adapter(self, directory: str | os.PathLike) -> None:
        """Write the LoRA adapter (its weights only) to `directory`, for load_adapter or `prcl encode --adapter`."""
        if not self._is_peft():
            raise ValueError("save_adapter needs a LoRA adapter: call add_lora() or load_adapter() first")
        # The base embeddings are frozen and never resized, so the adapter holds the LoRA weights only. peft's
        # default ("auto") looks for the base model's config.json to compare vocabularies: beside a GGUF there
        # is none, and its fallback, a Hub lookup, warns "Could not find a config file in ..." when it fails.
        self.model.save_pretrained(os.fspath(directory), save_embedding_layers=False)

    def load_adapter(self, directory: str | os.PathLike, *, is_trainable: bool = False) -> LLMEncoder:
        """Attach an adapter saved by save_adapter to this (adapter-free) model; ValueError when the adapter
        was trained on another base model (by its name, as resume compares models, or by its shapes)."""
        from peft import PeftModel

        if self._is_peft():
            raise ValueError("the model already carries a LoRA adapter; merge_lora() it first")
        config = os.path.join(directory, "adapter_config.json")
        try:
            base = json.loads(Path(regular_file(config, "adapter")).read_text()).get("base_model_name_or_path")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            raise ValueError(f"adapter: {config} is not a peft adapter config") from None
        here = getattr(self.model.config, "_name_or_path", "")
        # by name only where the names are known: "." (or "..") names a folder of another working directory
        names = [os.path.basename(os.path.normpath(p)) for p in (base or ".", os.path.abspath(here) if here else ".")]
        if not {".", ".."} & set(names) and names[0] != names[1]:
            raise ValueError(f"adapter: {directory} was trained on {base}, not on {here}; pass the --model it was "
                             "trained with")
        try:
            with _quiet_peft():
                self.model = PeftModel.from_pretrained(self.model, os.fspath(directory), is_trainable=is_trainable)
        except RuntimeError as e:  # "Error(s) in loading state_dict ... size mismatch for ..."
            mismatch = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).strip())
            raise ValueError(f"adapter: {directory} does not fit this model ({mismatch[:300]}); pass the --model it "
                             "was trained with") from None
        return self

    def merge_lora(self) -> LLMEncoder:
        """Fold the adapter into the base weights (inference without LoRA's extra matmuls)."""
        if not self._is_peft():
            raise ValueError("merge_lora needs a LoRA adapter: call add_lora() or load_adapter() first")
        self.model = self.model.merge_and_unload()
        return self

    def _is_peft(self):
        return hasattr(self.model, "peft_config")


def pack_by_tokens(seqs: list[Sequence], max_tokens: int | None = None) -> list[list[Sequence]]:
    """seqs split into runs of consecutive sequences of at most max_tokens tokens in all (a longer sequence
    alone); one run when max_tokens is None."""
    if max_tokens is None:
        return [seqs]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    parts, size = [], max_tokens + 1
    for seq in seqs:
        n = len(seq[0])
        if size + n > max_tokens:
            parts.append([])
            size = 0
        parts[-1].append(seq)
        size += n
    return parts


def text_list(texts: Iterable[str], name: str = "texts") -> list[str]:
    """texts as a list, ValueError naming `name` unless it is an iterable of str (a single str is refused)."""
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of strings, got a single str (wrap it in a list)")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(t).__name__} {t!r:.40}")
    return texts
