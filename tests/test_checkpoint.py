"""prcl train's checkpoints: no pickle, SHA-256 manifest, fallback to the newest intact checkpoint, the
settings a resume must keep, and an earlier prcl's pickle checkpoints (refused, or converted on request)."""
import hashlib
import json
import logging
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prcl.training import checkpoint, train
from prcl.training.checkpoint import CheckpointError
from prcl.training.cli import train_main
from prcl.training.loop import lr_lambda

sys.path.insert(0, str(Path(__file__).parent))
from test_training import config  # noqa: E402
from tiny_llm import tiny_model_and_tokenizer  # noqa: E402

# two steps, a checkpoint after each: checkpoint-1 is the fallback when checkpoint-2 is damaged
RUN = dict(max_steps=2, batch_size=4, mini_batch_size=None, checkpoint_every=1, keep_checkpoints=2,
           learn_scale=True, lora_r=4, lora_alpha=8, lora_dropout=0.1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(directory, losses) of an uninterrupted two-step run of a tiny saved Llama."""
    root = tmp_path_factory.mktemp("base")
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    summary = train(config(root, model=str(root / "model"), **RUN))
    return root, summary["losses"]


def copy_run(base, tmp_path, **kw):
    """A copy of the base run's directory (model, data, out) and a resume config for it."""
    root, _ = base
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    return config(tmp_path, model=str(tmp_path / "model"), **{**RUN, "resume": True, **kw})


def test_checkpoint_holds_no_pickle_and_a_manifest_of_every_file(base):
    out = base[0] / "out"
    assert [p.name for _, p in checkpoint.checkpoint_dirs(out)] == ["checkpoint-1", "checkpoint-2"]
    ckpt = out / "checkpoint-2"
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))]
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert sorted(manifest) == [f for f in files if f != "manifest.json"]
    assert {"tensors.safetensors", "state.json", "rng-0.safetensors", "adapter/adapter_config.json"} <= set(manifest)
    for name, entry in manifest.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["settings"]["lora_r"] == 4
    tensors = load_file(ckpt / "tensors.safetensors")
    assert "log_scale" in tensors and any(k.startswith("optimizer.") and k.endswith(".exp_avg") for k in tensors)


# ---- a planted pickle ------------------------------------------------------------------------------------

