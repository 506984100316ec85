"""The CLI as a careless or hostile user meets it: options, configs, data files, run folders, checkpoints.

Each class of fault gets a test that runs the command (main(argv)) and checks the exit status, the one line
on stderr (no traceback) and that nothing outside --out was written. The model load is replaced by the tiny
random Llama where a test is about files, not weights.
"""
import errno
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch

from prcl.files import load_errors, run_lock
from prcl.retrieval import cli as eval_cli
from prcl.retrieval import compute_metrics, read_corpus, read_split, write_run
from prcl.training import checkpoint
from prcl.training.cli import encode_main, train_main

sys.path.insert(0, str(Path(__file__).parent))
from test_training import LINES, tiny_encoder, toy_rows, write_jsonl  # noqa: E402
from tiny_llm import tiny_model_and_tokenizer  # noqa: E402

TINY = ["--max-steps", "2", "--batch-size", "4", "--checkpoint-every", "1", "--warmup-steps", "0", "--lora-r", "4",
        "--no-progress"]


def error_line(capsys):
    """The one line a failed command wrote to stderr (log lines before it are allowed, a traceback is not)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def fast_model(monkeypatch):
    """prcl train loads the tiny encoder instead of reading --model (which must still exist)."""
    import prcl.training.loop as loop

    monkeypatch.setattr(loop, "load_encoder", lambda cfg: tiny_encoder(r=cfg.lora_r))


@pytest.fixture
def run(tmp_path, fast_model):
    """argv of a two-step prcl train in tmp_path/out (data in tmp_path/train.jsonl)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # a model directory to check_model_path
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    return ["--model", str(tmp_path / "model"), "--data", data, "--out", str(tmp_path / "out"), *TINY]


class Timeout(Exception):
    pass


@pytest.fixture
def no_hang():
    """Fail a test that blocks (a FIFO read) instead of hanging the suite."""
    def expire(signum, frame):
        raise Timeout("blocked")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---- options and configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--max-grad-norm", "-1"], "max_grad_norm: must be a finite number > 0, got -1.0"),
    (["--max-grad-norm", "0"], "max_grad_norm: must be a finite number > 0, got 0.0"),
    (["--weight-decay", "nan"], "weight_decay: must be a finite number, got nan"),
    (["--weight-decay", "-0.1"], "weight_decay and lora_dropout: expected weight_decay >= 0 and lora_dropout in "
                                 "[0, 1), got -0.1 and 0.05"),
    (["--scale", "inf"], "scale: must be a finite number > 0, got inf"),
    (["--lr", "nan"], "lr: must be a finite number > 0, got nan"),
    (["--bias=-inf"], "bias: must be a finite number, got -inf"),
    (["--dtype", "foo"], "dtype: expected one of float32, bfloat16, float16, got 'foo'"),
    (["--device", "bogus"], "device: unknown device 'bogus'; expected cpu, cuda or cuda:N"),
    (["--dist-timeout", "inf"], "dist_timeout: must be a finite number > 0, got inf"),
    (["--dist-timeout", "1e300"], "dist_timeout: at most 31536000 seconds (a year), got 1e+300"),
    (["--allow-data-change"], "allow_data_change: only with --resume"),
    (["--lora-alpha", "0"], "lora_alpha: must be > 0 (LoRA's update is scaled by lora_alpha / lora_r: 0 trains "
                            "nothing), got 0"),
])
def test_bad_option_is_one_line_naming_it(run, capsys, flags, message):
    assert train_main(run + flags) == 1
    assert error_line(capsys) == f"prcl train: error: {message}"
    assert not Path(run[5]).exists()


def test_device_cuda_without_cuda(run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, as a CPU-only one
    assert train_main(run + ["--device", "cuda"]) == 1
    assert error_line(capsys) == ("prcl train: error: device: 'cuda', but torch sees 0 CUDA device(s) here; pass "
                                  "--device cpu")


def test_scale_that_overflows_is_not_blamed_on_lr(run, capsys):
    assert train_main(run + ["--scale", "1e30"]) == 1
    line = error_line(capsys)
    assert line.startswith("prcl train: error: step 1: non-finite loss") and "--lr is not the cause" in line
    assert "check --scale and --bias" in line


@pytest.mark.parametrize("name, text, message", [
    ("c.toml", 'eval_k = "15"\n', "config: eval_k in {path} must be a list of ints, got '15'"),
    ("c.toml", "eval_k = [1, true]\n", "config: eval_k in {path} must be a list of ints, got [1, True]"),
    ("c.toml", "max_stepz = 3\n", "config: unknown key 'max_stepz' in {path}"),
    ("c.toml", "lr = true\n", "config: lr in {path} must be float, got True"),  # not lr = 1.0
    ("c.json", '{"weight_decay": false}', "config: weight_decay in {path} must be float, got False"),
    ("c.toml", 'max_steps = "3"\n', "config: max_steps in {path} must be int, got '3'"),
    ("c.toml", "max_steps = \n", "config: {path}: not valid TOML (Invalid value (at line 1, column 13))"),
    ("c.json", "[1, 2]", "config: {path} must hold an object of options, got list"),
    ("c.json", "{", "config: {path}: not valid JSON (Expecting property name enclosed in double quotes: "
                    "line 1 column 2 (char 1))"),
    ("c.json", b"\xff{}", "config: {path}: not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: "
                          "invalid start byte)"),
])
def test_bad_config_file_is_one_line_naming_file_and_key(run, tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert train_main(run + ["--config", str(path)]) == 1
    assert error_line(capsys) == "prcl train: error: " + message.format(path=path)


def test_a_bool_is_no_number_for_the_api_either(run):
    from prcl.training.cli import parse_train_args

    cfg = parse_train_args(run)
    cfg.scale = True  # TrainConfig built in Python, no config file to type-check it
    with pytest.raises(ValueError, match="scale: must be a finite number > 0, got True"):
        cfg.validate()


def test_config_eval_k_int_and_bom(run, tmp_path):
    from prcl.training.cli import parse_train_args

    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"eval_k": 15, "max-steps": 7}).encode())  # a BOM, as editors write
    cfg = parse_train_args(run + ["--config", str(path)])
    assert cfg.eval_k == (15,) and cfg.max_steps == 2  # the flag wins over the config


