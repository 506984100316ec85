"""prcl.fused_pair_bce beside every peer: `pytest benchmarks/ --benchmark-only`.

One pytest-benchmark group per case (B, N, D, dtype, label form, mode); in each group, measured in
the same run: prcl (automatic backend; on CPU also the PyTorch path when auto is the native kernel),
the eager reference (prcl.backends.reference.pair_bce, the tests' oracle), torch.compile of it, open_clip's
SigLipLoss and siglip-kernel when installed (diagonal labels, square batches; siglip-kernel on CUDA
only), and the three-GEMM floor (S = q·dᵀ, G·d, Gᵀ·q; forward only: one GEMM).

extra_info of each entry: peak memory beyond the inputs (peak_bytes; fwd+bwd includes the gradients),
TFLOP/s on 2·B·N·D (fwd) or 6·B·N·D (fwd+bwd), the device name, versions, and the case itself.
Cases that cannot fit, and peers that are not installed, are skipped with the reason. No entry
passes or fails on speed. Timing, memory, inputs and FLOP counts come from prcl.tools.bench, as in
`python -m prcl bench`.
"""
import gc
import os

import pytest
import torch

from prcl.tools import bench as pb

# B (= N for the square label forms), hardneg B (N = 8·B), D, dtypes, per device. The CPU sweep is
# sized to finish in about two minutes on 2 cores; the CUDA sweep is the one issue 3 asks for.
SWEEPS = {
    "cpu": dict(batch=[512, 1024, 2048], hardneg_batch=[128, 256, 512], dim=[256], dtype=["fp32"]),
    "cuda": dict(batch=[4096, 8192, 16384, 32768, 65536], hardneg_batch=[4096, 8192, 16384],
                 dim=[64, 256, 768, 1024, 4096], dtype=["bf16", "fp32"]),
}
BUDGET_S = {"cpu": 0.4, "cuda": 1.0}
PEERS = ("open_clip", "siglip-kernel")


def _cases(opts):
    device = torch.device(opts["device"])
    sweep = SWEEPS[device.type]
    labels = opts["label"] or list(pb.LABEL_FORMS)
    for dtype in opts["dtype"] or sweep["dtype"]:
        for D in opts["dim"] or sweep["dim"]:
            for label_form in labels:
                hardneg = label_form == "hardneg"
                batches = (opts["hardneg_batch"] or sweep["hardneg_batch"]) if hardneg else (
                    opts["batch"] or sweep["batch"])
                for B in batches:
                    yield dict(B=B, N=pb.default_docs(B, label_form), D=D, dtype=dtype,
                               label_form=label_form, seed=0)


def pytest_generate_tests(metafunc):
    if "entry" not in metafunc.fixturenames:
        return
    opts = metafunc.config.prcl_sweep
    impls = [i.name for i in pb.implementations(opts["device"], floor=True)]
    impls = [i for i in impls if not opts["impl"] or i in opts["impl"]]
    entries, ids = [], []
    for spec in _cases(opts):
        for mode in opts["mode"] or list(pb.MODES):
            for name in impls:
                # the peers take diagonal labels on square batches only: no entry for other forms
                if name in PEERS and (spec["label_form"] != "diagonal" or spec["N"] != spec["B"]):
                    continue
                entries.append((spec, mode, name))
                ids.append(f"B{spec['B']}-N{spec['N']}-D{spec['D']}-{spec['dtype']}-{spec['label_form']}"
                           f"-{mode}-{name}")
    metafunc.parametrize("entry", entries, ids=ids)


_last_case = {}


def _case(spec, device):
    key = (tuple(sorted(spec.items())), str(device))
    if key not in _last_case:
        _last_case.clear()
        gc.collect()
        _last_case[key] = pb.make_case(device=device, **spec)
    return _last_case[key]


def _release(device):
    # only CUDA needs it: a full gc in a process holding dynamo's caches takes about a second
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def test_loss(benchmark, entry, request):
    spec, mode, name = entry
    opts = request.config.prcl_sweep
    device = torch.device(opts["device"])
    B, N, D = spec["B"], spec["N"], spec["D"]
    benchmark.group = f"B{B}-N{N}-D{D}-{spec['dtype']}-{spec['label_form']}-{mode}"
    impl = pb.implementation(name, device)
    problem = pb.fit_problem(name, impl.bytes_per_pair, B, N, device)
    if problem:
        pytest.skip(problem)
    fn, reason = impl.make()
    if fn is None:
        pytest.skip(f"{name}: {reason}")
    case = _case(spec, device)
    step = pb.Step(fn, case, mode)
    try:
        first = pb.time_step(step, device, repeats=1, warmup=1)[0]  # warm-up compiles; then one probe
        rounds = pb.rounds_for(first, opts["budget"] or BUDGET_S[device.type], lo=5)

        def timed():
            step()
            pb.synchronize(device)

        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
        step.clear()
        peak, why = pb.measure_peak_memory(name, step, case)
    except torch.cuda.OutOfMemoryError as e:
        step.clear()
        _release(device)
        pytest.skip(f"{name} ran out of memory at {B}x{N}, D={D}: {pb.first_line(e)}")
    except Exception as e:  # noqa: BLE001
        if name.startswith("prcl"):
            raise  # prcl failing is a bug to see, not a case to skip
        # a peer, or inductor compiling the reference, failing (OOM inside a compiled graph
        # arrives wrapped) is the peer's result for this case
        step.clear()
        _release(device)
        pytest.skip(f"{name} failed at {B}x{N}, D={D}: {type(e).__name__}: {pb.first_line(e)}")
    finally:
        step.clear()
    median = benchmark.stats.stats.median
    work = pb.flops(B, N, D, mode)
    v = pb.versions()
    benchmark.extra_info.update({
        "impl": name, "impl_label": impl.label, "B": B, "N": N, "D": D, "dtype": spec["dtype"],
        "label_form": spec["label_form"], "mode": mode,
        "backend": pb.resolved_backend(device) if name == "prcl" else None,
        "flops": work, "tflops": work / median / 1e12,
        "peak_bytes": peak, "peak_note": why, "input_bytes": case.input_bytes(),
        "device": device.type, "device_name": pb.device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "prcl_version": v["prcl"], "torch_version": v["torch"], "triton_version": v["triton"],
    })
    _release(device)
