"""prcl.retrieval: BEIR/TREC readers, chunked exact search, trec_eval metrics, `prcl eval`."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from prcl.retrieval import (
    compute_metrics,
    evaluate,
    examples_to_beir,
    main,
    read_corpus,
    read_qrels,
    read_queries,
    read_split,
    search,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_llm import tiny_model_and_tokenizer  # noqa: E402


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def jsonl(path, objs):
    return write(path, [o if isinstance(o, str) else json.dumps(o) for o in objs])


CORPUS = [{"_id": "d1", "title": "Cats", "text": "the cat sat on the mat"},
          {"_id": "d2", "text": "a dog runs in the park"},
          {"_id": "d3", "title": "", "text": "the stock market fell"}]
QUERIES = [{"_id": "q1", "text": "cat"}, {"_id": "q2", "text": "market"}]


def test_readers_beir_and_trec(tmp_path):
    corpus = read_corpus(jsonl(tmp_path / "c.jsonl", CORPUS))
    assert corpus == {"d1": "Cats the cat sat on the mat", "d2": "a dog runs in the park", "d3": "the stock market fell"}
    queries = read_queries(jsonl(tmp_path / "q.jsonl", QUERIES + [""]))
    assert queries == {"q1": "cat", "q2": "market"}
    beir = read_qrels(write(tmp_path / "b.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\td2\t0", "",
                                                  "q2\td3\t1"]), queries, corpus)
    trec = read_qrels(write(tmp_path / "t.txt", ["q1 0 d1 2", "q1 0 d2 0", "q2 Q0 d3 1"]), queries, corpus)
    assert beir == trec == {"q1": {"d1": 2, "d2": 0}, "q2": {"d3": 1}}


BAD = [
    ("corpus", ['{"_id": "d1", "text": "x"}', '{"_id": "d1", "text": "y"'], 2, "invalid JSON"),
    ("corpus", ['["d1", "x"]'], 1, "expected a JSON object"),
    ("corpus", ['{"text": "x"}'], 1, '"_id" must be a non-empty string'),
    ("corpus", ['{"_id": 7, "text": "x"}'], 1, '"_id" must be a non-empty string'),
    ("corpus", ['{"_id": "d1", "text": "x"}', '{"_id": "d1", "text": "y"}'], 2, "duplicate _id 'd1' \\(first on line 1\\)"),
    ("corpus", ['{"_id": "d1", "title": 3, "text": "x"}'], 1, '"title" must be a string'),
    ("corpus", ['{"_id": "d1"}'], 1, '"text" must be a string'),
    ("corpus", ['{"_id": "d1", "title": " ", "text": ""}'], 1, "empty document 'd1'"),
    ("queries", ['{"_id": "q1", "text": ["x"]}'], 1, '"text" must be a string'),
    ("queries", ['{"_id": "q1", "text": "x"}', '{"_id": "q2", "text": "  "}'], 2, "empty query 'q2'"),
    ("qrels", ["query-id corpus-id"], 1, "expected the BEIR header"),
    ("qrels", ["query-id\tcorpus-id\tscore", "q1\td1"], 2, "expected 3 fields"),
    ("qrels", ["q1 0 d1 1", "q1 d2 1"], 2, "expected 4 fields"),
    ("qrels", ["q1 0 d1 high"], 1, "grade must be an integer, got 'high'"),
    ("qrels", ["q1 0 d1 1", "q1 0 d1 2"], 2, "pair \\(q1, d1\\) judged twice \\(first on line 1\\)"),
    ("qrels", ["q1 0 d1 1", "q9 0 d1 1"], 2, "query-id 'q9' is not in the queries file"),
    ("qrels", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td9\t1"], 3, "corpus-id 'd9' is not in the corpus"),
]


@pytest.mark.parametrize("kind,lines,lineno,reason", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_files_name_file_and_line(tmp_path, kind, lines, lineno, reason):
    path = write(tmp_path / f"{kind}.bad", lines)
    good_q, good_c = {"q1": "a", "q2": "b"}, {"d1": "x", "d2": "y"}
    read = {"corpus": read_corpus, "queries": read_queries,
            "qrels": lambda p: read_qrels(p, good_q, good_c)}[kind]
    with pytest.raises(ValueError, match=f"^{path}:{lineno}: {reason}"):
        read(path)


def test_bad_encoding_and_empty_files(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": "\xff"}\n')
    with pytest.raises(ValueError, match=f"^{path}:2: not UTF-8"):
        read_corpus(path)
    for read in (read_corpus, read_queries, read_qrels):
        with pytest.raises(ValueError, match=f"^{tmp_path / 'empty'}: no "):
            read(write(tmp_path / "empty", ["", "  "]))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_chunked_search_equals_full_ranking(chunk_size, k):
    g = torch.Generator().manual_seed(chunk_size * 100 + k)
    q, d = torch.randn(9, 8, generator=g), torch.randn(23, 8, generator=g)
    calls = []

    def encode_documents(texts):
        calls.append(len(texts))
        return d[[int(t) for t in texts]]

    scores, idx = search(q, [str(i) for i in range(23)], encode_documents, k=k, chunk_size=chunk_size)
    want_s, want_i = (q @ d.T).topk(min(k, 23), dim=1)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(scores, want_s)
    assert max(calls) <= chunk_size and sum(calls) == 23  # the corpus is embedded once, a chunk at a time


def oracle(qrels, run, ks):
    """trec_eval's definitions, written out: gains = grades in nDCG, relevant = grade >= 1 elsewhere."""
    out = {}
    for qid, judged in qrels.items():
        ranked = sorted(run[qid], key=lambda d: -run[qid][d])
        rel = [judged.get(d, 0) for d in ranked]
        n_rel = sum(g > 0 for g in judged.values())
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(rel[:10]))
        ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(judged.values(), reverse=True)[:10]))
        hits = [i for i, g in enumerate(rel) if g > 0]
        m = {"ndcg@10": dcg / ideal, "mrr@10": next((1 / (i + 1) for i in hits if i < 10), 0.0),
             f"map@{max(max(ks), 10)}": sum((n + 1) / (i + 1) for n, i in enumerate(hits)) / n_rel}
        m.update({f"recall@{k}": sum(i < k for i in hits) / n_rel for k in ks})
        for key, v in m.items():
            out[key] = out.get(key, 0.0) + v / len(qrels)
    return out


