"""Checkpoints that cannot carry code, checked file by file on resume.

    OUT/checkpoint-STEP/
        tensors.safetensors   trainable weights, the learnable log-scale, the optimizer's tensors
        state.json            step, data position, counters, scheduler, the optimizer's settings, and
                              the settings that shape the weights (a resume must use the same)
        rng-RANK.safetensors  each rank's RNG states as uint8 tensors (Python's in the metadata)
        adapter/              the LoRA adapter, as `prcl encode --adapter` loads it
        manifest.json         size and SHA-256 of every other file, written last

A checkpoint is written into .checkpoint-STEP.tmp and renamed, so a crash leaves the old or the new
one. On resume every file is checked against the manifest; a damaged checkpoint is reported and the
newest intact older one is used. Nothing is unpickled: an earlier prcl's checkpoints (state.pt and
rng-RANK.pt pickles) are refused unless --convert-checkpoint asks to rewrite them, which reads them
with torch.load(weights_only=True) (tensors and plain containers only, never code).
"""
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from prcl.training.config import WEIGHT_SETTINGS
from prcl.training.distributed import barrier

logger = logging.getLogger(__name__)

FORMAT = 2
MANIFEST, TENSORS, STATE = "manifest.json", "tensors.safetensors", "state.json"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged or refused; the message names the file."""


def checkpoint_dirs(out):
    """[(step, path)] of the OUT/checkpoint-STEP directories, oldest first (temporary ones excluded)."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        if p.is_dir() and p.name.split("-", 1)[1].isdigit():
            found.append((int(p.name.split("-", 1)[1]), p))
    return sorted(found)


# ---- files -----------------------------------------------------------------------------------------------

def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(path):
    """Record the size and SHA-256 of every file under path; the manifest's presence marks it complete."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[f.relative_to(path).as_posix()] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    _write_atomic(path / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")


def verify(path):
    """Raise CheckpointError naming the first file of path that is missing, truncated or altered."""
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({type(e).__name__}: {e})") from None
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, {entry['bytes']} were written (truncated or replaced)")
        if _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 differs from the manifest's (bytes altered)")
    return files


# ---- RNG -------------------------------------------------------------------------------------------------

def rng_state():
    """Every RNG a step draws from: (uint8 tensors, metadata strings) for a safetensors file."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": json.dumps(random.getstate())}


def set_rng_state(rng):
    tensors, meta = rng
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def load_rng(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ---- the training state ----------------------------------------------------------------------------------

def _split_optimizer(state_dict, tensors):
    """Put the optimizer's tensors into `tensors` (optimizer.PARAM.KEY); return the rest, JSON-able."""
    plain = {}
    for i, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{i}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(i), {})[key] = value
    return {"state": plain, "param_groups": state_dict["param_groups"]}


def _join_optimizer(saved, tensors):
    state = {int(i): dict(values) for i, values in saved["state"].items()}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = t
    return {"state": state, "param_groups": saved["param_groups"]}


@dataclasses.dataclass
class TrainingState:
    """Everything besides the RNG that decides a future step."""
    named: list  # [(name, parameter)] that are trained
    head: torch.nn.Module  # prcl.nn.PairBCELoss: the scale (learned as log t with --learn-scale) and bias
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: object  # ExampleStream
    step: int = 0
    nonfinite: int = 0  # steps skipped under --skip-nonfinite

    def pack(self, settings, schedule):
        """(tensors, JSON state) of this state; `settings` and `schedule` are stored to be compared on resume."""
        tensors = {f"weight.{n}": p.detach().cpu().contiguous() for n, p in self.named}
        if self.head.learnable_scale:
            tensors["log_scale"] = self.head.logit_scale.detach().cpu()
        state = {"format": FORMAT, "step": self.step, "data": self.stream.state_dict(),
                 "counters": {"skipped_lines": self.stream.skipped.count, "nonfinite": self.nonfinite},
                 "scheduler": self.scheduler.state_dict(),
                 "optimizer": _split_optimizer(self.optimizer.state_dict(), tensors),
                 "settings": settings, "schedule": schedule}
        return tensors, state

    def restore(self, path, tensors, state, settings):
        """Load a checkpoint's tensors and state; ValueError naming the setting or weight that differs."""
        saved = state.get("settings")  # None in a converted checkpoint of an earlier prcl
        for name in WEIGHT_SETTINGS if saved is not None else ():
            if saved[name] != settings[name]:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"resume: {flag} is {settings[name]!r} but {path} was written with "
                                 f"{saved[name]!r}; resume with the checkpoint's {flag} or start a new run "
                                 "in another --out")
        weights = {n.removeprefix("weight."): t for n, t in tensors.items() if n.startswith("weight.")}
        params = dict(self.named)
        if set(weights) != set(params):
            first = sorted(set(weights) ^ set(params))[0]
            raise ValueError(f"resume: {path} holds other trainable weights than this model trains (first "
                             f"difference: {first}); resume with the same --model and --lora-r")
        for n, t in weights.items():
            if t.shape != params[n].shape:
                raise ValueError(f"resume: {n} is {tuple(t.shape)} in {path} but {tuple(params[n].shape)} "
                                 "here; resume with the same --model and --lora-r")
        if self.head.learnable_scale != ("log_scale" in tensors):
            raise ValueError(f"resume: --learn-scale differs from {path}'s")
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
            if self.head.learnable_scale:
                self.head.logit_scale.copy_(tensors["log_scale"])
        self.optimizer.load_state_dict(_join_optimizer(state["optimizer"], tensors))
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.stream.skipped.count = state["counters"]["skipped_lines"]
        self.nonfinite = state["counters"]["nonfinite"]
        self.step = state["step"]


