"""Inputs (one case per B, N, D, dtype and label form), the FLOP basis, and what a report says about
the machine: device name, versions, free memory."""
import platform
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import prcl
from prcl.testing import DTYPES, late_training_inputs  # noqa: F401 (late_training_inputs: re-exported, its home before)
from prcl.tools.bench import DTYPE_NAMES, LABEL_FORMS

SPARSE_K = 4
HARDNEG_FACTOR = 8
GOLD_BYTES_PER_PAIR = 48  # the float64 reference, fwd+bwd


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {model}, {threads} thread{'s' if threads != 1 else ''}"


def device_slug(device: str | torch.device) -> str:
    """The device name as a folder name, e.g. 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def versions() -> dict[str, str]:
    out = {"prcl": prcl.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 (a broken triton must not stop a CPU benchmark)
        out["triton"] = f"unavailable ({type(e).__name__})"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def flops(B: int, N: int, D: int, mode: str) -> int:
    """The FLOP basis: 2·B·N·D forward only (one GEMM's worth), 6·B·N·D forward+backward (three)."""
    return (2 if mode == "fwd" else 6) * B * N * D


def default_docs(B: int, label_form: str) -> int:
    return HARDNEG_FACTOR * B if label_form == "hardneg" else B


@dataclass
class Case:
    B: int
    N: int
    D: int
    dtype: str
    label_form: str
    device: torch.device
    q: torch.Tensor
    d: torch.Tensor
    labels: torch.Tensor | None
    label_index: torch.Tensor | None
    seed: int = 0

    @property
    def id(self) -> str:
        return f"B{self.B}-N{self.N}-D{self.D}-{self.dtype}-{self.label_form}"

    def spec(self) -> dict[str, int | str]:
        """What make_case needs to rebuild these inputs elsewhere (the CPU memory worker)."""
        return dict(B=self.B, N=self.N, D=self.D, dtype=self.dtype, label_form=self.label_form,
                    seed=self.seed)

    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.labels, self.label_index)
                   if t is not None)


def make_case(B: int, N: int, D: int, dtype: str = "fp32", device: str | torch.device = "cpu",
              label_form: str = "diagonal", seed: int = 0) -> Case:
    """Unit-norm embeddings (as encoders produce them) and labels in one of the four forms:

    diagonal: labels=None, pair (i, i) positive.      graded: (B,) relevance of pair (i, i) in [0, 1).
    sparse:   (B, K=4) labels with label_index: the diagonal positive plus three graded documents (listed_labels).
    hardneg:  diagonal positives among N = 8·B documents (the in-batch positives plus hard negatives).
    """
    if label_form not in LABEL_FORMS:
        raise ValueError(f"label_form: expected one of {LABEL_FORMS}, got {label_form!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPE_NAMES}, got {dtype!r}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(B, D, device=device, generator=g), dim=1).to(DTYPES[dtype])
    d = F.normalize(torch.randn(N, D, device=device, generator=g), dim=1).to(DTYPES[dtype])
    labels = label_index = None
    if label_form == "graded":
        labels = torch.rand(B, device=device, generator=g)
    elif label_form == "sparse":
        labels, label_index = listed_labels(B, N, min(SPARSE_K, N), g)
    return Case(B, N, D, dtype, label_form, device, q, d, labels, label_index, seed)


def listed_labels(B: int, N: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The "sparse" case: (B, K) labels with label_index, K documents per row: the diagonal positive (label 1)
    and K − 1 graded ones (labels in [0, 0.5)), no document twice in a row, nothing excluded; the shape of a
    training batch, for timing (prcl.testing.labels_with_exclusions("sparse") is the accuracy checks' one)."""
    device = gen.device
    width = N // K
    # offsets 0 and k·width + [0, width) for k ≥ 1 are distinct mod N: no document twice in a row
    offsets = [torch.zeros(B, dtype=torch.int64, device=device)] + [
        k * width + torch.randint(0, width, (B,), device=device, generator=gen) for k in range(1, K)]
    rows = torch.arange(B, device=device)
    label_index = torch.stack([(rows + o) % N for o in offsets], dim=1)
    labels = torch.cat([torch.ones(B, 1, device=device), 0.5 * torch.rand(B, K - 1, device=device, generator=gen)],
                       dim=1)
    return labels, label_index


def free_bytes(device: str | torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):  # no /proc, or no MemAvailable line (None.group)
        return 1 << 62


def fit_problem(what: str, bytes_per_pair: int, B: int, N: int, device: str | torch.device,
                margin: float = 0.8) -> str | None:
    """None when B×N pairs at bytes_per_pair should fit in free memory, else the reason they won't."""
    need = bytes_per_pair * B * N
    free = free_bytes(device)
    if need > margin * free:
        return (f"{what} needs ~{need / 2**30:.1f} GiB for {B}x{N} pairs ({bytes_per_pair} B/pair), "
                f"{free / 2**30:.1f} GiB free")
    return None