def test_metrics_match_trec_eval_definitions():
    qrels = {"q1": {"a": 2, "b": 1, "c": 0, "z": 1}, "q2": {"c": 1}, "q3": {"e": 3, "a": 1}, "q4": {"b": 1}}
    run = {"q1": {"b": 0.9, "c": 0.8, "a": 0.7, "d": 0.1}, "q2": {"a": 0.5, "b": 0.4, "c": 0.3},
           "q3": {"a": 0.3, "b": 0.2, "c": 0.1}, "q4": {}}
    # q5 is judged non-relevant only: not a query of the mean; q4 is missing from the run: it scores 0
    got = compute_metrics({**qrels, "q5": {"a": 0}}, {q: r for q, r in run.items() if r}, ks=(1, 2, 3))
    want = oracle(qrels, run, ks=(1, 2, 3))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key


def test_evaluate_end_to_end_with_instructions():
    """Queries are embedded with their own instruction, documents without; unjudged queries are skipped."""
    g = torch.Generator().manual_seed(0)
    texts = [f"doc {i}" for i in range(30)] + ["q a", "q b", "q c"]
    table = dict(zip(texts, torch.nn.functional.normalize(torch.randn(len(texts), 6, generator=g), dim=1)))
    seen = []

    def encode(batch, instruction):
        seen.append((instruction, tuple(batch)))
        sign = -1.0 if instruction == "flip" else 1.0
        return torch.stack([sign * table[t] for t in batch])

    corpus = {f"d{i}": f"doc {i}" for i in range(30)}
    queries = {"qa": "q a", "qb": "q b", "qc": "q c"}
    qrels = {"qa": {"d3": 2, "d7": 1}, "qb": {"d1": 1, "d2": 0}, "qc": {"d5": 0}}
    metrics, run = evaluate(encode, queries, corpus, qrels, instructions={"qb": "flip"}, ks=(1, 5), chunk_size=8)
    assert set(run) == {"qa", "qb"} and metrics["queries"] == 2 and metrics["documents"] == 30
    assert all(len(docs) == 10 for docs in run.values())  # depth max(ks, 10)
    assert (None, ("q a",)) in seen and ("flip", ("q b",)) in seen
    assert all(ins is None for ins, batch in seen if batch[0].startswith("doc"))
    full = {}
    for qid, sign in (("qa", 1.0), ("qb", -1.0)):
        s = {d: float(sign * table[queries[qid]] @ table[t]) for d, t in corpus.items()}
        full[qid] = dict(sorted(s.items(), key=lambda x: -x[1])[:10])
        assert run[qid].keys() == full[qid].keys()
    want = oracle({q: qrels[q] for q in full}, full, ks=(1, 5))
    for key in want:
        assert metrics[key] == pytest.approx(want[key], abs=1e-4), key

    with pytest.raises(ValueError, match="no query has a relevant"):
        evaluate(encode, queries, corpus, {"qc": {"d5": 0}})


