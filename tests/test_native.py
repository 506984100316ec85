"""The native CPU kernel (kernels/pair_bce_cpu.cpp) through prcl.fused_pair_bce(..., backend="native").

test_pair_bce.py's oracle grid covers this backend with its default tiles; here the same oracle
(gold = float64 reference; err(native) <= 2·err(eager) + floor) runs with tiny tiles
(PRCL_NATIVE_TILES) so that small shapes cross many row tiles, column tiles and chunks, and past one
row tile; the C++ ops' opcheck and torch.compile; bitwise determinism; the memory bound; every
compiled instruction-set variant of the epilogue; and the fallback when the library is off.

Tests that need the built library skip when it is missing, with the reason; PRCL_REQUIRE_NATIVE=1
(for CI, which builds it) turns that skip into a failure.
"""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from test_pair_bce import DTYPES, FORMS, _ids, check_against_oracle, kernel_label_layouts, make_inputs, make_labels, run

import prcl
from prcl.backends import native

# with PRCL_REQUIRE_NATIVE=1, native.available() raises instead, naming why
needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native CPU kernel not built: {native.status()}")

# kernel tiles are TM=768 rows x TN<=256 columns in up to 8 chunks; "8,24" makes small shapes
# cross every kind of boundary (row tiles, ragged last column tile, chunks of uneven tile counts)
TINY_TILES = "8,24"
SHAPES = [(1, 4, 3), (37, 45, 19), (70, 133, 40)]
LARGE = [(770, 900, 33), (300, 2100, 17)]  # past TM = 768 rows; 9 column tiles over 8 chunks


def native_loss(*args, **kw):
    return prcl.fused_pair_bce(*args, backend="native", **kw)


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setenv("PRCL_NATIVE_TILES", TINY_TILES)


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_matches_oracle_with_tiny_tiles(shape, form, reduction, dtype, tiny_tiles):
    B, N, D = shape
    dtype = DTYPES[dtype]
    q, d, gen = make_inputs(B, N, D, dtype, seed=B * 1000 + N)
    labels, label_index = make_labels(form, B, N, gen)
    check_against_oracle(native_loss, q, d, labels, label_index, dtype, reduction)


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", LARGE, ids=_ids)
def test_matches_oracle_past_one_tile(shape, form, dtype):
    B, N, D = shape
    dtype = DTYPES[dtype]
    q, d, gen = make_inputs(B, N, D, dtype, seed=B + N)
    labels, label_index = make_labels(form, B, N, gen)
    check_against_oracle(native_loss, q, d, labels, label_index, dtype, "mean")
    check_against_oracle(native_loss, q, d, labels, label_index, dtype, "none")


@needs_native
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_extreme_logits_are_finite_with_tiny_tiles(dtype, tiny_tiles):
    # |z| reaches ~ scale·spread² = 7·25 = 175 (run's scale): softplus and σ must neither overflow
    # nor lose the far negatives (exp(−|z|) underflows to 0 below −87 in the kernel)
    dtype = DTYPES[dtype]
    q, d, gen = make_inputs(20, 30, 16, dtype, spread=5.0)
    labels, label_index = make_labels("sparse", 20, 30, gen)
    assert (7.0 * q.float() @ d.float().T).abs().max() > 100
    check_against_oracle(native_loss, q, d, labels, label_index, dtype, "mean")
    check_against_oracle(native_loss, q, d, labels, label_index, dtype, "none")


@needs_native
def test_scale_and_bias_gradients_match_torch_path():
    q, d, gen = make_inputs(50, 64, 24, torch.float32)
    labels, label_index = make_labels("dense", 50, 64, gen)
    native_grads = run(native_loss, q, d, labels, label_index, torch.float32, "sum")
    torch_grads = run(lambda *a, **k: prcl.fused_pair_bce(*a, backend="torch", **k), q, d, labels,
                      label_index, torch.float32, "sum")
    for name, a, b in zip(["loss", "dq", "dd", "dscale", "dbias"], native_grads, torch_grads):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)