def test_missing_config_file(run, tmp_path, capsys):
    assert train_main(run + ["--config", str(tmp_path / "nope.toml")]) == 1
    assert error_line(capsys) == f"prcl train: error: config: no such file '{tmp_path / 'nope.toml'}'"


def test_debug_environment_variable_shows_the_traceback(run, monkeypatch):
    monkeypatch.setenv("PRCL_DEBUG", "1")
    with pytest.raises(ValueError, match="max_grad_norm"):
        train_main(run + ["--max-grad-norm", "-1"])


def test_argparse_errors_exit_2(run):
    with pytest.raises(SystemExit) as e:
        train_main(run + ["--max-steps", "x"])
    assert e.value.code == 2


def test_bench_threads_must_be_positive(capsys):
    from prcl.tools.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--threads", "-1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m prcl bench: error: argument --threads: must be >= 1, got -1")


# ---- reads: regular files only, checked before opening ----------------------------------------------------

def fifo(path):
    os.mkfifo(path)
    return str(path)


def test_fifo_as_data_or_config_or_eval_is_refused_without_blocking(run, tmp_path, capsys, no_hang):
    pipe = fifo(tmp_path / "pipe.jsonl")
    for flag in ("--data", "--eval", "--config"):
        argv = run + [flag, pipe]
        assert train_main(argv) == 1
        what = flag.lstrip("-")
        assert error_line(capsys) == (f"prcl train: error: {what}: '{pipe}' is not a regular file (a FIFO, socket or "
                                      "device); pass a file")


def test_fifo_as_qrels_corpus_or_encode_data_is_refused_without_blocking(model_dir, tmp_path, capsys, no_hang):
    pipe = fifo(tmp_path / "pipe")
    qrels = beir(tmp_path / "set")
    assert eval_cli.main(["--model", str(model_dir), "--qrels", pipe, "--corpus", pipe, "--queries", pipe,
                    "--out", str(tmp_path / "o")]) == 1
    assert error_line(capsys).endswith("is not a regular file (a FIFO, socket or device); pass a file")
    assert eval_cli.main(["--model", str(model_dir), "--qrels", str(qrels), "--corpus", pipe,
                    "--out", str(tmp_path / "o")]) == 1
    assert error_line(capsys) == (f"prcl eval: error: corpus: '{pipe}' is not a regular file (a FIFO, socket or "
                                  "device); pass a file")
    assert encode_main(["--model", str(model_dir), "--data", pipe, "--out", str(tmp_path / "e.npy")]) == 1
    assert error_line(capsys) == (f"prcl encode: error: data: '{pipe}' is not a regular file (a FIFO, socket or "
                                  "device); pass a file")


def beir(root, qrels_lines=("q0\td0\t2", "q0\td1\t1", "q1\td2\t1", "q1\td3\t0"), n_docs=8):
    """A BEIR-layout set: root/corpus.jsonl, root/queries.jsonl, root/qrels/test.tsv; returns the qrels path."""
    (root / "qrels").mkdir(parents=True)
    write_jsonl(root / "corpus.jsonl", [{"_id": f"d{i}", "text": LINES[i]} for i in range(n_docs)])
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": " ".join(LINES[i].split()[:3])} for i in range(3)])
    path = root / "qrels" / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for line in qrels_lines))
    return path


def test_beir_training_data_without_corpus(run, tmp_path, capsys):
    qrels = beir(tmp_path / "set")
    (tmp_path / "set" / "corpus.jsonl").unlink()
    assert train_main(run + ["--data", str(qrels)]) == 1
    assert error_line(capsys) == f"prcl train: error: corpus: no such file '{tmp_path / 'set' / 'corpus.jsonl'}'"


def test_beir_training_data_with_a_fifo_corpus_and_skip_bad_lines(run, tmp_path, capsys, no_hang):
    """--skip-bad-lines skips the up-front check of the data; the fingerprint still must not read a FIFO."""
    qrels = beir(tmp_path / "set")
    corpus = tmp_path / "set" / "corpus.jsonl"
    corpus.unlink()
    fifo(corpus)
    assert train_main(run + ["--data", str(qrels), "--skip-bad-lines"]) == 1
    assert error_line(capsys) == (f"prcl train: error: data: '{corpus}' is not a regular file (a FIFO, socket or "
                                  "device); pass a file")


