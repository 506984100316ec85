"""prcl.training on CPU with a tiny random Llama: data errors, batches, GradCache, the loop, resume, CLI."""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prcl.backends import reference
from prcl.training import (
    DataError,
    Example,
    ExampleStream,
    TrainConfig,
    build_batch,
    forward_backward,
    info_nce,
    parse_example,
    train,
)
from prcl.training.cli import _read_config, encode_main, parse_train_args
from prcl.training.data import iter_file
from prcl.training.step import batch_loss

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llm import CORPUS, tiny_model_and_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINES = [ln for ln in CORPUS.strip().split("\n")]


def toy_rows():
    """Learnable: the query is the first half of a corpus line, the positive its second half."""
    rows = []
    for i, line in enumerate(LINES):
        w = line.split()
        rows.append({"query": " ".join(w[: len(w) // 2]), "positive": " ".join(w[len(w) // 2:]),
                     "negatives": [LINES[(i + 5) % len(LINES)]]})
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def tiny_encoder(dropout=0.0, r=4):
    from prcl.encoders import LLMEncoder

    model, tok = tiny_model_and_tokenizer("llama")
    enc = LLMEncoder(model, tok)
    torch.manual_seed(0)
    return enc.add_lora(r=r, alpha=2 * r, dropout=dropout)


# ---- data ------------------------------------------------------------------------------------------------

GOOD = {"query": "q", "positive": "p"}
BAD_LINES = {
    "bad-json": ('{"query": "q", "positive": ', "invalid JSON"),
    "not-an-object": ('["q", "p"]', "expected a JSON object"),
    "missing-query": ('{"positive": "p"}', 'missing "query"'),
    "missing-positive": ('{"query": "q"}', 'missing "positive"'),
    "query-not-str": ('{"query": 3, "positive": "p"}', '"query" must be a non-empty string'),
    "query-empty": ('{"query": " ", "positive": "p"}', '"query" must be a non-empty string'),
    "positive-not-str": ('{"query": "q", "positive": 7}', '"positive" must be a string or a list of strings'),
    "positive-empty-list": ('{"query": "q", "positive": []}', '"positive" is empty'),
    "positive-empty-str": ('{"query": "q", "positive": ""}', '"positive" contains an empty string'),
    "negatives-str": ('{"query": "q", "positive": "p", "negatives": "n"}', '"negatives" must be a list of strings'),
    "negatives-int": ('{"query": "q", "positive": "p", "negatives": [1]}', '"negatives" must be a list of strings'),
    "instruction-int": ('{"query": "q", "positive": "p", "instruction": 1}', '"instruction" must be a string'),
    "graded-not-list": ('{"query": "q", "positive": "p", "graded": "x"}', '"graded" must be a list'),
    "graded-no-text": ('{"query": "q", "positive": "p", "graded": [{"relevance": 0.5}]}', '"graded"[0] must be an object'),
    "relevance-above-1": ('{"query": "q", "positive": "p", "graded": [{"text": "g", "relevance": 1.5}]}', "must lie in [0, 1], got 1.5"),
    "relevance-negative": ('{"query": "q", "positive": "p", "graded": [{"text": "g", "relevance": -0.1}]}', "must lie in [0, 1], got -0.1"),
    "relevance-not-number": ('{"query": "q", "positive": "p", "graded": [{"text": "g", "relevance": "high"}]}', "must be a number in [0, 1]"),
    "relevance-bool": ('{"query": "q", "positive": "p", "graded": [{"text": "g", "relevance": true}]}', "must be a number in [0, 1]"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_line_stops_with_line_number_and_reason(tmp_path, kind):
    line, reason = BAD_LINES[kind]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", line, GOOD])  # blank line 2 is allowed
    with pytest.raises(DataError) as err:
        list(iter_file(path))
    assert err.value.lineno == 3
    assert str(err.value).startswith(f"{path}:3: ") and reason in str(err.value)


def test_skip_bad_lines_counts_and_reports(tmp_path):
    bad = [BAD_LINES[k][0] for k in ("bad-json", "missing-query", "relevance-above-1")]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad[0], GOOD, bad[1], bad[2], GOOD])
    logged = []
    stream = ExampleStream(path, skip_bad_lines=True, shuffle=False, log=logged.append)
    it = iter(stream)
    got = [next(it) for _ in range(6)]  # two epochs of the three good lines
    assert got == [Example("q", ("p",))] * 6
    assert stream.skipped.count == 3  # reported once, not once per epoch
    assert [m.split(":")[2] for m in logged] == ["2", "4", "5"]
    assert "skipped 3 bad line(s)" in stream.skipped.summary(path)


def test_parse_forms():
    ex = parse_example(json.dumps({"query": "q", "positive": ["a", "b"], "negatives": ["n", "a"],
                                   "instruction": "find", "graded": [{"text": "g", "relevance": 0.25},
                                                                     {"text": "n", "relevance": 0.5}]}))
    assert ex.positives == ("a", "b") and ex.instruction == "find"
    # a text listed twice keeps its highest label: "a" is a positive, "n" graded 0.5 over negative
    assert ex.documents() == [("a", 1.0), ("b", 1.0), ("g", 0.25), ("n", 0.5)]
    # an unknown key (a misspelled "negative") is an error that lists the allowed ones
    with pytest.raises(ValueError, match=r'unknown key\(s\) "negative"; allowed: query, positive, negatives'):
        parse_example('{"query": "q", "positive": "p", "negative": ["n"]}')


def test_stream_resumes_where_it_stopped(tmp_path):
    rows = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(23)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full = ExampleStream(path, block_size=5, seed=3)
    it = iter(full)
    first = [next(it).query for _ in range(60)]
    assert sorted(first[:23]) == sorted(r["query"] for r in rows) and first[:23] != [r["query"] for r in rows]
    part = ExampleStream(path, block_size=5, seed=3)
    it = iter(part)
    [next(it) for _ in range(37)]
    resumed = ExampleStream(path, block_size=5, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    it = iter(resumed)
    assert [next(it).query for _ in range(23)] == first[37:]


# ---- batches ---------------------------------------------------------------------------------------------

def test_batch_dedups_documents_and_labels_them():
    b = build_batch([Example("q0", ("p0",), ("shared",), graded=(("g0", 0.5),)),
                     Example("q1", ("shared",), ("n1", "p0"))])
    assert b.docs == ["p0", "g0", "shared", "n1"]
    # q0: p0 = 1, g0 = 0.5, shared is its hard negative (implicit 0); q1: shared = 1, p0/n1 negatives
    assert b.dense_labels().tolist() == [[1, 0.5, 0, 0], [0, 0, 1, 0]]


def test_duplicate_documents_become_exclusions():
    exs = [Example("q0", ("dup",), ("n0",)), Example("q1", ("p1",), ("dup",)), Example("q2", ("p2",))]
    b = build_batch(exs, dedup=False)
    assert b.docs == ["dup", "n0", "p1", "dup", "p2"]
    # q0's positive reappears as q1's negative (column 3): excluded for q0, not a negative;
    # q1 lists "dup" itself (column 3, y = 0) so q0's copy (column 0) is excluded for q1
    assert b.dense_labels().tolist() == [[1, 0, 0, -1, 0], [-1, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    # the excluded pairs are out of the loss: same value as the reference with those pairs dropped
    q, d = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    got = batch_loss(q, d, b, scale=5.0)
    keep = b.dense_labels() >= 0
    z = 5.0 * q @ d.T + reference_bias(5)
    manual = (F.binary_cross_entropy_with_logits(z, b.dense_labels().clamp(min=0), reduction="none") * keep).sum() / 3
    torch.testing.assert_close(got, manual)
    torch.testing.assert_close(got, reference.pair_bce(q, d, b.dense_labels(), scale=5.0))


def reference_bias(n):
    return -math.log(n - 1)


def test_repeated_query_excludes_the_other_rows_positives():
    b = build_batch([Example("q", ("a",)), Example("q", ("b",)), Example("r", ("c",))])
    assert b.dense_labels().tolist() == [[1, -1, 0], [-1, 1, 0], [0, 0, 1]]


def test_excluded_pairs_on_ids_by_hand():
    """The rule on ids, as build_batch and the sentence-transformers losses call it: queries 0 and 2 share a
    key; documents 1 and 3 share a text."""
    from prcl.training.batching import excluded_pairs

    rows, cols = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 4])
    relevant = torch.tensor([True, False, True, True])
    q, d = excluded_pairs(torch.tensor([5, 6, 5]), torch.tensor([0, 1, 2, 1, 3]), rows, cols, relevant)
    # query 0 lists text 1 (column 1) as a negative: its copy, column 3, is out; its twin, query 2, marks
    # column 4 relevant: out for query 0. Query 2 leaves out query 0's relevant column 0, not its negative 1.
    # Query 1 lists nothing that repeats.
    assert list(zip(q.tolist(), d.tolist())) == [(0, 3), (0, 4), (2, 0)]


def test_info_nce_one_positive_is_cross_entropy_and_masks_exclusions():
    q, d = torch.randn(3, 6), torch.randn(5, 6)
    b = build_batch([Example("q0", ("d0",)), Example("q1", ("d1",)), Example("q2", ("d2",), ("d3", "d4"))])
    got = info_nce(q, d, b.labels, b.label_index, scale=4.0)
    torch.testing.assert_close(got, F.cross_entropy(4.0 * q @ d.T, torch.tensor([0, 1, 2])))
    labels, index = torch.tensor([[1.0, -1.0]]), torch.tensor([[0, 1]])
    got = info_nce(q[:1], d, labels, index, scale=4.0)
    z = 4.0 * q[:1] @ d.T
    torch.testing.assert_close(got, -(z[0, 0] - torch.logsumexp(z[0, [0, 2, 3, 4]], 0)))


def test_false_negative_margin_masks_both_losses():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(4, 6), dim=1), F.normalize(torch.randn(6, 6), dim=1)
    b = build_batch([Example(f"q{i}", (f"d{i}",), (f"n{i}",) if i < 2 else ()) for i in range(4)])
    Y = b.dense_labels()
    s = q @ d.T
    best = torch.where(Y > 0, s, -math.inf).amax(1, keepdim=True)
    masked = (Y == 0) & (s > best - 0.05)
    assert masked.any()
    # PRCL: the masked pairs leave the loss as excluded pairs do
    got, count = batch_loss(q, d, b, scale=5.0, false_negative_margin=-0.05, return_masked=True)
    torch.testing.assert_close(got, reference.pair_bce(q, d, torch.where(masked, -1.0, Y), scale=5.0))
    assert count.item() == masked.sum().item()
    # InfoNCE: a masked column leaves the softmax denominator
    got, count = batch_loss(q, d, b, loss="softmax", scale=4.0, false_negative_margin=-0.05, return_masked=True)
    z = (4.0 * s).masked_fill(masked, -math.inf)
    torch.testing.assert_close(got, F.cross_entropy(z, Y.argmax(1)))
    assert count.item() == masked.sum().item()


def test_train_logs_masked_pairs(tmp_path):
    cfg = parse_train_args(["--data", "x.jsonl", "--out", "o", "--false-negative-margin", "-0.2"])
    assert cfg.false_negative_margin == -0.2
    with pytest.raises(ValueError, match="false_negative_margin"):
        config(tmp_path, false_negative_margin=math.nan).validate()
    for loss in ("prcl", "softmax"):
        out = tmp_path / loss
        train(config(out, loss=loss, max_steps=2, false_negative_margin=-0.5), encoder=tiny_encoder())
        lines = [json.loads(x) for x in (out / "out" / "metrics.jsonl").read_text().splitlines()]
        assert all(isinstance(r["masked_pairs"], int) for r in lines) and any(r["masked_pairs"] > 0 for r in lines)


# ---- cached embeddings -----------------------------------------------------------------------------------

def toy_batch():
    rows = toy_rows()[:6]
    exs = [parse_example(json.dumps(r)) for r in rows]
    exs[1] = Example(exs[1].query, exs[1].positives, exs[1].negatives, instruction="represent this sentence",
                     graded=((LINES[9], 0.5),))
    return build_batch(exs)


def lora_grads(enc):
    return {n: p.grad.clone() for n, p in enc.model.named_parameters() if p.requires_grad}


def run_step(enc, batch, *, cached, mini, loss="prcl", seed=1):
    enc.model.zero_grad(set_to_none=True)
    log_t = torch.tensor(math.log(8.0), requires_grad=True)
    torch.manual_seed(seed)
    value = forward_backward(enc, batch, lambda q, d: batch_loss(q, d, batch, loss=loss, scale=log_t.exp()),
                             mini_batch_size=mini, cached=cached)
    return value, lora_grads(enc), log_t.grad, torch.get_rng_state()


@pytest.mark.parametrize("loss", ["prcl", "softmax"])
def test_cached_gradients_equal_uncached(loss):
    enc = tiny_encoder(dropout=0.0)
    enc.model.train()
    batch = toy_batch()
    v0, g0, t0, _ = run_step(enc, batch, cached=False, mini=None, loss=loss)  # one forward for everything
    v1, g1, t1, _ = run_step(enc, batch, cached=True, mini=3, loss=loss)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t1, t0, rtol=1e-4, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_cached_replays_dropout_exactly():
    """LoRA dropout on: the grad pass must draw the no-grad pass's masks, and leave the RNG where an
    uncached step leaves it."""
    enc = tiny_encoder(dropout=0.3)
    enc.model.train()
    batch = toy_batch()
    v0, g0, _, rng0 = run_step(enc, batch, cached=False, mini=3)
    v1, g1, _, rng1 = run_step(enc, batch, cached=True, mini=3)
    assert torch.equal(rng0, rng1)
    torch.testing.assert_close(v1, v0, rtol=0, atol=0)
    for n in g0:
        # float32 reassociation (mini-batched vs whole backward) errs relative to the summands, so an
        # entry that nearly cancels (0.005 in a tensor up to ~1) may differ by 1e-5 of the tensor's
        # scale: tolerance from the tensor's largest entry; different dropout masks differ by far more
        scale = g0[n].abs().max().item()
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6 * scale, msg=n)
    _, g2, _, _ = run_step(enc, batch, cached=False, mini=3, seed=2)  # other masks: other gradients
    assert any(not torch.allclose(g2[n], g0[n]) for n in g0)


def family_encoder(family):
    """A tiny `family` model with LoRA whose B matrices are random (at init they are 0, so A gets no gradient)."""
    from prcl.encoders import LLMEncoder

    model, tok = tiny_model_and_tokenizer(family)
    torch.manual_seed(0)
    enc = LLMEncoder(model, tok).add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in enc.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return enc


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
@pytest.mark.parametrize("cached, mini, max_tokens", [(False, None, None), (False, None, 16), (True, 3, 8)])
def test_packed_step_equals_padded(family, cached, mini, max_tokens):
    """Packed (one row, or rows of at most max_tokens tokens) and padded steps: the same loss and LoRA
    gradients, within the accuracy rule: each path's error against a float64 padded step at most twice the
    padded float32 step's, plus a floor of 1e-6 of the gradient's scale (the loss pools in float32)."""
    batch = toy_batch()

    def step(enc, packed):
        enc.model.zero_grad(set_to_none=True)
        enc.model.train()
        loss = forward_backward(enc, batch, lambda q, d: batch_loss(q, d, batch), mini_batch_size=mini,
                                cached=cached, packed=packed, max_tokens=max_tokens)
        return loss.double(), {n: g.double() for n, g in lora_grads(enc).items()}

    enc = family_encoder(family)
    enc64 = copy.deepcopy(enc)
    enc64.model.double()
    ref_loss, ref = step(enc64, packed=False)
    (pad_loss, pad), (pack_loss, pack) = step(enc, packed=False), step(enc, packed=True)
    assert abs(pack_loss - ref_loss) <= 2 * abs(pad_loss - ref_loss) + 1e-6 * abs(ref_loss)
    for n in ref:
        floor = 1e-6 * ref[n].abs().max()
        assert (pack[n] - ref[n]).abs().max() <= 2 * (pad[n] - ref[n]).abs().max() + floor, n
    assert any(not torch.equal(pack[n], pad[n]) for n in ref)  # two computations, not one path twice


def test_pack_by_tokens_splits_runs_under_the_budget():
    from prcl.encoders import pack_by_tokens

    seqs = [([0] * n, 0) for n in (3, 4, 9, 2, 2, 5)]
    assert [[len(s[0]) for s in part] for part in pack_by_tokens(seqs, 8)] == [[3, 4], [9], [2, 2], [5]]
    assert pack_by_tokens(seqs) == [seqs]
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        pack_by_tokens(seqs, 0)


# ---- the loop --------------------------------------------------------------------------------------------

def config(tmp_path, **kw):
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    base = dict(data=data, out=str(tmp_path / "out"), batch_size=8, mini_batch_size=4, max_steps=30, lr=3e-3,
                warmup_steps=3, progress=False, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_recall_rises(tmp_path):
    cfg = config(tmp_path, eval=str(tmp_path / "train.jsonl"), max_steps=25, lr=1e-2)
    s = train(cfg, encoder=tiny_encoder())
    first, last = sum(s["losses"][:5]) / 5, sum(s["losses"][-5:]) / 5
    assert last < 0.6 * first, s["losses"]
    assert s["eval_after"]["mrr@10"] > s["eval_before"]["mrr@10"] + 0.1
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 26))
    assert all({"loss", "lr", "pairs_per_s"} <= set(r) for r in lines)
    assert {"eval/mrr@10", "eval/ndcg@10", "eval/recall@1"} <= set(lines[-1])
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def test_softmax_loss_trains(tmp_path):
    s = train(config(tmp_path, loss="softmax", max_steps=15, lr=1e-2), encoder=tiny_encoder())
    assert sum(s["losses"][-5:]) < 0.8 * sum(s["losses"][:5])


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    kw = dict(max_steps=8, checkpoint_every=3, grad_accum=2, learn_scale=True, lora_dropout=0.1,
              batch_size=6, mini_batch_size=4, schedule="cosine")
    full = train(config(tmp_path / "a", **kw), encoder=tiny_encoder(dropout=0.1))

    import prcl.training.loop as loop

    calls = {"n": 0}
    real = loop.forward_backward

    def crash_in_step_5(*a, **k):  # 2 micro-steps per step: the 10th call is step 5's second
        calls["n"] += 1
        if calls["n"] == 10:
            raise Interrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "forward_backward", crash_in_step_5)
    cfg = config(tmp_path / "b", **kw)
    with pytest.raises(Interrupt):
        train(cfg, encoder=tiny_encoder(dropout=0.1))
    monkeypatch.setattr(loop, "forward_backward", real)
    assert sorted(p.name for p in Path(cfg.out).glob("checkpoint-*")) == ["checkpoint-3"]
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, encoder=tiny_encoder(dropout=0.1))
    cfg.resume = True
    resumed = train(cfg, encoder=tiny_encoder(dropout=0.1))
    assert len(resumed["losses"]) == 5
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][3:]), rtol=0, atol=1e-6)
    logged = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))  # step 4 of the crashed run replaced
    torch.testing.assert_close(torch.tensor([r["loss"] for r in logged]), torch.tensor(full["losses"]),
                               rtol=0, atol=1e-6)