@needs_native
def test_is_the_cpu_default():
    from prcl.core.ops import auto_backend

    assert auto_backend(torch.device("cpu")) == "native"
    q, d, _ = make_inputs(12, 20, 8, torch.float32)
    assert torch.equal(prcl.fused_pair_bce(q, d), native_loss(q, d))


@needs_native
@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_native_ops_opcheck(layout):
    q, d, gen = make_inputs(10, 13, 16, torch.float32)
    t, b = torch.tensor(4.0), torch.tensor(-1.0)
    y, index = kernel_label_layouts(10, 13, gen)[layout]
    torch.library.opcheck(torch.ops.prcl.native_loss_rows.default, (q, d, t, b, y, index))
    for w in (None, torch.rand(10)):
        torch.library.opcheck(torch.ops.prcl.native_loss_grads.default, (q, d, t, b, y, index, w))
    torch.library.opcheck(torch.ops.prcl.native_loss_rows.default, (q.bfloat16(), d.bfloat16(), t, b, y, index))
    threshold = torch.tensor([0.0] * 9 + [math.inf])  # the false-negative mask's, one row unmasked
    torch.library.opcheck(torch.ops.prcl.native_loss_rows.default, (q, d, t, b, y, index, threshold))
    torch.library.opcheck(torch.ops.prcl.native_loss_grads.default, (q, d, t, b, y, index, None, None, False,
                                                                     threshold))


