"""Checkpoints that cannot carry code, checked file by file on resume.

    OUT/checkpoint-STEP/
        tensors.safetensors   trainable weights, the learnable log-scale, the optimizer's tensors
        state.json            step, data position, counters, scheduler, the optimizer's settings, and
                              the settings that shape the weights (a resume must use the same)
        rng-RANK.safetensors  each rank's RNG states as uint8 tensors (Python's in the metadata)
        adapter/              the LoRA adapter, as `prcl encode --adapter` loads it
        manifest.json         size and SHA-256 of every other file, written last

A checkpoint is written into .checkpoint-STEP.tmp and renamed, so a crash or a full disk leaves the old
or the new one. On resume every file is checked against the manifest, and then what it holds (types,
ranges, sizes: a file can be intact and still forged); a damaged checkpoint is reported and the newest
intact older one is used. Nothing is unpickled: an earlier prcl's checkpoints (state.pt and
rng-RANK.pt pickles) are refused unless --convert-checkpoint asks to rewrite them, which reads them
with torch.load(weights_only=True) (tensors and plain containers only, never code).
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from prcl.files import remove, sha256, write_text
from prcl.training.config import WEIGHT_SETTINGS
from prcl.training.distributed import barrier

if TYPE_CHECKING:
    from prcl.encoders import LLMEncoder

RngState = tuple[dict[str, torch.Tensor], dict[str, str]]  # (uint8 tensors, metadata strings): rng_state()

logger = logging.getLogger(__name__)

FORMAT = 2
MANIFEST, TENSORS, STATE = "manifest.json", "tensors.safetensors", "state.json"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged or refused; the message names the file."""