def test_eval_file_faults_are_found_before_the_evaluation(model_dir, tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the file fault was found")

    monkeypatch.setattr(eval_cli, "load_encode", no_model)
    qrels = beir(tmp_path / "set")
    base = ["--model", str(model_dir), "--qrels", str(qrels)]
    (tmp_path / "file").write_text("x")
    cases = [
        (["--out", str(tmp_path / "file")], f"out: '{tmp_path / 'file'}' is a file; --out takes a directory"),
        (["--out", str(tmp_path / "o"), "--corpus", str(tmp_path)],
         f"corpus: '{tmp_path}' is a directory; expected a file"),
    ]
    for extra, message in cases:
        assert eval_cli.main(base + extra) == 1
        assert error_line(capsys) == f"prcl eval: error: {message}"
    loose = tmp_path / "test.tsv"
    shutil.copy(qrels, loose)
    assert eval_cli.main(["--model", str(model_dir), "--qrels", str(loose), "--out", str(tmp_path / "o")]) == 1
    assert error_line(capsys) == (
        f"prcl eval: error: qrels: {loose} is not in a qrels/ folder (the BEIR layout is DIR/qrels/SPLIT.tsv beside "
        "DIR/corpus.jsonl and DIR/queries.jsonl); move it there, or (prcl eval) pass --corpus and --queries")
    # prcl train has no --corpus: the same data as training data
    assert train_main(["--model", str(model_dir), "--data", str(loose), "--out", str(tmp_path / "t")]) == 1
    assert error_line(capsys) == (
        f"prcl train: error: qrels: {loose} is not in a qrels/ folder (the BEIR layout is DIR/qrels/SPLIT.tsv beside "
        "DIR/corpus.jsonl and DIR/queries.jsonl); move it there, or (prcl eval) pass --corpus and --queries")


def test_qrels_linked_into_another_dataset_is_refused(model_dir, tmp_path, capsys):
    other = beir(tmp_path / "other")
    (tmp_path / "mine" / "qrels").mkdir(parents=True)
    link = tmp_path / "mine" / "qrels" / "test.tsv"
    link.symlink_to(other)
    assert eval_cli.main(["--model", str(model_dir), "--qrels", str(link), "--out", str(tmp_path / "o")]) == 1
    assert error_line(capsys) == (
        f"prcl eval: error: qrels: {link} is a link into {other.parent}, another folder than the one it is in; "
        "put a copy there, or (prcl eval) pass --corpus and --queries to say which corpus to read")


@pytest.mark.parametrize("prog", ["prcl eval", "prcl encode", "prcl export"])
def test_a_model_path_that_does_not_exist(tmp_path, capsys, prog):
    command, argv = {p: (c, a) for p, c, a in model_commands(tmp_path)}[prog]
    assert command(["--model", "some-org/no-model"] + argv) == 1
    assert error_line(capsys) == (f"{prog}: error: model: no such file or directory 'some-org/no-model' ({prog} "
                                  "loads local models only: a model directory or a .gguf file)")


def unloadable(model_dir, tmp_path, what):
    """A path prcl's checks let through (it exists) that transformers cannot load."""
    bad = tmp_path / what
    if what == "text-file":
        bad.write_text("not a model\n")
    elif what == "bad-modules-json":  # a sentence-transformers folder to prcl eval; no config.json for the others
        bad.mkdir()
        (bad / "modules.json").write_text("[{bad")
    elif what == "config-list":  # valid JSON of the wrong shape: transformers raises a TypeError
        shutil.copytree(model_dir, bad)
        (bad / "config.json").write_text("[1, 2]")
    else:  # the tiny model without its tokenizer, or with its weights cut short
        shutil.copytree(model_dir, bad)
        if what == "no-tokenizer":
            for f in bad.iterdir():
                if "token" in f.name:
                    f.unlink()
        else:
            weights = bad / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
    return bad


UNLOADABLE = ["text-file", "bad-modules-json", "config-list", "no-tokenizer", "damaged-weights"]


@pytest.mark.parametrize("what", UNLOADABLE)
def test_a_model_that_does_not_load_is_one_line_naming_it(model_dir, tmp_path, capsys, what):
    bad = str(unloadable(model_dir, tmp_path, what))
    for prog, command, argv in model_commands(tmp_path):
        assert command(["--model", bad] + argv) == 1
        line = error_line(capsys)
        assert line.startswith(f"{prog}: error: model: {bad}: cannot load ("), line
        os.rename(bad, tmp_path / "moved")
        os.mkdir(bad)  # empty: refused before any load
        assert command(["--model", bad] + argv) == 1
        assert error_line(capsys) == f"{prog}: error: model: {bad!r} holds neither config.json nor modules.json: not a model directory"
        os.rmdir(bad)
        os.rename(tmp_path / "moved", bad)


@pytest.mark.parametrize("what", UNLOADABLE)
def test_a_teacher_that_does_not_load_is_one_line_and_leaves_out_as_it_was(run, model_dir, tmp_path, capsys, what):
    bad = str(unloadable(model_dir, tmp_path, what))
    assert train_main(run + ["--teacher", bad]) == 1
    line = error_line(capsys)
    assert line.startswith(f"prcl train: error: teacher: {bad}: cannot load ("), line
    assert train_main(run + ["--teacher", str(model_dir)]) == 0  # no "OUT holds another run"
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert train_main(run + ["--overwrite", "--teacher", bad]) == 1  # the finished run is still there
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before and "checkpoint-2" in before


def model_commands(tmp_path):
    """(prog, main, argv without --model) of every command that loads a model."""
    from prcl.encoders.export import main as export_main

    qrels = beir(tmp_path / "set")
    write_jsonl(tmp_path / "t.jsonl", ['"a text"'])
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    return [("prcl train", train_main, ["--data", data, "--out", str(tmp_path / "run"), *TINY]),
            ("prcl eval", eval_cli.main, ["--qrels", str(qrels), "--out", str(tmp_path / "o")]),
            ("prcl encode", encode_main, ["--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "e.npy")]),
            ("prcl export", export_main, ["--out", str(tmp_path / "st")])]


class DeviceOOM(torch.cuda.OutOfMemoryError):
    pass


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   DeviceOOM("a backend's own kind"), RuntimeError("MPS backend out of memory"),
                                   MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")],
                         ids=["cuda", "subclass", "mps", "host", "enomem"])
def test_running_out_of_memory_while_loading_keeps_its_type(error):
    """Not "the model does not load": a caller that catches out-of-memory still can."""
    with pytest.raises(type(error)), load_errors("model", "m"):
        raise error


def test_a_fifo_anywhere_in_a_model_folder_is_refused_without_blocking(model_dir, tmp_path, capsys, no_hang):
    """sentence-transformers reads files its modules.json points to (1_Pooling/config.json): a FIFO there
    would block the load; every file of the folder is checked first."""
    bad = tmp_path / "fifo-model"
    shutil.copytree(model_dir, bad)
    (bad / "1_Pooling").mkdir()
    os.mkfifo(bad / "1_Pooling" / "config.json")
    for prog, command, argv in model_commands(tmp_path):
        assert command(["--model", str(bad)] + argv) == 1
        assert error_line(capsys) == (f"{prog}: error: model: {str(bad / '1_Pooling' / 'config.json')!r} is not a "
                                      "regular file (a FIFO, socket or device); pass a file")


def test_a_bad_pooling_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import prcl.encoders.llm as llm

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --pooling was checked")

    monkeypatch.setattr(llm.LLMEncoder, "from_pretrained", no_load)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for prog, command, argv in model_commands(tmp_path)[:3]:  # prcl export checks its own poolings
        if prog == "prcl train":
            argv = argv + ["--teacher", str(tmp_path / "model")]  # named before the teacher loads too
        assert command(["--model", str(tmp_path / "model"), "--pooling", "bogus"] + argv) == 1
        assert error_line(capsys) == f"{prog}: error: pooling: expected one of ('mean', 'last', 'weighted_mean'), got 'bogus'"


def test_overwrite_keeps_the_old_run_when_the_model_does_not_load(model_dir, tmp_path, capsys):
    prog, command, argv = model_commands(tmp_path)[0]
    assert command(["--model", str(model_dir)] + argv) == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    bad = str(unloadable(model_dir, tmp_path, "damaged-weights"))
    assert command(["--model", bad, "--overwrite"] + argv) == 1
    assert error_line(capsys).startswith(f"{prog}: error: model: {bad}: cannot load (")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before and "checkpoint-2" in before


def test_a_directory_in_place_of_out_config_json(run, tmp_path, capsys):
    (tmp_path / "out" / "config.json").mkdir(parents=True)
    assert train_main(run) == 1
    assert error_line(capsys) == f"prcl train: error: {tmp_path / 'out' / 'config.json'}: Is a directory"
    assert not (tmp_path / "out" / "config.json.tmp").exists()


def test_an_empty_teacher_is_refused(run, tmp_path, capsys):
    assert train_main(run + ["--teacher", ""]) == 1
    assert error_line(capsys) == "prcl train: error: teacher: an empty path"
    config = tmp_path / "c.json"
    config.write_text('{"teacher": ""}')
    assert train_main(run + ["--config", str(config)]) == 1
    assert error_line(capsys) == "prcl train: error: teacher: an empty path"


def test_encode_output_and_text_faults(model_dir, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_bytes("first line\nsecond \xe9\n".encode("latin-1"))
    base = ["--model", str(model_dir)]
    (tmp_path / "dir.npy").mkdir()
    cases = [
        (["--data", str(texts), "--out", str(tmp_path / "dir.npy")],
         f"out: '{tmp_path / 'dir.npy'}' is a directory; --out takes a new or regular file, never written through "
         "a link"),
        (["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "e.npy")],
         f"data: no such file '{tmp_path / 'missing.txt'}'"),
        (["--data", str(texts), "--out", str(tmp_path / "e.npy")],
          f"{texts}:2: not UTF-8 (invalid continuation byte at byte 7)"),
    ]
    for extra, message in cases:
        assert encode_main(base + extra) == 1
        assert error_line(capsys) == f"prcl encode: error: {message}"
    assert not (tmp_path / "e.npy").exists()


def test_encode_strips_a_utf8_bom(model_dir, tmp_path):
    import numpy as np

    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("a cat\n")
    bom.write_bytes(b"\xef\xbb\xbf" + b"a cat\n")
    for path in (plain, bom):
        assert encode_main(["--model", str(model_dir), "--data", str(path), "--out", str(path) + ".npy"]) == 0
    assert np.array_equal(np.load(str(plain) + ".npy"), np.load(str(bom) + ".npy"))


def test_bom_opening_training_data_and_beir_files_is_dropped(tmp_path):
    from prcl.training.data import read_examples

    rows = toy_rows()[:2]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert [ex.query for ex in read_examples(path)] == [r["query"] for r in rows]
    qrels = beir(tmp_path / "set")
    for f in (qrels, tmp_path / "set" / "corpus.jsonl", tmp_path / "set" / "queries.jsonl"):
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    queries, corpus, judged = read_split(qrels)
    assert "q0" in queries and "d0" in corpus and judged["q0"] == {"d0": 2, "d1": 1}


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_bad_device_for_eval_encode_and_bench(model_dir, tmp_path, capsys, device):
    from prcl.tools.bench.cli import main as bench_main

    qrels = beir(tmp_path / "set")
    write_jsonl(tmp_path / "t.jsonl", ['"a text"'])
    want = (f"device: unknown device {device!r}; expected cpu, cuda or cuda:N" if device == "bogus" else
            f"device: {device!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) here; pass --device cpu")
    assert eval_cli.main(["--model", str(model_dir), "--qrels", str(qrels), "--out", str(tmp_path / "o"),
                    "--device", device]) == 1
    assert error_line(capsys).startswith(f"prcl eval: error: {want}")
    assert encode_main(["--model", str(model_dir), "--data", str(tmp_path / "t.jsonl"),
                        "--out", str(tmp_path / "e.npy"), "--device", device]) == 1
    assert error_line(capsys).startswith(f"prcl encode: error: {want}")
    assert bench_main(["--device", device]) == 2
    assert capsys.readouterr().out.strip().startswith(f"prcl bench: {want}")


def test_adapter_from_another_base_model(model_dir, tmp_path, capsys):
    from prcl.encoders import LLMEncoder

    model, tok = tiny_model_and_tokenizer("llama", hidden_size=64, intermediate_size=128)
    other = tmp_path / "other"
    model.save_pretrained(other)
    tok.save_pretrained(other)
    LLMEncoder.from_pretrained(other).add_lora(r=4, alpha=8).save_adapter(tmp_path / "adapter")
    write_jsonl(tmp_path / "t.jsonl", ['"a text"'])
    argv = ["--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "e.npy"),
            "--adapter", str(tmp_path / "adapter")]
    assert encode_main(["--model", str(model_dir)] + argv) == 1
    assert error_line(capsys) == (f"prcl encode: error: adapter: {tmp_path / 'adapter'} was trained on {other}, not "
                                  f"on {model_dir}; pass the --model it was trained with")
    # a copy of the same model under the adapter's base name: the shapes tell
    renamed = tmp_path / "x" / "other"
    shutil.copytree(model_dir, renamed)
    assert encode_main(["--model", str(renamed)] + argv) == 1
    line = error_line(capsys)
    assert line.startswith(f"prcl encode: error: adapter: {tmp_path / 'adapter'} does not fit this model (size "
                           "mismatch for") and line.endswith("pass the --model it was trained with")


def test_adapter_of_a_model_loaded_as_dot_fits_it_from_anywhere(model_dir, tmp_path, monkeypatch):
    """A model's folder named "." where the adapter was trained (or where it is used) is still that model."""
    from prcl.encoders import LLMEncoder

    monkeypatch.chdir(model_dir)
    LLMEncoder.from_pretrained(".").add_lora(r=4, alpha=8).save_adapter(tmp_path / "adapter")
    write_jsonl(tmp_path / "t.jsonl", ['"a text"'])
    argv = ["--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "e.npy"),
            "--adapter", str(tmp_path / "adapter")]
    monkeypatch.chdir(tmp_path)
    assert encode_main(["--model", str(model_dir)] + argv) == 0
    LLMEncoder.from_pretrained(str(model_dir)).add_lora(r=4, alpha=8).save_adapter(tmp_path / "adapter")
    monkeypatch.chdir(model_dir)
    assert encode_main(["--model", "."] + argv) == 0


# ---- writes: never through a link -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "eval.jsonl", "head.json", "adapter",
                                  "checkpoint-1/state.json"])
def test_a_link_in_the_run_folder_is_refused_and_its_target_untouched(run, tmp_path, capsys, name):
    assert train_main(run) == 0
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    if name == "adapter":
        victim.mkdir()
        (victim / "keep").write_text("precious")
    else:
        victim.write_text("precious")
    target = out / name
    remove = shutil.rmtree if target.is_dir() else os.unlink
    if target.exists():
        remove(target)
    target.symlink_to(victim)
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    assert error_line(capsys) == (f"prcl train: error: out: {target} is a symbolic link; prcl writes --out only "
                                  "through paths that are not links: remove it, or choose another --out")
    assert (victim / "keep" if name == "adapter" else victim).read_text() == "precious"


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoint-2/manifest.json", "eval.jsonl"])
def test_a_fifo_in_the_run_folder_is_refused_without_blocking(run, tmp_path, capsys, no_hang, name):
    """--resume reads metrics.jsonl and each manifest.json and appends to eval.jsonl: a FIFO there would block."""
    assert train_main(run) == 0
    target = tmp_path / "out" / name
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    assert error_line(capsys) == (f"prcl train: error: out: {target} is not a regular file or folder (a FIFO, "
                                  "socket or device would block a read or write): remove it, or choose another --out")


def test_overwrite_with_a_linked_checkpoint_folder(run, tmp_path, capsys):
    assert train_main(run) == 0
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "checkpoint-2", elsewhere)
    (out / "checkpoint-2").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    assert train_main(run + ["--overwrite"]) == 1
    assert error_line(capsys) == (f"prcl train: error: out: {out / 'checkpoint-2'} is a symbolic link; prcl writes "
                                  "--out only through paths that are not links: remove it, or choose another --out")
    assert sorted(p.name for p in elsewhere.iterdir()) == before


def test_writes_never_follow_a_link_made_after_the_check(tmp_path):
    from prcl.files import append_text, write_text

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError) as e:
        append_text(tmp_path / "metrics.jsonl", "{}\n")
    assert e.value.errno == errno.ELOOP
    write_text(tmp_path / "metrics.jsonl", "{}\n")  # replaces the link itself
    assert victim.read_text() == "precious" and not (tmp_path / "metrics.jsonl").is_symlink()


