"""Compile the Triton kernel for Ampere and Hopper without a GPU and report what ptxas says.

    python -m prcl.compile_report [--json]   # a row per (arch, dtype, mode): shared memory, registers, spills

triton.compile with an explicit GPUTarget needs no driver; `ptxas -v` on the PTX gives registers
and spills. The launch configuration is the launcher's own (`kernel_config`), so this reports what
runs. Pointer and stride arguments get the 16-byte divisibility the JIT would specialise on.
Run it without TRITON_INTERPRET: the interpreter's kernels cannot be compiled.
"""
import json
import os
import re
import subprocess
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from prcl.kernels.pair_bce import pair_tile_kernel
from prcl.triton_impl import kernel_config

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_kernel(arch, dtype, write_g):
    cfg = kernel_config(dtype, write_g, arch)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    ty = TRITON_TYPES[dtype]
    constexprs = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, WRITE_G=write_g, HAS_W=False, UPCAST=False,
                      INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    signature = {"q_desc": f"tensordesc<{ty}[{BM},{BK}]>", "d_desc": f"tensordesc<{ty}[{BN},{BK}]>",
                 "g_desc": f"tensordesc<{ty}[{BM},{BN}]>"}
    names = pair_tile_kernel.arg_names
    for name in names:
        signature.setdefault(name, "constexpr" if name in constexprs else "*fp32" if name.endswith("_ptr") else "i32")
    aligned = [n for n in names if n.endswith("_ptr") or n == "D"]
    src = ASTSource(fn=pair_tile_kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])), cfg


def ptxas_report(ptx, arch):
    """(registers, spill store bytes) from `ptxas -v`, using the newest ptxas bundled with triton."""
    bin_dir = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
    ptxas = max((os.path.join(bin_dir, f) for f in os.listdir(bin_dir) if f.startswith("ptxas")), key=_ptxas_version)
    path = f"/tmp/prcl_sm{arch}_{os.getpid()}.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    out = subprocess.run([ptxas, "-v", "--gpu-name", gpu, path, "-o", os.devnull], capture_output=True, text=True)
    os.remove(path)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return int(re.search(r"Used (\d+) registers", out.stderr)[1]), int(re.search(r"(\d+) bytes spill stores", out.stderr)[1])


def _ptxas_version(path):
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return tuple(int(x) for x in re.search(r"release (\d+)\.(\d+)", out).groups())


def report(arch, dtype, write_g):
    kernel, cfg = compile_kernel(arch, dtype, write_g)
    ptx = kernel.asm["ptx"]
    regs, spills = ptxas_report(ptx, arch)
    return dict(arch=f"sm_{arch}", dtype=TRITON_TYPES[dtype], mode="grad" if write_g else "fwd",
                tile=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}", warps=cfg["num_warps"],
                stages=cfg["num_stages"], shared=kernel.metadata.shared, registers=regs, spill_bytes=spills,
                mma=next((m for m in ("wgmma.mma_async", "mma.sync") if m in ptx), "none (FMA)"),
                tma="cp.async.bulk.tensor" in ptx)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rows = [report(arch, dtype, write_g) for arch in (80, 90) for dtype in TRITON_TYPES for write_g in (False, True)]
    if "--json" in argv:
        print(json.dumps(rows))
        return 0
    print(f"triton {triton.__version__}, pair_tile_kernel")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