def checkpoint_dirs(out: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """[(step, path)] of the OUT/checkpoint-STEP directories, oldest first (temporary ones excluded)."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        if p.is_dir() and p.name.split("-", 1)[1].isdigit():
            found.append((int(p.name.split("-", 1)[1]), p))
    return sorted(found)


# ---- files -----------------------------------------------------------------------------------------------

def write_manifest(path: Path) -> None:
    """Record the size and SHA-256 of every file under path; the manifest's presence marks it complete."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[f.relative_to(path).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    write_text(path / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")


def verify(path: Path) -> dict[str, Any]:
    """Raise CheckpointError naming the first file of path that is missing, truncated or altered."""
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({type(e).__name__}: {e})") from None
    for name, entry in files.items():
        f = path / name
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(
                entry.get("sha256"), str) or ".." in Path(name).parts or Path(name).is_absolute():
            raise CheckpointError(f"{manifest}: entry {name!r} is not a file of the checkpoint with its size and hash")
        if f.is_symlink():
            raise CheckpointError(f"{f}: a symbolic link, which prcl never writes into a checkpoint")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, {entry['bytes']} were written (truncated or replaced)")
        if sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 differs from the manifest's (bytes altered)")
    return files


def _require(ok, path, field, value, want):
    if not ok:
        raise CheckpointError(f"{path}: {field} must be {want}, got {json.dumps(value, default=repr)[:80]}")


def _count(v, lo=0):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_state(path: Path, state: Any, tensors: dict[str, torch.Tensor], rng: RngState) -> None:
    """CheckpointError naming the first value of a checkpoint of the wrong type or out of range: its files
    matched the manifest, yet a hand-edited or forged state must not reach the optimizer or the data stream.
    What depends on this run (weight shapes, the data file's size) is checked by TrainingState.restore."""
    f = path / STATE
    _require(isinstance(state, dict) and state.get("format") == FORMAT, f, "the object", state.get("format") if
             isinstance(state, dict) else state, f"a prcl checkpoint state of format {FORMAT}")
    step = state.get("step")
    _require(_count(step, 1) and path.name.endswith(f"-{step}"), f, "step", step, "the int in the folder's name")
    data = state.get("data")
    _require(isinstance(data, dict) and all(_count(data.get(k)) for k in ("epoch", "offset", "lineno", "taken")),
             f, "data", data, "{epoch, offset, lineno, taken} as ints >= 0")
    counters = state.get("counters")
    _require(isinstance(counters, dict) and _count(counters.get("skipped_lines"))
             and _count(counters.get("nonfinite")) and counters["nonfinite"] <= step, f, "counters", counters,
             "{skipped_lines, nonfinite} as ints >= 0, nonfinite <= step")
    sched = state.get("scheduler")
    _require(isinstance(sched, dict) and sched.get("last_epoch") == step and _count(sched.get("_step_count"))
             and all(isinstance(sched.get(k), list) and all(map(_finite, sched[k])) for k in ("base_lrs", "_last_lr")),
             f, "scheduler", sched, "a scheduler state at this step with finite learning rates")
    opt = state.get("optimizer")
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    _require(isinstance(groups, list) and groups and isinstance(opt.get("state"), dict), f, "optimizer", opt,
             "{state, param_groups}")
    for k, g in enumerate(groups):
        _require(isinstance(g, dict)
                 and all(_finite(g.get(key)) and g[key] >= 0 for key in ("lr", "eps", "weight_decay"))
                 and isinstance(g.get("betas"), list) and len(g["betas"]) == 2
                 and all(_finite(b) and 0 <= b < 1 for b in g["betas"])
                 and isinstance(g.get("params"), list) and all(map(_count, g["params"])),
                 f, f"optimizer.param_groups[{k}]", g, "AdamW's settings (lr, eps, weight_decay >= 0, betas in [0, 1))")
    for i, per_param in opt["state"].items():
        _require(i.isdigit() and isinstance(per_param, dict), f, f"optimizer.state[{i!r}]", per_param, "an object")
    settings, schedule = state.get("settings"), state.get("schedule")
    _require(settings is None or isinstance(settings, dict) and set(settings) == set(WEIGHT_SETTINGS), f,
             "settings", settings, f"null or an object of {', '.join(WEIGHT_SETTINGS)}")
    _require(schedule is None or isinstance(schedule, dict) and set(schedule) == {"lr", "max_steps", "warmup_steps",
             "schedule"}, f, "schedule", schedule, "null or an object of lr, max_steps, warmup_steps, schedule")
    prints = state.get("data_fingerprint")
    _require(prints is None or isinstance(prints, list) and all(
        isinstance(p, dict) and isinstance(p.get("path"), str) and _count(p.get("bytes"))
        and isinstance(p.get("sha256"), str) for p in prints), f, "data_fingerprint", prints,
        "null or a list of {path, bytes, sha256}")
    for name, t in tensors.items():
        kind = name.split(".", 1)[0]
        if kind not in ("weight", "log_scale", "optimizer") or (kind == "optimizer" and (
                len(name.split(".")) != 3 or not name.split(".")[1].isdigit())):
            raise CheckpointError(f"{path / TENSORS}: unexpected tensor {name!r}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path / TENSORS}: {name} holds non-finite values")
        # AdamW divides by 1 - beta ** step and takes the square root of exp_avg_sq
        if name.endswith(".step") and not (t.numel() == 1 and 1 <= t.item() <= step):
            raise CheckpointError(f"{path / TENSORS}: {name} must be one count of steps in [1, {step}], got "
                                  f"{t.tolist()}")
        if name.endswith(".exp_avg_sq") and (t < 0).any():
            raise CheckpointError(f"{path / TENSORS}: {name} holds negative values")
    rng_tensors, meta = rng
    for name, t in rng_tensors.items():
        _require((name == "torch" or name.startswith("cuda.") and name[5:].isdigit()) and t.dtype == torch.uint8
                 and t.dim() == 1, path, f"the rng file's tensor {name!r}", [str(t.dtype), list(t.shape)],
                 "a torch or cuda.N generator state (1-D uint8)")
    want = torch.get_rng_state()
    t = rng_tensors.get("torch")
    _require(t is not None and t.dtype == want.dtype and t.shape == want.shape, path, "the rng file's torch state",
             None if t is None else [str(t.dtype), list(t.shape)], f"{want.dtype} of shape {list(want.shape)}")
    try:
        version, internal, gauss = json.loads((meta or {})["python"])
        random.Random().setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the rng file's Python state is not one ({type(e).__name__}: {e})") from None


# ---- RNG -------------------------------------------------------------------------------------------------

def rng_state() -> RngState:
    """Every RNG a step draws from: (uint8 tensors, metadata strings) for a safetensors file."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": json.dumps(random.getstate())}


def set_rng_state(rng: RngState) -> None:
    tensors, meta = rng
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def load_rng(path: str | os.PathLike[str]) -> RngState:
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
    data_fingerprint: list = None  # prcl.files.fingerprint of the data files, compared on resume

    def pack(self, settings: dict[str, Any], schedule: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON state) of this state; `settings` and `schedule` are stored to be compared on resume."""
        tensors = {f"weight.{n}": p.detach().cpu().contiguous() for n, p in self.named}
        if self.head.learnable_scale:
            tensors["log_scale"] = self.head.logit_scale.detach().cpu()
        state = {"format": FORMAT, "step": self.step, "data": self.stream.state_dict(),
                 "counters": {"skipped_lines": self.stream.skipped.count, "nonfinite": self.nonfinite},
                 "scheduler": self.scheduler.state_dict(),
                 "optimizer": _split_optimizer(self.optimizer.state_dict(), tensors),
                 "settings": settings, "schedule": schedule, "data_fingerprint": self.data_fingerprint}
        return tensors, state

    def restore(self, path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], settings: dict[str, Any],
                data_changed: bool = False) -> None:
        """Load a checkpoint's tensors and state (checked by check_state); ValueError naming the setting,
        weight or value that does not fit this run. data_changed: the data position may fall inside a line
        of the changed data (--allow-data-change); the stream goes on at the next one."""
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
        trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved_groups = state["optimizer"]["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise CheckpointError(f"{path / STATE}: optimizer.param_groups hold other parameters than this run trains")
        for name, t in tensors.items():
            _, i, key = (name.split(".", 2) + ["", ""])[:3]
            if name.startswith("optimizer.") and (int(i) >= len(trained) or key in ("exp_avg", "exp_avg_sq")
                                                  and t.shape != trained[int(i)].shape):
                raise CheckpointError(f"{path / TENSORS}: {name} {tuple(t.shape)} fits no trained parameter")
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
            if self.head.learnable_scale:
                self.head.logit_scale.copy_(tensors["log_scale"])
        try:
            self.optimizer.load_state_dict(_join_optimizer(state["optimizer"], tensors))
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # torch's own checks of the states
            raise CheckpointError(f"{path / STATE}: the optimizer or scheduler state does not load "
                                  f"({type(e).__name__}: {e})") from None
        self.stream.load_state_dict(state["data"], source=path / STATE, realign=data_changed)
        self.stream.skipped.count = state["counters"]["skipped_lines"]
        self.nonfinite = state["counters"]["nonfinite"]
        self.step = state["step"]


# ---- save and load ---------------------------------------------------------------------------------------

def save(out: str | os.PathLike[str], tensors: dict[str, torch.Tensor], state: dict[str, Any], *, step: int, rank: int,
         world: int, encoder: "LLMEncoder", keep: int) -> None:
    """Write OUT/checkpoint-STEP (every rank calls this: each writes its RNG), keep the newest `keep`.
    A failed write (a full disk) removes the partial checkpoint and raises OSError naming it; the
    checkpoints before it are untouched."""
    out = Path(out)
    tmp, final = out / f".checkpoint-{step}.tmp", out / f"checkpoint-{step}"
    if rank == 0:
        remove(tmp)  # a link there is removed, never followed
        tmp.mkdir(parents=True)
    barrier(world)

    @contextlib.contextmanager
    def writing():
        try:
            yield
        except (OSError, SafetensorError) as e:
            remove(tmp)
            last = checkpoint_dirs(out)
            raise OSError(f"{final}: not written ({e}); " + (f"{last[-1][1]} is intact: free space and pass "
                          "--resume" if last else "no earlier checkpoint")) from None

    with writing():
        # each rank's RNG differs (per-rank dropout seeds); weights, optimizer and data position do not
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / f"rng-{rank}.safetensors", metadata=rng_meta)
        if rank == 0:
            save_file(tensors, tmp / TENSORS)
            write_text(tmp / STATE, json.dumps(state, allow_nan=False) + "\n")
            if getattr(encoder, "has_lora", False):
                encoder.save_adapter(tmp / "adapter")  # usable by `prcl encode --adapter` as is
    barrier(world)
    if rank == 0:
        with writing():
            write_manifest(tmp)
        remove(final)
        os.replace(tmp, final)
        for _, old in checkpoint_dirs(out)[:-keep]:
            remove(old)
    barrier(world)