def test_writes_never_go_into_a_hard_linked_file(tmp_path):
    """A hard link is a link too: the other name (a file outside --out) keeps its content."""
    from prcl.files import append_text, write_text

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / "eval.jsonl")
    append_text(tmp_path / "eval.jsonl", "{}\n")
    assert victim.read_text() == "precious\n" and (tmp_path / "eval.jsonl").read_text() == "precious\n{}\n"
    os.link(victim, tmp_path / "config.json.tmp")  # planted where write_text writes before its rename
    write_text(tmp_path / "config.json", "{}\n")
    assert victim.read_text() == "precious\n" and (tmp_path / "config.json").read_text() == "{}\n"


def test_eval_out_with_a_linked_run_file(model_dir, tmp_path, capsys):
    qrels = beir(tmp_path / "set")
    (tmp_path / "o").mkdir()
    (tmp_path / "victim").write_text("precious")
    (tmp_path / "o" / "run.trec").symlink_to(tmp_path / "victim")
    assert eval_cli.main(["--model", str(model_dir), "--qrels", str(qrels), "--out", str(tmp_path / "o")]) == 1
    assert error_line(capsys) == (f"prcl eval: error: out: {tmp_path / 'o' / 'run.trec'} is a symbolic link; prcl "
                                  "eval writes only through paths that are not links: remove it, or choose another "
                                  "--out")
    assert (tmp_path / "victim").read_text() == "precious"


