"""`prcl export`: an LLMEncoder (with its LoRA adapter merged) as a sentence-transformers model directory.

    prcl export --model M [--adapter OUT/adapter] [--gguf-file F] [--instruction I] --out DIR
    SentenceTransformer(DIR).encode(texts)                   == prcl encode --model M --adapter ...
    SentenceTransformer(DIR).encode(texts, prompt_name="query") == ... --instruction I

The directory loads with plain sentence-transformers and transformers >= 5.2, no prcl and no remote code:
  - the merged model (safetensors) with `"is_causal": false` in config.json, which transformers reads on
    every forward of the supported families (Llama, Mistral, Qwen2/3, Gemma) for bidirectional attention;
  - the tokenizer, padding on the right (the default position ids then count real tokens, as prcl's do),
    without its chat template (sentence-transformers would wrap every text in it);
  - Pooling (prcl's pooling, `include_prompt: false`: the instruction's tokens are not pooled) and Normalize;
  - the instruction, joined to the text as prcl joins it, as the prompt "query" (config_sentence_transformers.json).
sentence-transformers counts the prompt's tokens by tokenizing it alone; export refuses an instruction whose
tokens differ that way from the ones prcl leaves out of the pooling (e.g. a BPE tokenizer that splits a
trailing space off on its own), and weighted_mean with an instruction (the two weight schemes differ there).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from prcl.encoders.llm import LLMEncoder, instruction_prefix
from prcl.files import USER_ERRORS, check_model_path, fail, load_errors

POOLING_MODES = {"mean": "mean", "last": "lasttoken", "weighted_mean": "weightedmean"}


def _check_prompt(enc: LLMEncoder, instruction: str) -> None:
    """ValueError unless sentence-transformers' prompt length (the prompt tokenized alone, less a trailing
    special token) equals the number of leading tokens LLMEncoder leaves out of the pooling."""
    tok = enc.tokenizer
    ids = tok(instruction_prefix(instruction))["input_ids"]
    st_length = len(ids) - (1 if ids and ids[-1] in tok.all_special_ids else 0)
    for probe in ("text", "a longer probe text, with punctuation", "x"):
        (_, n_inst), = enc.tokenize([probe], instruction)
        if n_inst != st_length:
            raise ValueError(f"instruction: {instruction!r} takes {n_inst} tokens before {probe!r} but "
                             f"{st_length} tokens alone, so sentence-transformers would pool other tokens than "
                             "prcl; end the instruction with a newline (or a word instead of a space)")


def export(model: str | os.PathLike, out: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
           gguf_file: str | None = None, instruction: str | None = None, pooling: str = "mean",
           max_length: int = 512) -> Path:
    """Write the sentence-transformers directory `out`; returns its path.

    Example:
        export("SmolLM2.gguf", "st-model", adapter="run/adapter", instruction="Given a question, retrieve:")
        SentenceTransformer("st-model").encode(["a query"], prompt_name="query")
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    out = Path(out)
    if out.is_symlink():
        raise ValueError(f"out: {str(out)!r} is a link; prcl never writes through one: choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {str(out)!r} exists and is not an empty directory; choose a new one")
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling: expected one of {tuple(POOLING_MODES)}, got {pooling!r}")
    if instruction is not None and not instruction.strip():
        raise ValueError("instruction: empty; leave it out instead")
    if instruction and pooling == "weighted_mean":
        raise ValueError("pooling: weighted_mean with an instruction weighs tokens differently in "
                         "sentence-transformers (by position from the prompt's start); use mean or last")
    with load_errors("model", model):
        enc = LLMEncoder.from_pretrained(model, gguf_file=gguf_file, pooling=pooling, max_length=max_length)
    if instruction:
        _check_prompt(enc, instruction)
    if adapter:
        enc.load_adapter(adapter).merge_lora()
    base, tok = enc.model, enc.tokenizer
    base.config.is_causal = False  # LLMEncoder set it; written to config.json, read by transformers on load
    if gguf_file or str(model).endswith(".gguf"):
        # a GGUF's weights were de-quantised on load; transformers still marks the model quantized and
        # refuses to save it: save the de-quantised weights as plain safetensors
        base.hf_quantizer = None
        base.config.__dict__.pop("quantization_config", None)
    tok.padding_side = "right"
    # sentence-transformers wraps every text in a tokenizer's chat template (its "message" modality);
    # prcl embeds the plain text
    tok.chat_template = None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(out)
    tok.save_pretrained(out)
    modules = [Transformer(str(out), max_seq_length=max_length),
               Pooling(enc.hidden_size, POOLING_MODES[pooling], include_prompt=False), Normalize()]
    prompts = {"query": instruction_prefix(instruction)} if instruction else {}
    SentenceTransformer(modules=modules, prompts=prompts, device="cpu").save(str(out))
    (out / "prcl_export.json").write_text(json.dumps(
        {"model": str(model), "gguf_file": gguf_file, "adapter": adapter and str(adapter), "pooling": pooling,
         "max_length": max_length, "instruction": instruction}, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prcl export", description="Merge a LoRA adapter into its model and "
                                 "write a sentence-transformers directory that embeds as `prcl encode` does.")
    ap.add_argument("--model", required=True, help="local model directory, or a .gguf file (or a directory "
                    "with --gguf-file)")
    ap.add_argument("--adapter", help="LoRA adapter directory written by `prcl train` (OUT/adapter)")
    ap.add_argument("--gguf-file", help="GGUF file name inside the --model directory")
    ap.add_argument("--out", required=True, help="new (or empty) output directory")
    ap.add_argument("--instruction", help="query instruction, saved as the prompt 'query'")
    ap.add_argument("--pooling", default="mean", help="mean, last or weighted_mean (default: mean)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per text (default: 512)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {args.max_length}")
        check_model_path(args.model, args.gguf_file, prog="prcl export")
        out = export(args.model, args.out, adapter=args.adapter, gguf_file=args.gguf_file,
                     instruction=args.instruction, pooling=args.pooling, max_length=args.max_length)
    except USER_ERRORS as e:
        return fail("prcl export", e)
    print(f"{out}: sentence-transformers model (SentenceTransformer({str(out)!r}))")
    return 0
