"""TrainConfig: every option of `prcl train`, checked before anything is loaded."""
import dataclasses
import os

SCHEDULES = ("linear", "cosine", "constant")
# the settings that decide the trainable weights' names and shapes: a resume must use the checkpoint's
WEIGHT_SETTINGS = ("model", "gguf_file", "lora_r", "lora_alpha", "lora_layers", "learn_scale")


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
    scale: float = 5.0  # prcl.contract.DEFAULT_SCALE (not imported: `prcl train --help` runs without torch)
    learn_scale: bool = False
    bias: float = None  # None = −log(N − 1) from each batch's N
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
    overwrite: bool = False  # start afresh in an --out that holds another run (its checkpoints are deleted)
    convert_checkpoint: bool = False  # with --resume: rewrite an earlier prcl's pickle checkpoint first
    seed: int = 0
    shuffle: bool = True
    shuffle_block: int = 4096
    skip_bad_lines: bool = False
    progress: bool = True

    def validate(self):
        from prcl.training.step import LOSSES

        for name in ("data", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        for name in ("data", "eval"):
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):
                raise ValueError(f"{name}: no such file {getattr(self, name)!r}")
        if self.model and not os.path.exists(self.model):
            # transformers would take a missing path for a hub name and try the network
            raise ValueError(f"model: no such file or directory {self.model!r} (prcl train loads local "
                             "models only: a model directory or a .gguf file)")
        if self.model and self.gguf_file and not os.path.isfile(os.path.join(self.model, self.gguf_file)):
            raise ValueError(f"gguf_file: no such file {os.path.join(self.model, self.gguf_file)!r}")
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
        if not self.scale > 0:
            raise ValueError(f"scale: must be > 0, got {self.scale}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout: must be > 0 seconds, got {self.dist_timeout}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r: must be >= 0 (0 trains every weight), got {self.lora_r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.lora_layers < 0:
            raise ValueError(f"lora_layers: must be >= 0 (0 = every layer), got {self.lora_layers}")
        if self.eval_max_queries is not None and self.eval_max_queries < 1:
            raise ValueError(f"eval_max_queries: must be >= 1, got {self.eval_max_queries}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every: must be >= 0 (0 = off)")
        if not self.eval_k or any(int(k) < 1 for k in self.eval_k):
            raise ValueError(f"eval_k: expected positive ints, got {self.eval_k!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite: pass one (--resume continues --out, --overwrite replaces it)")
        if self.convert_checkpoint and not self.resume:
            raise ValueError("convert_checkpoint: only with --resume")

    def weight_settings(self):
        """The WEIGHT_SETTINGS as a dict; the model by its directory's or file's name, so that a run and
        its model copied elsewhere still resume."""
        settings = {name: getattr(self, name) for name in WEIGHT_SETTINGS}
        if settings["model"]:
            settings["model"] = os.path.basename(os.path.normpath(settings["model"]))
        return settings