# ---- save and load ---------------------------------------------------------------------------------------

def save(out, tensors, state, *, step, rank, world, encoder, keep):
    """Write OUT/checkpoint-STEP (every rank calls this: each writes its RNG), keep the newest `keep`."""
    out = Path(out)
    tmp, final = out / f".checkpoint-{step}.tmp", out / f"checkpoint-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    # each rank's RNG differs (per-rank dropout seeds); weights, optimizer and data position do not
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, tmp / f"rng-{rank}.safetensors", metadata=rng_meta)
    if rank == 0:
        save_file(tensors, tmp / TENSORS)
        (tmp / STATE).write_text(json.dumps(state, allow_nan=False) + "\n")
        if getattr(encoder, "has_lora", False):
            encoder.save_adapter(tmp / "adapter")  # usable by `prcl encode --adapter` as is
    barrier(world)
    if rank == 0:
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)


def _load(path, rank):
    files = verify(path)
    rng = f"rng-{rank}.safetensors"
    if rng not in files:
        raise ValueError(f"resume: {path} holds no {rng} (written by fewer ranks); resume with as many ranks "
                         "as the run that wrote it")
    try:
        return load_file(path / TENSORS), json.loads((path / STATE).read_text()), load_rng(path / rng)
    except (SafetensorError, ValueError) as e:  # intact bytes that do not parse: not written by prcl
        raise CheckpointError(f"{path}: not a prcl checkpoint ({type(e).__name__}: {e})") from None


def _is_pickle_checkpoint(path):
    return not (path / MANIFEST).exists() and (path / "state.pt").exists()


def load_latest(out, *, rank, world, convert=False):
    """(path, tensors, state, rng) of the newest intact checkpoint in out, or None when it holds none.

    A damaged checkpoint is logged, renamed to damaged-checkpoint-STEP (kept for inspection, out of
    the rotation) and the next older one tried; CheckpointError when none is intact or the newest is
    an earlier prcl's pickle checkpoint (unless `convert`).
    """
    damaged, reasons = [], []
    for _, path in reversed(checkpoint_dirs(out)):
        if _is_pickle_checkpoint(path):
            if not convert:
                raise CheckpointError(
                    f"{path / 'state.pt'}: a pickle checkpoint of an earlier prcl; it is not loaded, since "
                    "unpickling can run code. Pass --convert-checkpoint with --resume to rewrite it as "
                    "safetensors + JSON (read with torch.load(weights_only=True), which refuses code), "
                    "or start a new run in another --out")
            if rank == 0:
                convert_pickle_checkpoint(path)
            barrier(world)
        try:
            loaded = (path, *_load(path, rank))
        except CheckpointError as e:
            logger.warning("checkpoint damaged: %s", e)
            damaged.append(path)
            reasons.append(str(e))
            continue
        if damaged:
            logger.warning("falling back to %s, the newest intact checkpoint", path)
            barrier(world)  # every rank has read the damaged ones before they move
            if rank == 0:
                for p in damaged:
                    os.replace(p, p.with_name("damaged-" + p.name))
        return loaded
    if damaged:
        raise CheckpointError(f"resume: no intact checkpoint in {out}: " + "; ".join(reasons))
    return None


def convert_pickle_checkpoint(path):
    """Rewrite an earlier prcl's checkpoint (state.pt, rng-RANK.pt) in this format, in place."""
    def load(f):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler's refusals have no common type
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{f}: not converted: torch.load(weights_only=True) refused it ({reason})") from None

    old = load(path / "state.pt")
    tensors = {f"weight.{n}": t.contiguous() for n, t in old["trainable"].items()}
    if old["log_scale"] is not None:
        tensors["log_scale"] = old["log_scale"]
    state = {"format": FORMAT, "step": old["step"], "data": old["data"],
             "counters": {"skipped_lines": old.get("skipped", 0), "nonfinite": 0},
             "scheduler": old["scheduler"], "optimizer": _split_optimizer(old["optimizer"], tensors),
             "settings": None, "schedule": None}
    pickles = [path / "state.pt"]
    for f in sorted(path.glob("rng-*.pt")):
        rng = load(f)
        rng_tensors = {"torch": rng["torch"], **{f"cuda.{i}": s for i, s in enumerate(rng["cuda"] or [])}}
        save_file(rng_tensors, f.with_suffix(".safetensors"), metadata={"python": json.dumps(rng["python"])})
        pickles.append(f)
    save_file(tensors, path / TENSORS)
    (path / STATE).write_text(json.dumps(state, allow_nan=False) + "\n")
    for f in pickles:
        f.unlink()
    write_manifest(path)
    logger.info("converted %s to safetensors + JSON", path)