# ---- CLI -------------------------------------------------------------------------------------------------

def test_config_file_and_flag_precedence(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data": "x.jsonl", "out": "o", "max-steps": 50, "lr": 1e-3}))
    cfg = parse_train_args(["--config", str(tmp_path / "c.json"), "--max-steps", "7", "--learn-scale"])
    assert (cfg.max_steps, cfg.lr, cfg.data, cfg.learn_scale) == (7, 1e-3, "x.jsonl", True)
    (tmp_path / "c.toml").write_text('data = "y.jsonl"\nbatch_size = 16\n')
    assert parse_train_args(["--config", str(tmp_path / "c.toml")]).batch_size == 16
    (tmp_path / "bad.json").write_text(json.dumps({"max_stepz": 3}))
    with pytest.raises(ValueError, match="unknown key 'max_stepz'"):
        _read_config(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"batch_size": "8"}))
    with pytest.raises(ValueError, match="batch_size .* must be int"):
        _read_config(tmp_path / "bad.json")


def test_cli_train_then_encode(tmp_path, capsys):
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    (tmp_path / "c.json").write_text(json.dumps({"lr": 1e-3, "max_steps": 100, "lora_r": 4}))
    # shown even where Python hides them by default: prcl's calls into transformers/peft/torch raise none
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="always::DeprecationWarning,always::FutureWarning")
    cmd = [sys.executable, "-m", "prcl", "train", "--model", str(tmp_path / "model"), "--data", data,
           "--out", str(tmp_path / "out"), "--eval", data, "--batch-size", "4", "--mini-batch-size", "3",
           "--max-steps", "3", "--config", str(tmp_path / "c.json"), "--no-progress"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "mrr" in run.stdout
    assert f"model: {tmp_path / 'model'}: loading" in run.stderr and "loaded in" in run.stderr
    assert "eval at step 0: embedding 22 queries" in run.stderr and "eval at step 3 (" in run.stderr
    assert "DeprecationWarning" not in run.stderr and "FutureWarning" not in run.stderr, run.stderr
    steps = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 3
    assert json.loads((tmp_path / "out" / "config.json").read_text())["lora_r"] == 4

    texts = write_jsonl(tmp_path / "texts.jsonl", [json.dumps(LINES[0]), {"text": LINES[1]}])
    out = tmp_path / "emb.npy"
    assert encode_main(["--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "out" / "adapter"),
                        "--data", texts, "--out", str(out)]) == 0
    bar = capsys.readouterr().err  # the tqdm bar of the embedding phase
    assert "encode: 100%" in bar and "2/2" in bar, bar
    import numpy as np

    emb = np.load(out)
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, '{"query": "q"}'])
    assert train_main_in_process(["--model", str(tmp_path / "model"), "--data", bad,
                                  "--out", str(tmp_path / "out2"), "--max-steps", "1", "--no-progress"]) == 1


