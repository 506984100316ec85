"""prcl train's faults and refusals: a diverging run, --out and --eval mistakes, threads, torchrun's timeout."""
import dataclasses
import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prcl.training import TrainConfig, checkpoint, train
from prcl.training.cli import HELP, REQUIRED, _train_parser, train_main

sys.path.insert(0, str(Path(__file__).parent))
from test_training import config, tiny_encoder, toy_rows, write_jsonl  # noqa: E402
from tiny_llm import tiny_model_and_tokenizer  # noqa: E402

SMALL = dict(max_steps=3, batch_size=4, mini_batch_size=None, checkpoint_every=1, warmup_steps=0)


def last_stderr_line(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar


def test_diverging_run_stops_before_a_nonfinite_checkpoint(tmp_path, capsys):
    """lr 1e30: step 1's update is finite but huge, step 2's loss is NaN: exit 1, checkpoint-1 only."""
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "model"), "--data", data, "--out", str(out), "--lr", "1e30",
            "--max-steps", "3", "--batch-size", "4", "--checkpoint-every", "1", "--warmup-steps", "0",
            "--lora-r", "4", "--no-progress"]
    assert train_main(argv) == 1
    assert last_stderr_line(capsys) == (
        "prcl train: error: step 2: non-finite loss (nan) or gradient norm (nan); stopped before the update, so "
        "every checkpoint holds finite weights. Lower --lr, set --max-grad-norm, or pass --skip-nonfinite to "
        "skip such steps")
    assert [p.name for _, p in checkpoint.checkpoint_dirs(out)] == ["checkpoint-1"]
    tensors = load_file(out / "checkpoint-1" / "tensors.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_skip_nonfinite_counts_the_skipped_steps(tmp_path):
    s = train(config(tmp_path, lr=1e30, skip_nonfinite=True, **SMALL), encoder=tiny_encoder())
    assert math.isfinite(s["losses"][0]) and all(math.isnan(x) for x in s["losses"][1:])
    assert s["nonfinite"] == 2
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"] is None, r.get("skipped")) for r in records] == [(False, None), (True, "non-finite"),
                                                                         (True, "non-finite")]
    # skipped steps leave the weights as they were: every checkpoint finite, the last two equal
    last = [load_file(p / "tensors.safetensors") for _, p in checkpoint.checkpoint_dirs(tmp_path / "out")]
    assert all(torch.isfinite(t).all() for ts in last for t in ts.values())
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0] if k.startswith("weight."))
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "state.json").read_text())
    assert state["counters"]["nonfinite"] == 2


def test_out_that_is_a_file_is_refused(tmp_path):
    cfg = config(tmp_path, **SMALL)
    Path(cfg.out).write_text("x")
    with pytest.raises(ValueError, match=f"^out: '{cfg.out}' is a file; --out takes a directory$"):
        train(cfg)


def test_out_holding_another_run_is_refused_unless_overwrite(tmp_path):
    cfg = config(tmp_path, **{**SMALL, "max_steps": 1, "checkpoint_every": 0})
    out = Path(cfg.out)
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=f"^out: {out} holds another run \\(metrics.jsonl, no checkpoint\\); "
                                         "pass --overwrite to replace it or choose another --out$"):
        train(cfg, encoder=tiny_encoder())
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    (out / "checkpoint-7").mkdir()  # another run's checkpoint: refused too, and deleted by --overwrite
    with pytest.raises(ValueError, match="already holds checkpoint-7; pass --resume to continue it, --overwrite"):
        train(cfg, encoder=tiny_encoder())
    cfg.overwrite = True
    train(cfg, encoder=tiny_encoder())
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for _, p in checkpoint.checkpoint_dirs(out)] == ["checkpoint-1"]


def test_empty_eval_file_is_refused(tmp_path):
    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"^eval: {empty} holds no examples \\(an empty file\\?\\)$"):
        train(config(tmp_path, eval=str(empty), **SMALL), encoder=tiny_encoder())


def test_cli_runs_one_thread_on_cpu_unless_told(tmp_path, monkeypatch):
    import prcl.training.loop as loop

    seen = []
    monkeypatch.setattr(loop, "train", lambda cfg: seen.append(cfg.threads) or {"eval_before": None,
                                                                                "eval_after": None})
    base = ["--data", "d.jsonl", "--out", str(tmp_path), "--device", "cpu"]
    assert train_main(base) == 0 and train_main(base + ["--threads", "3"]) == 0
    assert seen == [1, 3]

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    train(config(tmp_path, threads=2, **{**SMALL, "max_steps": 1}), encoder=tiny_encoder())
    assert calls == [2]


def test_torchrun_process_group_gets_the_timeout(tmp_path, monkeypatch):
    import torch.distributed as dist

    class Stop(Exception):
        pass

    seen = {}

    def init_process_group(backend, **kw):
        seen.update(kw, backend=backend)
        raise Stop

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        train(config(tmp_path, dist_timeout=42.5, **SMALL))
    assert seen == {"backend": "nccl" if torch.cuda.is_available() else "gloo",
                    "timeout": datetime.timedelta(seconds=42.5)}
    assert TrainConfig.dist_timeout == 600.0


def test_every_flag_has_help_and_required_flags_are_marked():
    assert set(HELP) >= {f.name for f in dataclasses.fields(TrainConfig)}
    text = _train_parser().format_help()
    for name in REQUIRED:
        assert f"--{name} {name.upper()}" in text and HELP[name] + " (required)" in " ".join(text.split())


@pytest.mark.parametrize("command", ["train", "encode"])
def test_help_answers_without_torch(command):
    code = (f"import sys\nfrom prcl.__main__ import main\ntry:\n    main([{command!r}, '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"usage: prcl {command}" in done.stdout and "--model MODEL" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("model", ["/nonexistent", "some-org/some-model"])
def test_a_missing_model_is_one_line_before_anything_is_loaded(tmp_path, capsys, model):
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    out = tmp_path / "out"
    assert train_main(["--model", model, "--data", data, "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"prcl train: error: model: no such file or directory {model!r} (prcl train loads local models only: "
        "a model directory or a .gguf file)")
    assert not out.exists()


@pytest.mark.parametrize("line, reason", [
    ('{"query": "q", "positive": "p", "negative": ["n"]}',
     'unknown key(s) "negative"; allowed: query, positive, negatives, instruction, graded'),
    ('{"query": "q", "positive": "p",, }', "invalid JSON (Expecting property name enclosed in double quotes at column 32)"),
])
def test_a_bad_data_line_is_reported_before_the_model_loads(tmp_path, capsys, monkeypatch, line, reason):
    from prcl.training import loop

    def no_model(cfg):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loop, "load_encoder", no_model)
    rows = [json.dumps(r) for r in toy_rows()[:3]] + [line]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--out", str(out)]
    assert train_main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"prcl train: error: {tmp_path / 'train.jsonl'}:4: {reason}"
    assert not out.exists()