# ---- one run per folder -----------------------------------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused(run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with run_lock(out):  # the first run, still going
        assert train_main(run) == 1
    assert error_line(capsys) == (
        f"prcl train: error: out: {out} is in use by another prcl train (pid {os.getpid()} on host "
        f"{socket.gethostname()}; lock file {out / '.prcl-train.lock'}); wait for it to finish or choose another --out")
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_runs_started_together_on_one_out(model_dir, tmp_path):
    """Two `prcl train` processes on one --out: one trains, the other stops with one line (the lock, or the
    finished run's checkpoints if it came late); metrics.jsonl holds one run's steps, in order."""
    import subprocess

    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    argv = [sys.executable, "-m", "prcl", "train", "--model", str(model_dir), "--data", data,
            "--out", str(tmp_path / "out"), *TINY, "--max-steps", "4"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1).strip().splitlines()
    assert "Traceback" not in "".join(err)
    assert "is in use by another prcl train (pid" in err[-1] or "already holds checkpoint-" in err[-1], err[-1]
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_second_run_while_the_first_renames_a_checkpoint(run, tmp_path, capsys, monkeypatch):
    """The first run renames .checkpoint-N.tmp while the second looks for links in --out: what vanished is no fault."""
    out = tmp_path / "out"
    (out / ".checkpoint-3.tmp").mkdir(parents=True)
    (out / ".checkpoint-3.tmp" / "rng-0.safetensors").write_bytes(b"")
    real = os.lstat

    def renamed_meanwhile(path, *a, **k):
        if str(path).endswith("rng-0.safetensors"):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "lstat", renamed_meanwhile)
    with run_lock(out):
        assert train_main(run) == 1
    assert "is in use by another prcl train" in error_line(capsys)