def train_main_in_process(argv):
    from prcl.training.cli import train_main

    return train_main(argv)


# ---- torchrun --------------------------------------------------------------------------------------------

def _rank_main(rank, world, port, cfg_kw, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        s = train(TrainConfig(**cfg_kw), encoder=tiny_encoder())
        queue.put((rank, s["losses"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """torchrun semantics: each rank takes half of the global batch, the loss sums over ranks and so do
    the gradients, so 2 ranks follow the 1-process run step for step (dropout off: per-rank seeds)."""
    import socket

    import torch.multiprocessing as mp

    # max_grad_norm (never reached) logs the gradient norm: Adam barely sees a mean-instead-of-sum bug
    kw = dict(max_steps=4, batch_size=8, mini_batch_size=3, lr=1e-2, warmup_steps=0, learn_scale=True,
              max_grad_norm=1e9)
    single = train(config(tmp_path / "one", **kw), encoder=tiny_encoder())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = dataclasses.asdict(config(tmp_path / "two", **kw))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, cfg, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1]  # the logged loss is the all-reduced global one
    torch.testing.assert_close(torch.tensor(results[0]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5)
    norms = [[json.loads(x)["grad_norm"] for x in (tmp_path / run / "out" / "metrics.jsonl").read_text().splitlines()]
             for run in ("one", "two")]
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-4, atol=1e-6)


def _softmax_rank(rank, world, store, b_sizes, n_sizes):
    import datetime

    import torch.distributed as dist

    from prcl.training.softmax import gathered_info_nce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        g = torch.Generator().manual_seed(0)
        Q = F.normalize(torch.randn(sum(b_sizes), 6, generator=g), dim=1).requires_grad_()
        Dd = F.normalize(torch.randn(sum(n_sizes), 6, generator=g), dim=1).requires_grad_()
        # each query lists its own rank's document k as positive and k + 1 graded 0.5 (local columns)
        local = [(torch.tensor([[1.0, 0.5]] * B), torch.tensor([[k, (k + 1) % N] for k in range(B)]))
                 for B, N in zip(b_sizes, n_sizes)]
        b0, n0 = sum(b_sizes[:rank]), sum(n_sizes[:rank])
        labels = torch.cat([y for y, _ in local])
        index = torch.cat([i + sum(n_sizes[:r]) for r, (_, i) in enumerate(local)])
        whole = info_nce(Q, Dd, labels, index, scale=4.0)
        whole.backward()
        q = Q.detach()[b0: b0 + b_sizes[rank]].clone().requires_grad_()
        d = Dd.detach()[n0: n0 + n_sizes[rank]].clone().requires_grad_()
        mine = gathered_info_nce(q, d, *local[rank], scale=4.0, process_group=dist.group.WORLD)
        mine.backward()
        total = mine.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, whole.detach())
        torch.testing.assert_close(q.grad, Q.grad[b0: b0 + b_sizes[rank]])
        torch.testing.assert_close(d.grad, Dd.grad[n0: n0 + n_sizes[rank]])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_softmax_across_unequal_ranks_equals_one_process(tmp_path):
    """gathered_info_nce on 2 gloo ranks holding 2 and 3 queries, 3 and 5 documents (the padded gather of
    prcl.distributed.gather_rows): the ranks' losses sum to InfoNCE over the whole batch, and each rank's
    query and document gradients are that batch's rows."""
    import torch.multiprocessing as mp

    mp.spawn(_softmax_rank, args=(2, str(tmp_path / "store"), (2, 3), (3, 5)), nprocs=2, join=True)


def test_train_config_scale_is_the_library_default():
    """TrainConfig spells the default scale out (the CLI parses it without importing torch): it must
    stay prcl's one default."""
    from prcl.core.contract import DEFAULT_SCALE

    assert TrainConfig().scale == DEFAULT_SCALE
    assert parse_train_args(["--model", "m", "--data", "d.jsonl", "--out", "o"]).scale == DEFAULT_SCALE
