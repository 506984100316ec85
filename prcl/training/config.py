"""TrainConfig: every option of `prcl train`, checked before anything is loaded."""
import dataclasses
import math
import os

from prcl.files import check_model_path, regular_file

SCHEDULES = ("linear", "cosine", "constant")
DTYPES = (None, "float32", "bfloat16", "float16")
MAX_TIMEOUT = 365 * 24 * 3600  # timedelta and torch's process-group timeout overflow far above; a year is no limit
# the settings that decide the trainable weights' names and shapes: a resume must use the checkpoint's
WEIGHT_SETTINGS = ("model", "gguf_file", "lora_r", "lora_alpha", "lora_layers", "learn_scale")


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # True is an int to Python, not a setting


@dataclasses.dataclass
class TrainConfig:
    """Every option of `prcl train`; the CLI flags and --config keys have these names (dashes allowed)."""
    model: str = None
    data: str = None
    out: str = None
    eval: str = None
    gguf_file: str = None
    batch_size: int = 32  # queries per optimizer micro-step, over all ranks
    mini_batch_size: int = None  # texts per encoder call; None = no embedding cache (all graphs kept)
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = None  # None = 10% of max_steps
    schedule: str = "linear"
    max_grad_norm: float = None
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss or gradient instead of stopping
    loss: str = "prcl"
    scale: float = 5.0  # prcl.core.contract.DEFAULT_SCALE (not imported: `prcl train --help` runs without torch)
    learn_scale: bool = False
    bias: float = None  # None = −log(N − 1) from each batch's N
    false_negative_margin: float = None  # None = no mask; see prcl.fused_pair_bce
    teacher: str = None  # a model whose cosines grade every pair of a batch (prcl.training.teacher)
    dedup: bool = True
    backend: str = None
    lora_r: int = 16  # 0 = train every weight
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_layers: int = 0  # LoRA on the last K transformer layers only (0 = all): backward stops below them
    pooling: str = "mean"
    pack: bool = True  # each encoder call as packed rows (no padding); False: padded batches
    pack_tokens: int = 2048  # tokens per packed row at most (a longer text gets a row of its own)
    max_length: int = 512
    dtype: str = None  # weights' dtype when loading: float32, bfloat16, float16 (None = the checkpoint's)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    bf16: bool = True  # bf16 autocast on CUDA; ignored on CPU
    device: str = None  # None = cuda if available
    threads: int = None  # torch intra-op threads; None = torch's default (the CLI passes 1 on CPU)
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks under torchrun
    eval_every: int = 0  # 0 = evaluate before training and at the end only
    eval_k: tuple = (1, 5, 10)
    eval_batch_size: int = 32
    eval_max_queries: int = None  # evaluate on the first M queries of --eval (and their documents) only
    checkpoint_every: int = 50
    keep_checkpoints: int = 2  # two, so that a damaged last checkpoint has an intact predecessor
    resume: bool = False
    allow_data_change: bool = False  # with --resume: continue although the data differ from the run's start
    overwrite: bool = False  # start afresh in an --out that holds another run (its checkpoints are deleted)
    convert_checkpoint: bool = False  # with --resume: rewrite an earlier prcl's pickle checkpoint first
    seed: int = 0
    shuffle: bool = True
    shuffle_block: int = 4096
    skip_bad_lines: bool = False
    progress: bool = True

    def validate(self) -> None:
        """ValueError naming the option that is missing, contradicts another or is out of range."""
        from prcl.training.step import LOSSES

        for name in ("data", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        for name in ("data", "eval"):
            if getattr(self, name):
                regular_file(getattr(self, name), name)
        if self.model:
            check_model_path(self.model, self.gguf_file, prog="prcl train")
        if self.teacher is not None:
            check_model_path(self.teacher, None, prog="prcl train", name="teacher")
            if self.loss != "prcl" or self.false_negative_margin is not None:
                raise ValueError(f"teacher: graded labels for PRCL only, without a false-negative margin (with "
                                 f"--loss {self.loss}, --false-negative-margin {self.false_negative_margin}): InfoNCE "
                                 "would take every graded pair as a share of the target, and the mask's threshold "
                                 "the most similar graded pair")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"out: {self.out!r} is a file; --out takes a directory")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batch_size", "keep_checkpoints",
                     "shuffle_block", "max_length", "pack_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("mini_batch_size", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("scale", "lr", "dist_timeout", "max_grad_norm"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {v!r}")
        for name in ("weight_decay", "lora_dropout", "bias", "false_negative_margin"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and math.isfinite(v)):
                raise ValueError(f"{name}: must be a finite number, got {v!r}")
        if self.weight_decay < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"weight_decay and lora_dropout: expected weight_decay >= 0 and lora_dropout in "
                             f"[0, 1), got {self.weight_decay} and {self.lora_dropout}")
        if self.dist_timeout > MAX_TIMEOUT:
            raise ValueError(f"dist_timeout: at most {MAX_TIMEOUT} seconds (a year), got {self.dist_timeout}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(map(str, DTYPES[1:]))}, got {self.dtype!r}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r: must be >= 0 (0 trains every weight), got {self.lora_r}")
        if self.lora_r and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0 (LoRA's update is scaled by lora_alpha / lora_r: 0 trains "
                             f"nothing), got {self.lora_alpha}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.lora_layers < 0:
            raise ValueError(f"lora_layers: must be >= 0 (0 = every layer), got {self.lora_layers}")
        if self.eval_max_queries is not None and self.eval_max_queries < 1:
            raise ValueError(f"eval_max_queries: must be >= 1, got {self.eval_max_queries}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every: must be >= 0 (0 = off)")
        if (not isinstance(self.eval_k, tuple) or not self.eval_k
                or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.eval_k)):
            raise ValueError(f"eval_k: expected positive ints, got {self.eval_k!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite: pass one (--resume continues --out, --overwrite replaces it)")
        if self.convert_checkpoint and not self.resume:
            raise ValueError("convert_checkpoint: only with --resume")
        if self.allow_data_change and not self.resume:
            raise ValueError("allow_data_change: only with --resume")

    def weight_settings(self) -> dict:
        """The WEIGHT_SETTINGS as a dict; the model by its directory's or file's name, so that a run and
        its model copied elsewhere still resume."""
        settings = {name: getattr(self, name) for name in WEIGHT_SETTINGS}
        if settings["model"]:
            # abspath: "." names a folder too, as resolved in this process's working directory
            settings["model"] = os.path.basename(os.path.abspath(settings["model"]))
        return settings