@needs_native
@pytest.mark.slow
def test_compiled_loss_matches_eager():
    q0, d0, gen = make_inputs(33, 47, 20, torch.float32)
    labels, label_index = make_labels("sparse", 33, 47, gen)
    scale = torch.tensor(6.0, requires_grad=True)

    def loss_fn(q, d):
        return prcl.fused_pair_bce(q, d, labels, label_index=label_index, scale=scale, backend="native")

    results = []
    # fullgraph: a graph break raises; the backward runs through AOTAutograd's compiled graph
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        q, d = q0.clone().requires_grad_(), d0.clone().requires_grad_()
        scale.grad = None
        loss = fn(q, d)
        loss.backward()
        results.append((loss.detach(), q.grad, d.grad, scale.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def _grads_at(threads, B=1500, N=1100, D=37):
    # past one row tile (TM = 768), several column tiles and chunks, D no multiple of a SIMD width
    q, d, gen = make_inputs(B, N, D, torch.float32, seed=7)
    y, index = kernel_label_layouts(B, N, gen)["sparse"]
    t, b, w = torch.tensor(9.0), torch.tensor(-4.0), torch.linspace(-1.0, 2.0, B)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return (torch.ops.prcl.native_loss_rows(q, d, t, b, y, index),
                *torch.ops.prcl.native_loss_grads(q, d, t, b, y, index, w),
                *torch.ops.prcl.native_loss_grads(q, d, t, b, y, index, None))
    finally:
        torch.set_num_threads(saved)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_deterministic_for_a_thread_count(threads):
    first, second = _grads_at(threads), _grads_at(threads)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two runs on {threads} thread(s)"


def _run_python(code, **env):
    full_env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=full_env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return out


@needs_native
@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_every_epilogue_variant_agrees(isa):
    # the epilogue is compiled per instruction set and picked from cpuid: check the ones this machine
    # would not pick by itself, against the default one
    code = """
        import json, torch, prcl
        from prcl.backends import native
        assert native.available(), native.status()
        g = torch.Generator().manual_seed(0)
        q, d = torch.randn(300, 40, generator=g) * 0.4, torch.randn(350, 40, generator=g) * 0.4
        t, b = torch.tensor(8.0), torch.tensor(-3.0)
        y = torch.where(torch.rand(300, 350, generator=g) < 0.05, torch.rand(300, 350, generator=g), 0.0)
        y[torch.rand(300, 350, generator=g) < 0.02] = -1.0
        out = [torch.ops.prcl.native_loss_rows(q, d, t, b, y, None)] + list(
            torch.ops.prcl.native_loss_grads(q, d, t, b, y, None, torch.rand(300, generator=g)))
        print(json.dumps({"status": native.status(), "out": [o.double().flatten().tolist() for o in out]}))
    """
    results = {}
    for name, env in (("default", {}), (isa, {"PRCL_NATIVE_ISA": isa})):
        results[name] = json.loads(_run_python(code, **env).stdout.strip().splitlines()[-1])
    if isa != "base" and f"isa={isa}" not in results[isa]["status"]:
        pytest.skip(f"this CPU cannot run the {isa} variant: {results[isa]['status']}")
    for a, b in zip(results["default"]["out"], results[isa]["out"]):
        a, b = torch.tensor(a), torch.tensor(b)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


@needs_native
@pytest.mark.slow
def test_memory_is_bounded():
    # B = N = 20000, D = 32: one B×N float32 matrix is 1.5 GiB; the target is under 100 MB of peak
    # RSS growth for fwd+bwd, gradients included. Measured as benchmarks/bench_native.py does: a fresh
    # process whose glibc mmaps every large block (RSS follows live tensors), VmHWM reset around one
    # warm call by prcl.tools.bench.peak_memory (ru_maxrss cannot be reset; torch's import peaks higher).
    code = """
        import json, torch
        from prcl.tools import bench as pb
        step = pb.Step(pb.prcl_loss("native"), pb.make_case(20000, 20000, 32), "fwd+bwd")
        step()  # warm-up: first-call allocations, thread pool
        print(json.dumps({"growth_mb": pb.peak_memory(step, "cpu") / 2**20}))
    """
    r = json.loads(_run_python(code, MALLOC_MMAP_THRESHOLD_=str(1 << 17)).stdout.strip().splitlines()[-1])
    print(r)
    assert 0 < r["growth_mb"] < 100, r


FALLBACK = """
    import json, logging, torch
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("prcl").addHandler(Keep())
    logging.getLogger("prcl").setLevel(logging.DEBUG)
    import prcl
    from prcl.backends import native
    from prcl.core.ops import auto_backend
    q, d = torch.randn(6, 8), torch.randn(7, 8)
    auto = auto_backend(torch.device("cpu"))
    loss = prcl.fused_pair_bce(q, d)  # backend None on CPU
    ref = prcl.fused_pair_bce(q, d, backend="reference")
    try:
        prcl.fused_pair_bce(q, d, backend="native")
        explicit = "ran"
    except ValueError as e:
        explicit = str(e)
    print(json.dumps({"available": native.available(), "status": native.status(), "auto": auto,
                      "close": abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item()), "explicit": explicit,
                      "records": [r for r in records if "native" in r]}))
"""


@pytest.mark.parametrize("env", [{"PRCL_NATIVE": "0"}, {"PRCL_NATIVE_LIB": "/nonexistent/libprcl_cpu.so"}],
                         ids=["disabled", "unloadable"])
def test_fallback_to_the_torch_path(env):
    r = json.loads(_run_python(FALLBACK, PRCL_REQUIRE_NATIVE="0", **env).stdout.strip().splitlines()[-1])
    assert r["available"] is False and r["auto"] == "torch" and r["close"], r
    assert "backend='native' needs" in r["explicit"], r
    assert len(r["records"]) == 1 and "using the PyTorch path" in r["records"][0], r
    assert ("PRCL_NATIVE=0" if "PRCL_NATIVE" in env else "failed to load") in r["status"], r


@pytest.mark.parametrize("require", ["0", "1"])
def test_a_skipped_build_says_why(require, tmp_path, monkeypatch):
    # CMakeLists.txt leaves prcl_cpu.not_built instead of the library when it cannot build it
    (tmp_path / "prcl_cpu.not_built").write_text("no working C++ compiler found\n")
    monkeypatch.setattr(native, "_search_dirs", lambda: [tmp_path])
    monkeypatch.delenv("PRCL_NATIVE_LIB", raising=False)
    monkeypatch.delenv("PRCL_NATIVE", raising=False)
    monkeypatch.setenv("PRCL_REQUIRE_NATIVE", require)
    why = "the build skipped it: no working C++ compiler found"
    if require == "1":  # the load, as prcl.backends.native's first import runs it
        with pytest.raises(RuntimeError, match="PRCL_REQUIRE_NATIVE=1 but .* unavailable: .*" + re.escape(why)):
            native._load()
    else:
        loaded, status = native._load()
        assert not loaded and why in status