def _load(path, rank):
    files = verify(path)
    rng = f"rng-{rank}.safetensors"
    if rng not in files:
        raise ValueError(f"resume: {path} holds no {rng} (written by fewer ranks); resume with as many ranks "
                         "as the run that wrote it")
    try:
        loaded = load_file(path / TENSORS), json.loads((path / STATE).read_text()), load_rng(path / rng)
    except (SafetensorError, ValueError) as e:  # intact bytes that do not parse: not written by prcl
        raise CheckpointError(f"{path}: not a prcl checkpoint ({type(e).__name__}: {e})") from None
    check_state(path, loaded[1], loaded[0], loaded[2])
    return loaded


def _is_pickle_checkpoint(path):
    return not (path / MANIFEST).exists() and (path / "state.pt").exists()


def load_latest(out: str | os.PathLike[str], *, rank: int, world: int,
                convert: bool = False) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], RngState] | None:
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


def convert_pickle_checkpoint(path: Path) -> None:
    """Rewrite an earlier prcl's checkpoint (state.pt, rng-RANK.pt) in this format, in place."""
    def load(f):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler's refusals have no common type
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{f}: not converted: torch.load(weights_only=True) refused it ({reason})") from None

    old = load(path / "state.pt")
    try:
        tensors = {f"weight.{n}": t.contiguous() for n, t in old["trainable"].items()}
        if old["log_scale"] is not None:
            tensors["log_scale"] = old["log_scale"]
        state = {"format": FORMAT, "step": old["step"], "data": old["data"],
                 "counters": {"skipped_lines": old.get("skipped", 0), "nonfinite": 0},
                 "scheduler": old["scheduler"], "optimizer": _split_optimizer(old["optimizer"], tensors),
                 "settings": None, "schedule": None}
        pickles = [path / "state.pt"]
        rngs = {f: load(f) for f in sorted(path.glob("rng-*.pt"))}
        rngs = {f: ({"torch": rng["torch"], **{f"cuda.{i}": s for i, s in enumerate(rng["cuda"] or [])}},
                    {"python": json.dumps(rng["python"])}) for f, rng in rngs.items()}
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # not the layout an earlier prcl wrote
        raise CheckpointError(f"{path}: not converted: not an earlier prcl checkpoint "
                              f"({type(e).__name__}: {e})") from None
    for f, (rng_tensors, meta) in rngs.items():
        save_file(rng_tensors, f.with_suffix(".safetensors"), metadata=meta)
        pickles.append(f)
    save_file(tensors, path / TENSORS)
    write_text(path / STATE, json.dumps(state, allow_nan=False) + "\n")
    for f in pickles:
        f.unlink()
    write_manifest(path)
    logger.info("converted %s to safetensors + JSON", path)