def test_a_lock_file_removed_during_the_run_is_not_an_error_nor_removes_another(tmp_path):
    with run_lock(tmp_path):
        os.unlink(tmp_path / ".prcl-train.lock")  # a careless rm while the run goes on
    with run_lock(tmp_path):
        os.unlink(tmp_path / ".prcl-train.lock")
        (tmp_path / ".prcl-train.lock").write_text("pid 1 on host other\n")  # a second run's lock, since
    assert (tmp_path / ".prcl-train.lock").read_text() == "pid 1 on host other\n"


def test_a_stale_lock_is_taken_over_with_a_warning(run, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".prcl-train.lock").write_text("pid 999999 on host gone\n")  # its process died holding it
    assert train_main(run) == 0
    assert "taking over the lock" in caplog.text and "pid 999999 on host gone" in caplog.text
    assert not (out / ".prcl-train.lock").exists()  # released at the end


def test_a_hard_link_as_the_lock_file_is_not_written_into(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, out / ".prcl-train.lock")
    assert train_main(run) == 0
    assert victim.read_text() == "precious\n"


# ---- resume: the same data, a checkpoint that holds what prcl writes --------------------------------------

@pytest.mark.parametrize("change", ["prepend", "truncate"])
def test_resume_on_changed_data_is_refused_unless_allowed(run, tmp_path, capsys, caplog, change):
    assert train_main(run) == 0
    data = tmp_path / "train.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text(lines[0] + "".join(lines) if change == "prepend" else "".join(lines[:-3]))
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"prcl train: error: resume: the data changed since {tmp_path / 'out' / 'checkpoint-2'} "
                           f"was written: {data} is {data.stat().st_size} bytes")
    assert line.endswith("resume with the run's data, or pass --allow-data-change to continue from the saved "
                         "position in the new data")
    assert train_main(run + ["--resume", "--max-steps", "3", "--allow-data-change"]) == 0
    assert "resume: the data changed (--allow-data-change)" in caplog.text