class _TouchOnUnpickle:
    """Unpickling this creates `marker`: what any code in a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickle_checkpoint(out, marker):
    ckpt = out / "checkpoint-3"
    ckpt.mkdir(parents=True)
    payload = pickle.dumps({"step": 3, "trainable": _TouchOnUnpickle(marker)}, protocol=2)
    (ckpt / "state.pt").write_bytes(payload)
    (ckpt / "rng-0.pt").write_bytes(payload)
    return ckpt


def test_planted_pickle_checkpoint_is_refused_and_runs_nothing(base, tmp_path, capsys):
    cfg = copy_run(base, tmp_path)
    marker = tmp_path / "marker"
    ckpt = plant_pickle_checkpoint(Path(cfg.out), marker)
    pickle.loads((ckpt / "state.pt").read_bytes())["trainable"].close()  # the payload does run under pickle
    assert marker.exists()
    marker.unlink()

    argv = ["--model", cfg.model, "--data", cfg.data, "--out", cfg.out, "--resume", "--no-progress",
            "--lora-r", "4", "--lora-alpha", "8", "--learn-scale", "--batch-size", "4", "--max-steps", "4"]
    assert train_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert err == (f"prcl train: error: {ckpt / 'state.pt'}: a pickle checkpoint of an earlier prcl; it is not "
                   "loaded, since unpickling can run code. Pass --convert-checkpoint with --resume to rewrite it "
                   "as safetensors + JSON (read with torch.load(weights_only=True), which refuses code), or "
                   "start a new run in another --out")
    assert not marker.exists()

    # the converter reads with torch.load(weights_only=True): the payload is refused, not run
    assert train_main(argv + ["--convert-checkpoint"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"prcl train: error: {re.escape(str(ckpt / 'state.pt'))}: not converted: "
                    r"torch.load\(weights_only=True\) refused it \(", err), err
    assert not marker.exists()
    assert (ckpt / "state.pt").exists() and not (ckpt / "manifest.json").exists()


def write_pickle_checkpoint(ckpt):
    """Rewrite a checkpoint the way prcl wrote them before safetensors (state.pt, rng-RANK.pt)."""
    tensors = load_file(ckpt / "tensors.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    optimizer = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, i, key = name.split(".", 2)
            optimizer["state"].setdefault(int(i), {})[key] = t
    for group in optimizer["param_groups"]:
        group["betas"] = tuple(group["betas"])
    torch.save({"step": state["step"], "optimizer": optimizer, "scheduler": state["scheduler"],
                "trainable": {n.removeprefix("weight."): t for n, t in tensors.items() if n.startswith("weight.")},
                "log_scale": tensors["log_scale"], "data": state["data"],
                "skipped": state["counters"]["skipped_lines"]}, ckpt / "state.pt")
    rng, meta = checkpoint.load_rng(ckpt / "rng-0.safetensors")
    version, internal, gauss = json.loads(meta["python"])
    torch.save({"torch": rng["torch"], "python": (version, tuple(internal), gauss), "cuda": None}, ckpt / "rng-0.pt")
    for name in ("tensors.safetensors", "state.json", "rng-0.safetensors", "manifest.json"):
        (ckpt / name).unlink()


def test_earlier_pickle_checkpoint_converts_on_request_and_resumes_exactly(base, tmp_path):
    cfg = copy_run(base, tmp_path)
    out = Path(cfg.out)
    shutil.rmtree(out / "checkpoint-2")
    write_pickle_checkpoint(out / "checkpoint-1")
    with pytest.raises(CheckpointError, match=re.escape(f"{out / 'checkpoint-1' / 'state.pt'}: a pickle checkpoint")):
        train(cfg)
    cfg.convert_checkpoint = True
    resumed = train(cfg)
    assert not list((out / "checkpoint-1").glob("*.pt"))
    checkpoint.verify(out / "checkpoint-1")
    assert resumed["losses"] == base[1][1:]


# ---- damaged files ---------------------------------------------------------------------------------------

def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_falls_back_to_the_older_checkpoint_exactly(base, tmp_path, caplog):
    cfg = copy_run(base, tmp_path)
    out = Path(cfg.out)
    flip_byte(out / "checkpoint-2" / "tensors.safetensors")
    with caplog.at_level(logging.WARNING, logger="prcl.training"):
        resumed = train(cfg)
    assert f"checkpoint damaged: {out / 'checkpoint-2' / 'tensors.safetensors'}: SHA-256 differs from the " \
           "manifest's (bytes altered)" in caplog.messages
    assert f"falling back to {out / 'checkpoint-1'}, the newest intact checkpoint" in caplog.messages
    assert resumed["losses"] == base[1][1:]  # step 2 again, bit for bit
    checkpoint.verify(out / "checkpoint-2")  # rewritten intact
    with pytest.raises(CheckpointError, match="SHA-256 differs"):  # the damaged one, set aside
        checkpoint.verify(out / "damaged-checkpoint-2")


DAMAGE = {
    "truncated": ("tensors.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "100 bytes, {n} were written"),
    "empty": ("rng-0.safetensors", lambda p: p.write_bytes(b""), "0 bytes, {n} were written"),
    "empty-state": ("state.json", lambda p: p.write_bytes(b""), "0 bytes, {n} were written"),
    "missing": ("adapter/adapter_model.safetensors", lambda p: p.unlink(), "missing"),
    "flipped": ("state.json", flip_byte, "SHA-256 differs from the manifest's (bytes altered)"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_file_is_named_and_the_older_checkpoint_loaded(base, tmp_path, kind, caplog):
    name, damage, reason = DAMAGE[kind]
    out = tmp_path / "out"
    shutil.copytree(base[0] / "out", out)
    path = out / "checkpoint-2" / name
    n = path.stat().st_size
    damage(path)
    with caplog.at_level(logging.WARNING, logger="prcl.training"):
        loaded_path, _, state, _ = checkpoint.load_latest(out, rank=0, world=1)
    if reason.endswith("were written"):
        reason += " (truncated or replaced)"
    assert caplog.messages[0] == f"checkpoint damaged: {path}: {reason.format(n=n)}"
    assert loaded_path == out / "checkpoint-1" and state["step"] == 1
    assert [p.name for _, p in checkpoint.checkpoint_dirs(out)] == ["checkpoint-1"]
    assert (out / "damaged-checkpoint-2").is_dir()


def test_no_intact_checkpoint_is_an_error_naming_each_file(base, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base[0] / "out", out)
    (out / "checkpoint-2" / "state.json").write_bytes(b"")
    flip_byte(out / "checkpoint-1" / "rng-0.safetensors")
    (out / "checkpoint-1" / "manifest.json").write_text('{"files": ')
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_latest(out, rank=0, world=1)
    assert str(err.value).startswith(f"resume: no intact checkpoint in {out}: {out / 'checkpoint-2' / 'state.json'}: "
                                     "0 bytes")
    assert f"; {out / 'checkpoint-1' / 'manifest.json'}: unreadable (JSONDecodeError" in str(err.value)


# ---- metrics.jsonl, settings, schedule -------------------------------------------------------------------

def test_partial_last_metrics_line_does_not_block_resume(base, tmp_path, caplog):
    cfg = copy_run(base, tmp_path, max_steps=3)
    metrics = Path(cfg.out) / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "lo')  # the crashed run's last write, cut short
    with caplog.at_level(logging.WARNING, logger="prcl.training"):
        train(cfg)
    assert f"{metrics}:3: dropped a partial last line" in caplog.messages
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]


def test_broken_metrics_line_before_the_last_names_file_and_line(base, tmp_path):
    cfg = copy_run(base, tmp_path, max_steps=3)
    metrics = Path(cfg.out) / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0][:10] + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{metrics}:1: invalid JSON (")):
        train(cfg)


@pytest.mark.parametrize("change, message", [
    (dict(lora_r=2), "--lora-r is 2 but {ckpt} was written with 4"),
    (dict(lora_layers=1), "--lora-layers is 1 but {ckpt} was written with 0"),
    (dict(learn_scale=False), "--learn-scale is False but {ckpt} was written with True"),
    (dict(model="other"), "--model is 'other' but {ckpt} was written with 'model'"),
])
def test_resume_with_other_weight_settings_names_the_setting(base, tmp_path, change, message):
    cfg = copy_run(base, tmp_path)
    if "model" in change:
        shutil.copytree(tmp_path / "model", tmp_path / "other")
        change = dict(model=str(tmp_path / "other"))
    for k, v in change.items():
        setattr(cfg, k, v)
    ckpt = Path(cfg.out) / "checkpoint-2"
    expected = message.format(ckpt=ckpt) + "; resume with the checkpoint's"
    with pytest.raises(ValueError, match=re.escape(expected)):
        train(cfg)


def test_resume_with_other_weight_shapes_names_the_weight(base, tmp_path):
    """An encoder handed to train() directly: the settings match, the LoRA rank does not."""
    from test_training import tiny_encoder

    cfg = copy_run(base, tmp_path)
    ckpt = re.escape(str(Path(cfg.out) / "checkpoint-2"))
    with pytest.raises(ValueError, match=rf"^resume: \S+lora_[AB]\S+ is \((4, \d+|\d+, 4)\) in {ckpt} but "
                                         r"\((2, \d+|\d+, 2)\) here; resume with the same --model and --lora-r$"):
        train(cfg, encoder=tiny_encoder(r=2))


def test_resume_with_a_changed_schedule_rebuilds_it(base, tmp_path, caplog):
    cfg = copy_run(base, tmp_path, max_steps=6, lr=2e-3)
    with caplog.at_level(logging.INFO, logger="prcl.training"):
        train(cfg)
    assert "resume: schedule changed (lr 0.003 -> 0.002, max_steps 2 -> 6); rebuilt from step 2" in caplog.messages
    lrs = [json.loads(x)["lr"] for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    new = lr_lambda(3, 6, "linear")  # the base run's warmup (3 steps), decay to step 6
    assert lrs[2:] == [2e-3 * new(k) for k in range(2, 6)]


def test_resume_without_a_checkpoint_says_so(tmp_path, caplog):
    from test_training import tiny_encoder

    cfg = config(tmp_path, **{**RUN, "max_steps": 1, "resume": True})
    with caplog.at_level(logging.INFO, logger="prcl.training"):
        train(cfg, encoder=tiny_encoder(r=4))
    assert f"resume: no checkpoint in {cfg.out}; starting at step 0" in caplog.messages
    out = Path(cfg.out)
    assert (f"done: weights in {out / 'adapter'}, metrics in {out / 'metrics.jsonl'}, last checkpoint "
            f"{out / 'checkpoint-1'}") in caplog.messages
