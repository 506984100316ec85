"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (see benchmarks/README.md).

tests/conftest.py is not loaded here, so nothing sets TRITON_INTERPRET: the interpreter is no speed
measure, and on CPU prcl's automatic backend is the native kernel or the PyTorch path anyway.
"""
import torch


def _csv(value, cast=str):
    return None if value is None else [cast(v) for v in value.split(",") if v.strip()]


def pytest_addoption(parser):
    group = parser.getgroup("prcl", "prcl benchmark sweep (defaults depend on the device)")
    group.addoption("--prcl-device", default=None, help="cuda or cpu (default: cuda when available)")
    group.addoption("--prcl-batch", default=None,
                    help="comma list of B for the square label forms (B = N)")
    group.addoption("--prcl-hardneg-batch", default=None, help="comma list of B for hardneg (N = 8·B)")
    group.addoption("--prcl-dim", default=None, help="comma list of D")
    group.addoption("--prcl-dtype", default=None, help="comma list of fp32, bf16, fp16")
    group.addoption("--prcl-label", default=None, help="comma list of diagonal, graded, sparse, hardneg")
    group.addoption("--prcl-mode", default=None, help="comma list of fwd, fwd+bwd")
    group.addoption("--prcl-impl", default=None,
                    help="comma list of prcl, prcl-torch, eager, compiled, open_clip, siglip-kernel, gemm-floor")
    group.addoption("--prcl-threads", default=None, type=int,
                    help="CPU threads (torch.set_num_threads) for the timed and the memory process; on a "
                         "shared machine 1 thread keeps OpenMP barriers from turning contention into noise")
    group.addoption("--prcl-budget", default=None, type=float,
                    help="seconds of timed calls per entry (default 0.4 on CPU, 1.0 on CUDA)")


def sweep_options(config):
    device = config.getoption("--prcl-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "device": device,
        "batch": _csv(config.getoption("--prcl-batch"), int),
        "hardneg_batch": _csv(config.getoption("--prcl-hardneg-batch"), int),
        "dim": _csv(config.getoption("--prcl-dim"), int),
        "dtype": _csv(config.getoption("--prcl-dtype")),
        "label": _csv(config.getoption("--prcl-label")),
        "mode": _csv(config.getoption("--prcl-mode")),
        "impl": _csv(config.getoption("--prcl-impl")),
        "budget": config.getoption("--prcl-budget"),
    }


def pytest_configure(config):
    if config.getoption("--prcl-threads", None):
        torch.set_num_threads(config.getoption("--prcl-threads"))
    # read by bench_loss.py's pytest_generate_tests (a test module cannot import conftest cleanly)
    config.prcl_sweep = sweep_options(config)