def test_allow_data_change_goes_on_at_the_next_line_when_the_position_is_inside_one(run, tmp_path, caplog):
    """A line prepended moves the saved block start inside a line: --allow-data-change continues, it does not
    stop at "not a position" (which a forged position without a data change still gets)."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows() * 3)
    assert train_main(run + ["--shuffle-block", "4"]) == 0
    offset = json.loads((tmp_path / "out" / "checkpoint-2" / "state.json").read_text())["data"]["offset"]
    text = Path(data).read_text()
    assert 0 < offset < len(text) and text[offset - 1] == "\n"  # a block start in the middle of the file
    Path(data).write_text('{"query": "q", "positive": "p"}\n' + text)
    assert text.encode()[offset - 1:offset] == b"\n" and Path(data).read_bytes()[offset - 1:offset] != b"\n"
    assert train_main(run + ["--shuffle-block", "4", "--resume", "--max-steps", "3", "--allow-data-change"]) == 0
    assert "going on at {'epoch': 0, 'offset': " in caplog.text
    assert json.loads((tmp_path / "out" / "checkpoint-3" / "state.json").read_text())["step"] == 3


def test_resume_names_the_options_changed_since_the_last_start(run, model_dir, tmp_path, caplog):
    """Another teacher, loss or scale on resume is allowed (as another schedule is) but said; the options of the
    command (--resume itself, --no-progress) are not training options."""
    assert train_main(run) == 0
    caplog.clear()
    assert train_main(run + ["--resume", "--max-steps", "3", "--scale", "10", "--teacher", str(model_dir)]) == 0
    said = [r.getMessage() for r in caplog.records if "options changed" in r.getMessage()]
    assert said == [f"resume: options changed since the run's last start: scale 5.0 -> 10.0, "
                    f"teacher None -> {str(model_dir)!r}"]  # not max_steps: the schedule's line says it
    caplog.clear()
    again = run + ["--resume", "--max-steps", "4", "--scale", "10", "--teacher", str(model_dir) + "/."]
    assert train_main(again) == 0  # the same teacher spelled otherwise
    assert "options changed" not in caplog.text
    other = tmp_path / "other-teacher"
    shutil.copytree(model_dir, other)
    assert train_main(run + ["--resume", "--max-steps", "5", "--scale", "10", "--teacher", str(other)]) == 0
    assert f"teacher {str(model_dir) + '/.'!r} -> {str(other)!r}" in caplog.text
    (tmp_path / "out" / "config.json").write_text('{"cut sh')
    assert train_main(run + ["--resume", "--max-steps", "6", "--scale", "10", "--teacher", str(model_dir)]) == 0
    assert "config.json is missing or unreadable; options changed since the last start are not listed" in caplog.text


def test_resume_with_the_model_named_as_dot_from_its_folder(run, tmp_path, monkeypatch):
    """--model . in the model's folder and --model /abs/path elsewhere are the same model."""
    model = run[1]
    monkeypatch.chdir(model)
    dot = list(run)
    dot[1] = "."
    assert train_main(dot) == 0
    monkeypatch.chdir(tmp_path)
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 0


def test_resume_on_rewritten_beir_qrels_is_refused(run, tmp_path, capsys):
    qrels = beir(tmp_path / "set", [f"q{i % 3}\td{i}\t1" for i in range(8)])
    argv = run + ["--data", str(qrels)]
    assert train_main(argv) == 0
    qrels.write_text(qrels.read_text().replace("d7\t1", "d7\t0"))
    assert train_main(argv + ["--resume", "--max-steps", "3"]) == 1
    assert f"{qrels} is " in error_line(capsys)


def tamper(out, edit, step=2):
    """Edit checkpoint-STEP's state.json (edit(state) changes it in place) and re-sign the manifest, as a
    forger would: the files then match the manifest."""
    path = out / f"checkpoint-{step}"
    state = json.loads((path / "state.json").read_text())
    edit(state)
    (path / "state.json").write_text(json.dumps(state))
    checkpoint.write_manifest(path)


def set_key(*keys, value):
    def edit(state):
        target = state
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (set_key("step", value=1.5), "state.json: step must be the int in the folder's name, got 1.5"),
    (set_key("step", value=7), "state.json: step must be the int in the folder's name, got 7"),
    (set_key("counters", "nonfinite", value=-1), "state.json: counters must be {skipped_lines, nonfinite} as ints"),
    (set_key("scheduler", "last_epoch", value="2"), "state.json: scheduler must be a scheduler state at this step"),
    (set_key("optimizer", "param_groups", value=[]), "state.json: optimizer must be {state, param_groups}"),
    (set_key("optimizer", "param_groups", 0, "betas", value=[0.9, 2]),
     "state.json: optimizer.param_groups[0] must be AdamW's settings"),
    (set_key("data", "taken", value=None), "state.json: data must be {epoch, offset, lineno, taken} as ints >= 0"),
    (set_key("settings", value={"model": "x"}), "state.json: settings must be null or an object of"),
    (set_key("data_fingerprint", value="x"), "state.json: data_fingerprint must be null or a list"),
])
def test_forged_state_is_named_not_loaded(run, tmp_path, capsys, edit, message):
    assert train_main(run + ["--keep-checkpoints", "1"]) == 0
    tamper(tmp_path / "out", edit)
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"prcl train: error: resume: no intact checkpoint in {tmp_path / 'out'}: ")
    assert message in line


def test_forged_data_position_past_the_end_is_named(run, tmp_path, capsys):
    assert train_main(run) == 0
    size = (tmp_path / "train.jsonl").stat().st_size
    tamper(tmp_path / "out", set_key("data", "offset", value=size + 100))
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    state = tmp_path / "out" / "checkpoint-2" / "state.json"
    assert error_line(capsys).startswith(f"prcl train: error: resume: {state}: data position {{'epoch': ")
    tamper(tmp_path / "out", set_key("data", "offset", value=5))  # inside the first line
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    assert f"is not a position in {tmp_path / 'train.jsonl'} ({size} bytes)" in error_line(capsys)