def test_examples_to_beir():
    from prcl.training.data import Example

    exs = [Example("q one", ("p1", "p2"), ("n1",), "ins", (("g1", 0.5),)), Example("q two", ("n1",))]
    queries, instructions, corpus, qrels = examples_to_beir(exs)
    assert queries == {"q0": "q one", "q1": "q two"} and instructions == {"q0": "ins", "q1": None}
    assert sorted(corpus.values()) == ["g1", "n1", "p1", "p2"]
    assert {corpus[d] for d in qrels["q0"]} == {"p1", "p2"} and [corpus[d] for d in qrels["q1"]] == ["n1"]
    assert set(qrels["q0"].values()) == {1}


def test_prcl_eval_cli_writes_run_and_metrics(tmp_path, capsys):
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = jsonl(tmp_path / "corpus.jsonl", CORPUS + [{"_id": f"x{i}", "text": f"one two {i}"} for i in range(12)])
    queries = jsonl(tmp_path / "queries.jsonl", QUERIES)
    qrels = write(tmp_path / "qrels.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\td2\t1", "q2\td3\t1"])
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "model"), "--corpus", str(corpus), "--queries", str(queries),
            "--qrels", str(qrels), "--out", str(out), "--chunk-size", "4", "--k", "1", "10"]
    assert main(argv) == 0
    assert "encode: 100%" in capsys.readouterr().err  # the embedding phases show progress
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    run = {}
    for line in (out / "run.trec").read_text().splitlines():
        qid, q0, did, rank, score, name = line.split()
        assert q0 == "Q0" and name == "prcl" and int(rank) == len(run.setdefault(qid, {})) + 1
        run[qid][did] = float(score)
    assert {q: len(d) for q, d in run.items()} == {"q1": 10, "q2": 10}
    assert all(list(d.values()) == sorted(d.values(), reverse=True) for d in run.values())
    recomputed = compute_metrics(read_qrels(qrels), run, ks=(1, 10))
    for key, value in recomputed.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5)
    assert metrics["queries"] == 2 and metrics["documents"] == 15

    write(qrels, ["query-id\tcorpus-id\tscore", "q1\tnope\t1"])
    assert main(argv) == 1


def test_prcl_eval_sentence_transformers_model(tmp_path):
    """A directory with modules.json is loaded by sentence-transformers; its prompt carries --instruction."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tiny_llm import tiny_tokenizer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    st = SentenceTransformer(modules=[Transformer(str(tmp_path / "bert")), Pooling(32, "mean")], device="cpu")
    st.save(str(tmp_path / "st"))
    corpus = jsonl(tmp_path / "corpus.jsonl", CORPUS)
    queries = jsonl(tmp_path / "queries.jsonl", QUERIES)
    qrels = write(tmp_path / "qrels.tsv", ["q1 0 d1 1", "q2 0 d3 2"])
    assert main(["--model", str(tmp_path / "st"), "--corpus", str(corpus), "--queries", str(queries), "--qrels",
                 str(qrels), "--out", str(tmp_path / "out"), "--instruction", "query passage"]) == 0
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    docs, qs = read_corpus(corpus), read_queries(queries)
    d = st.encode(list(docs.values()), normalize_embeddings=True, convert_to_tensor=True)
    q = st.encode(list(qs.values()), prompt="query passage", normalize_embeddings=True, convert_to_tensor=True)
    run = {qid: dict(zip(docs, row.tolist())) for qid, row in zip(qs, q @ d.T)}
    for key, value in compute_metrics(read_qrels(qrels), run, ks=(1, 10, 100)).items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    for line in (tmp_path / "out" / "run.trec").read_text().splitlines():  # scores: the prompted queries'
        qid, _, did, _, score, _ = line.split()
        assert float(score) == pytest.approx(run[qid][did], abs=1e-5)
    for flag in (["--adapter", "x"], ["--pooling", "last"]):  # LLM options: the model has its own pooling
        assert main(["--model", str(tmp_path / "st"), *flag, "--corpus", str(corpus), "--queries",
                     str(queries), "--qrels", str(qrels), "--out", str(tmp_path / "out")]) == 1


def test_cli_parser_needs_no_torch():
    import subprocess

    code = ("import sys, importlib.util; spec = importlib.util.spec_from_file_location('ir', 'prcl/retrieval/__init__.py'); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.parser().parse_args("
            "['--model', 'm', '--qrels', 'r', '--out', 'o']); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---- BEIR-layout training data for `prcl train` (prcl.training.data) ---------------------------------------

def beir_dir(tmp_path, qrels_lines):
    jsonl(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(6)])
    jsonl(tmp_path / "queries.jsonl", [{"_id": f"q{i}", "text": f"query {i}"} for i in range(4)])
    (tmp_path / "qrels").mkdir()
    return write(tmp_path / "qrels" / "train.tsv", ["query-id\tcorpus-id\tscore"] + qrels_lines)


def test_beir_train_qrels_give_the_jsonl_readers_examples(tmp_path):
    from prcl.training.data import parse_example, read_beir, read_examples

    qrels = beir_dir(tmp_path, ["q0\td0\t3", "q0\td1\t2", "q0\td2\t0", "q0\td3\t1", "q1\td4\t3",
                                "q1\td5\t3", "q2\td1\t2", "q2\td0\t-1"])
    want = [parse_example(json.dumps(o)) for o in (
        {"query": "query 0", "positive": ["doc 0"],
         "graded": [{"text": "doc 1", "relevance": 2 / 3}, {"text": "doc 2", "relevance": 0},
                    {"text": "doc 3", "relevance": 1 / 3}]},
        {"query": "query 1", "positive": ["doc 4", "doc 5"]})]
    got = read_beir(qrels)
    assert got[:2] == want
    # a query whose best document is below the file's top grade: graded documents, no positive; grades <= 0
    # were judged irrelevant: relevance 0
    assert (got[2].positives, got[2].graded, got[2].negatives) == ((), (("doc 1", 2 / 3), ("doc 0", 0.0)), ())
    assert read_examples(qrels) == got  # the path `prcl train --data` takes
    queries, corpus, judged = read_split(qrels)  # `prcl eval --qrels` without --corpus/--queries
    assert len(queries) == 4 and len(corpus) == 6 and judged["q0"] == {"d0": 3, "d1": 2, "d2": 0, "d3": 1}
    trec = write(tmp_path / "qrels" / "trec.tsv", ["q1 0 d4 1", "q1 0 d5 1"])
    assert read_beir(trec) == [want[1]]


def test_beir_stream_resumes(tmp_path):
    from prcl.training.data import ExampleStream

    qrels = beir_dir(tmp_path, [f"q{i}\td{i}\t1" for i in range(4)])
    stream = ExampleStream(str(qrels), block_size=3, seed=1)
    it = iter(stream)
    taken = [next(it).query for _ in range(5)]
    assert sorted(taken[:4]) == [f"query {i}" for i in range(4)]  # one epoch holds every query once
    state = stream.state_dict()
    rest = [next(it).query for _ in range(6)]
    resumed = ExampleStream(str(qrels), block_size=3, seed=1)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2).query for _ in range(6)] == rest


@pytest.mark.parametrize("lines,lineno,reason", [
    (["q9\td0\t1"], 2, "query-id 'q9' is not in"),
    (["q0\td0\t1", "q0\td9\t1"], 3, "corpus-id 'd9' is not in"),
    (["q0\td0\t1", "q0\td1\tx"], 3, "grade must be an integer"),
])
def test_beir_train_bad_lines(tmp_path, lines, lineno, reason):
    from prcl.training.data import read_beir

    qrels = beir_dir(tmp_path, lines)
    with pytest.raises(ValueError, match=f"^{qrels}:{lineno}: {reason}"):
        read_beir(qrels)


def test_beir_train_needs_a_relevant_pair(tmp_path):
    from prcl.training.data import read_beir

    qrels = beir_dir(tmp_path, ["q0\td0\t0"])
    with pytest.raises(ValueError, match="no pair has a grade above 0"):
        read_beir(qrels)