def test_forged_tensors_and_rng_are_named(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    assert train_main(run + ["--keep-checkpoints", "1"]) == 0
    path = tmp_path / "out" / "checkpoint-2"
    tensors = load_file(path / "tensors.safetensors")
    name = next(n for n in tensors if n.endswith(".exp_avg"))
    save_file({**tensors, name: torch.zeros(3)}, path / "tensors.safetensors")
    checkpoint.write_manifest(path)
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    assert error_line(capsys) == (f"prcl train: error: {path / 'tensors.safetensors'}: {name} (3,) fits no trained "
                                  "parameter")
    step = next(n for n in tensors if n.endswith(".step"))
    save_file({**tensors, step: torch.tensor(0.0)}, path / "tensors.safetensors")  # AdamW would divide by 0
    checkpoint.write_manifest(path)
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    assert error_line(capsys).endswith(f"tensors.safetensors: {step} must be one count of steps in [1, 2], got 0.0")
    save_file(tensors, path / "tensors.safetensors")
    save_file({"torch": torch.zeros(7, dtype=torch.uint8)}, path / "rng-0.safetensors", metadata={"python": "[]"})
    checkpoint.write_manifest(path)
    assert train_main(run + ["--resume", "--max-steps", "3"]) == 1
    assert "the rng file's torch state must be torch.uint8 of shape" in error_line(capsys)


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(run, tmp_path, capsys, monkeypatch):
    real = checkpoint.save_file

    def full_at_step_2(tensors, path, metadata=None):
        if ".checkpoint-2.tmp" in str(path):
            Path(path).write_bytes(b"\0" * 10)  # a partial file, then the device is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_at_step_2)
    assert train_main(run) == 1
    out = tmp_path / "out"
    assert error_line(capsys) == (
        f"prcl train: error: {out / 'checkpoint-2'}: not written ([Errno 28] No space left on device: "
        f"'{out / '.checkpoint-2.tmp' / 'rng-0.safetensors'}'); {out / 'checkpoint-1'} is intact: free space and "
        "pass --resume")
    assert [p.name for p in sorted(out.iterdir()) if "checkpoint" in p.name] == ["checkpoint-1"]
    checkpoint.verify(out / "checkpoint-1")
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert train_main(run + ["--resume"]) == 0


# ---- evaluation: one code path, run files as the metrics saw them -----------------------------------------

def test_train_eval_and_prcl_eval_agree_on_graded_qrels(model_dir, tmp_path, capsys):
    """Before any update the trained model is the base model (LoRA's B starts at 0): prcl train --eval's
    first evaluation and prcl eval must report the same figures on the same graded BEIR set."""
    qrels = beir(tmp_path / "set", ["q0\td0\t3", "q0\td1\t1", "q0\td4\t2", "q1\td2\t1", "q1\td3\t0", "q2\td5\t2"],
                 n_docs=len(LINES))
    assert eval_cli.main(["--model", str(model_dir), "--qrels", str(qrels), "--out", str(tmp_path / "e"), "--k", "1", "5",
                    "10"]) == 0
    assert f"prcl eval: corpus {tmp_path / 'set' / 'corpus.jsonl'}, queries {tmp_path / 'set' / 'queries.jsonl'}" in (
        capsys.readouterr().err)  # says which corpus it reads
    by_eval = json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    assert train_main(["--model", str(model_dir), "--data", data, "--eval", str(qrels), "--out", str(tmp_path / "o"),
                       *TINY, "--max-steps", "1"]) == 0
    by_train = json.loads((tmp_path / "o" / "eval.jsonl").read_text().splitlines()[0])
    assert by_train["step"] == 0 and by_train["documents"] == len(LINES) and by_train["queries"] == 3
    for key in ("ndcg@10", "mrr@10", "map@10", "recall@1", "recall@5", "recall@10"):
        assert by_train[key] == pytest.approx(by_eval[key], abs=1e-6), key
    assert 0 < by_eval["ndcg@10"] < 1  # graded gains: not a degenerate set


def test_run_file_keeps_precision_and_the_metrics_tie_order(tmp_path):
    import ir_measures

    qrels = {"q": {"a": 1}}
    close = {"q": {"a": 0.5, "b": 0.5 + 1e-7, "c": 0.1}}  # 6 decimals would make a and b tie
    tied = {"q": {"a": 0.5, "b": 0.5, "c": 0.1}}  # trec_eval breaks the tie by doc id, descending: b first
    for run in (close, tied):
        write_run(tmp_path / "run.trec", run)
        back = {}
        for r in ir_measures.read_trec_run(str(tmp_path / "run.trec")):
            back.setdefault(r.query_id, {})[r.doc_id] = r.score
        assert back == run
        ranks = [line.split()[2] for line in (tmp_path / "run.trec").read_text().splitlines()]
        assert ranks == ["b", "a", "c"]
        assert compute_metrics(qrels, back, ks=(1,)) == compute_metrics(qrels, run, ks=(1,))
        assert compute_metrics(qrels, run, ks=(1,))["recall@1"] == 0.0  # b outranks a in the metrics too


def test_ids_with_whitespace_are_refused(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d 1", "text": "x"}])
    with pytest.raises(ValueError, match=r":1: _id 'd 1' contains whitespace, which a TREC run or qrels line"):
        read_corpus(tmp_path / "corpus.jsonl")
    with pytest.raises(ValueError, match="document id 'd\\\\t1' contains whitespace"):
        write_run(tmp_path / "run.trec", {"q": {"d\t1": 1.0}})
