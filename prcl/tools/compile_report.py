"""Compile the Triton kernel for Ampere, Hopper and Blackwell without a GPU and measure the machine code.

    python -m prcl compile-report [--json] [--arch 80 90 ...] [--false-negative-mask]   # a row per (arch, dtype, fwd/grad)
    VENV/bin/python -m prcl compile-report                     # the same with another triton (a venv)

triton.compile with an explicit GPUTarget needs no driver. Each row is read from the cubin that triton
itself builds for the launcher's own configuration (`prcl.backends.triton_impl.kernel_config`), with the
cuobjdump and nvdisasm that triton bundles:

- registers and stack (bytes of stack frame): `cuobjdump -res-usage`; spill_bytes: the spill stores
  `ptxas -v` reports when triton's own ptxas for the arch recompiles the PTX (not local stores in
  the SASS: on sm_120 those include call arguments).
- blocks_per_sm: resident blocks per SM for this arch, the least of what registers (rounded up to 8
  per thread), shared memory (triton's dynamic allocation plus the cubin's static shared memory plus
  the 1 KiB the runtime reserves per block) and warps allow.
- mma: the PTX matrix instruction, tcgen05.mma, wgmma (wgmma.mma_async), mma.sync, or FMA;
  tma: whether the PTX uses TMA (cp.async.bulk.tensor).
- epilogue_per_pair: SASS instructions of the per-tile epilogue per pair a thread owns. Defined as:
  loops are the address ranges [target, branch] of backward branches in the SASS; the MMA loop is,
  among the loops nested in another, the one holding the most instructions that the line table
  attributes to the kernel's `tl.dot` call (out-of-line mbarrier waits carry that line too, but sit in
  no other loop); the tile loop is the smallest loop strictly containing it. The epilogue is every instruction of
  the tile loop outside the MMA loop, except those the line table attributes to the source lines of
  the `for` statement around `tl.dot` (the software pipeline's loads and waits peeled out of the K
  loop). It is divided by the pairs per thread per tile, BLOCK_M·BLOCK_N / (32·num_warps).

Limits of that measure: it is a static count, each instruction once. A branch inside the epilogue
(an edge-tile path beside an interior one) counts both sides; a loop inside it (the sparse label
columns) counts one iteration, i.e. the K = 1 of diagonal labels; code that ptxas moves out of the
tile loop's address range (cold paths after EXIT, the IEEE division's slow path behind CALL) is not
counted; loop bookkeeping of the tile loop is. Instructions are not weighted by issue cost or
latency (MUFU, conversions and FFMA count alike).

A second table (sm_90, fp16/bf16) measures the gradient kernels' whole tile loops for the performance
model in docs/design.md ("Two-pass gradient"): loop_per_pair is every SASS instruction of the tile
loop (the loop holding the most `tl.dot` instructions, the largest such), MMAs included and an MMA loop
counted once, per pair a thread owns; rows for the panel kernel at D = 64 (one K step) and for both
passes of the two-pass gradient (pair_pass_kernel) at D ∈ TWO_PASS_DS, in the launcher's tiles.

The kernel's signature is read from the JIT function: constexprs from kernel_config where it names
them, WRITE_G and INPUT_PRECISION from the row, every other constexpr flag off (the plain case:
no weights, sparse labels, as the diagonal default runs); --false-negative-mask turns HAS_THR on
(false_negative_margin's per-pair compare). Tensor descriptors get the blocks of
DESC_BLOCKS, pointers `*fp32` unless POINTER_TYPES says otherwise, other arguments i32; pointers and
D get the 16-byte divisibility the JIT would specialise on. Run it without TRITON_INTERPRET: the
interpreter's kernels cannot be compiled.
"""
import argparse
import ast
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from prcl.backends.triton_impl import input_precision, kernel_config, pair_pass_kernel, pair_tile_kernel
from prcl.backends.tuning import two_pass_config

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ARCHS = (80, 90, 100, 120)
OPTIONAL_ARCHS = (100, 120)  # reported when the installed triton and ptxas can target them
DESC_BLOCKS = {"q_desc": ("BLOCK_M", "BLOCK_K"), "d_desc": ("BLOCK_N", "BLOCK_K"), "g_desc": ("BLOCK_M", "BLOCK_N"),
               "own_desc": ("BLOCK_O", "BLOCK_D"), "str_desc": ("BLOCK_S", "BLOCK_D")}
POINTER_TYPES = {"idx_ptr": "*i64"}
# Per SM: 32-bit registers, shared memory bytes, resident warps, resident blocks (CUDA occupancy tables)
SM_LIMITS = {80: (65536, 167936, 64, 32), 90: (65536, 233472, 64, 32),
             100: (65536, 233472, 64, 32), 120: (65536, 102400, 48, 32)}
RESERVED_SHARED = 1024  # per block, held back by the CUDA runtime on sm_80 and later


def compile_kernel(arch: int, dtype: torch.dtype, write_g: bool, mask: bool = False) -> tuple[Any, dict[str, Any]]:
    cfg = kernel_config(dtype, write_g, arch)
    return _compile(pair_tile_kernel, arch, dtype, cfg, dict(WRITE_G=write_g, HAS_THR=mask)), cfg


def compile_pass(arch: int, dtype: torch.dtype, D: int, row_pass: bool,
                 mask: bool = False) -> tuple[Any, dict[str, Any]]:
    """A pass of the two-pass gradient at width D (a power of two), in the launcher's configuration."""
    cfg = dict(two_pass_config(D), BLOCK_D=D)
    return _compile(pair_pass_kernel, arch, dtype, cfg, dict(ROW_PASS=row_pass, HAS_THR=mask)), cfg


def _compile(fn, arch, dtype, cfg, flags):
    ty = TRITON_TYPES[dtype]
    known = dict(cfg, **flags, INPUT_PRECISION=input_precision(dtype))
    params = fn.params
    names = [p.name for p in params]
    constexprs, signature = {}, {}
    for p in params:
        if p.is_constexpr:
            constexprs[p.name] = known.get(p.name, False)
            signature[p.name] = "constexpr"
        elif p.name.endswith("_desc"):
            if p.name not in DESC_BLOCKS:
                raise ValueError(f"{fn.__name__} argument {p.name!r}: no block shape in DESC_BLOCKS")
            rows, cols = (cfg[b] for b in DESC_BLOCKS[p.name])
            signature[p.name] = f"tensordesc<{ty}[{rows},{cols}]>"
        elif p.name.endswith("_ptr"):
            signature[p.name] = POINTER_TYPES.get(p.name, "*fp32")
        else:
            signature[p.name] = "i32"
    aligned = [n for n in names if n.endswith("_ptr") or n == "D"]
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def _tool(name):
    return os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", name)


def _run(args):
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{os.path.basename(args[0])} failed: {out.stderr.strip()}")
    return out.stdout


def spill_bytes(ptx: str, arch: int) -> int:
    """Bytes of spill stores that `ptxas -v` reports, with the ptxas and arch name triton compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", f.name,
                              "-o", os.devnull], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()}")
    return int(re.search(r"(\d+) bytes spill stores", out.stderr)[1])


def cubin_tools(cubin: bytes) -> tuple[str, str]:
    """(SASS listing with line info, resource usage text) of a cubin, from triton's own tools."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _run([_tool("nvdisasm"), "-c", "-g", f.name]), _run([_tool("cuobjdump"), "-res-usage", f.name])


INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
BRANCH_TARGET = re.compile(r"\bBRA\S*\s.*?(\.L_x_\d+)")
Instruction = tuple[int, str, str | None, int | None]  # (address, text, source file, source line)


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """[(address, instruction text, source file, source line)] and {label: address} of an nvdisasm -g
    listing; an instruction carries the last line-info comment above it."""
    instructions, labels, pending, where = [], {}, [], (None, None)
    for line in text.splitlines():
        if m := LINE_INFO.search(line):
            where = (os.path.realpath(m[1]), int(m[2]))
        elif m := LABEL.match(line):
            pending.append(m[1])
        elif m := INSTRUCTION.match(line):
            address = int(m[1], 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append((address, m[2], *where))
    return instructions, labels


def loops(instructions: list[Instruction], labels: dict[str, int]) -> list[tuple[int, int]]:
    """Address ranges [start, end] closed by a backward branch. A range across an unconditional EXIT
    is not a loop: it is out-of-line code (an mbarrier wait) branching back to where it was called."""
    exits = [a for a, text, _, _ in instructions if text.split()[0] == "EXIT"]
    found = []
    for address, text, _, _ in instructions:
        if (m := BRANCH_TARGET.search(text)) and labels.get(m[1], address + 1) <= address:
            start = labels[m[1]]
            if not any(start <= e <= address for e in exits):
                found.append((start, address))
    return found


def mma_source_lines(fn: Callable[..., object]) -> tuple[str, set[int], set[int]]:
    """(file, lines of the tl.dot calls, lines of the `for` statement around them) of a JIT kernel."""
    lines, start = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    dots, loop_lines = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.For):
            continue
        calls = [c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                 and c.func.attr == "dot"]
        inner = [f for f in ast.walk(node) if isinstance(f, ast.For) and f is not node]
        if calls and not any(c in ast.walk(f) for f in inner for c in calls):  # the innermost dot loop
            dots.update(start + c.lineno - 1 for c in calls)
            loop_lines.update(range(start + node.lineno - 1, start + node.end_lineno))
    if not dots:
        raise ValueError(f"{fn.__name__}: no tl.dot inside a for loop")
    return os.path.realpath(inspect.getsourcefile(fn)), dots, loop_lines


def epilogue_instructions(instructions: list[Instruction], labels: dict[str, int], source_file: str,
                          dot_lines: set[int], mma_loop_lines: set[int]) -> int:
    """Number of SASS instructions in the per-tile epilogue (module docstring: the definition)."""
    ranges = loops(instructions, labels)

    def smallest(candidates):
        return min(candidates, key=lambda r: r[1] - r[0], default=None)

    def around(r):
        return [o for o in ranges if o != r and o[0] <= r[0] and r[1] <= o[1]]

    # by file name: a cubin from triton's cache carries the path of the checkout that first compiled it
    source_file = os.path.basename(source_file)
    dot_addresses = [a for a, _, f, line in instructions if _name(f) == source_file and line in dot_lines]
    dots_in = {r: sum(r[0] <= a <= r[1] for a in dot_addresses) for r in ranges if around(r)}
    mma = max((r for r in dots_in if dots_in[r]), key=lambda r: (dots_in[r], r[0] - r[1]), default=None)
    if mma is None:
        raise ValueError("no SASS loop nested in another holds the tl.dot instructions")
    tile = smallest(around(mma))
    if tile is None:
        raise ValueError("no SASS loop around the MMA loop (the per-tile loop)")
    return sum(1 for a, _, f, line in instructions
               if tile[0] <= a <= tile[1] and not mma[0] <= a <= mma[1]
               and not (_name(f) == source_file and line in mma_loop_lines))


def tile_loop_instructions(instructions: list[Instruction], labels: dict[str, int], source_file: str,
                           dot_lines: set[int]) -> int:
    """Every SASS instruction of the tile loop, MMAs and any MMA loop (one iteration) included: the
    loop that holds the most instructions attributed to the `tl.dot` lines, the largest such."""
    source_file = os.path.basename(source_file)
    dots = [a for a, _, f, line in instructions if _name(f) == source_file and line in dot_lines]
    ranges = loops(instructions, labels)
    held = {r: sum(r[0] <= a <= r[1] for a in dots) for r in ranges}
    tile = max(ranges, key=lambda r: (held[r], r[1] - r[0]))
    return sum(1 for a, *_ in instructions if tile[0] <= a <= tile[1])


def _name(path):
    return path and os.path.basename(path)


def blocks_per_sm(arch: int, registers: int, shared: int, warps: int) -> int:
    regs, smem, max_warps, max_blocks = SM_LIMITS[arch]
    by_regs = regs // (-(-registers // 8) * 8 * 32 * warps)
    by_smem = smem // (shared + RESERVED_SHARED)
    return min(by_regs, by_smem, max_warps // warps, max_blocks)


def report(arch: int, dtype: torch.dtype, write_g: bool, kernel: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    ptx = kernel.asm["ptx"]
    sass, usage = cubin_tools(kernel.asm["cubin"])
    registers = int(re.search(r"REG:(\d+)", usage)[1])
    stack = int(re.search(r"STACK:(\d+)", usage)[1])
    static_shared = int(re.search(r"SHARED:(\d+)", usage)[1])
    instructions, labels = parse_sass(sass)
    epilogue = epilogue_instructions(instructions, labels, *mma_source_lines(pair_tile_kernel.fn))
    warps = cfg["num_warps"]
    pairs_per_thread = cfg["BLOCK_M"] * cfg["BLOCK_N"] / (32 * warps)
    shared = kernel.metadata.shared + static_shared
    mma = next((name for name, ptx_op in (("tcgen05.mma", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"),
                                          ("mma.sync", "mma.sync")) if ptx_op in ptx), "FMA")
    return dict(arch=f"sm_{arch}", dtype=TRITON_TYPES[dtype], mode="grad" if write_g else "fwd",
                tile=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}", warps=warps,
                stages=cfg["num_stages"], shared=shared, registers=registers, spill_bytes=spill_bytes(ptx, arch),
                stack=stack, blocks_per_sm=blocks_per_sm(arch, registers, shared, warps),
                epilogue_per_pair=round(epilogue / pairs_per_thread, 1), mma=mma, tma="cp.async.bulk.tensor" in ptx)


TWO_PASS_DS = (64, 128, 256)


def gradient_loops(arch: int = 90, dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16),
                   mask: bool = False) -> list[dict[str, Any]]:
    """Whole tile loops of the gradient kernels per pair a thread owns, the inputs of the model in
    docs/design.md ("Two-pass gradient"): the panel kernel at D = 64 (one K step; each further 64 of D
    adds one MMA loop iteration), and each pass of the two-pass gradient at TWO_PASS_DS."""
    out = []
    for dtype in dtypes:
        cases = [("panels", 64, kernel_config(dtype, True, arch, 64), None)]
        cases += [(f"two-pass {'rows' if rp else 'cols'}", D, None, rp) for D in TWO_PASS_DS for rp in (True, False)]
        for design, D, cfg, row_pass in cases:
            if row_pass is None:
                kernel = _compile(pair_tile_kernel, arch, dtype, cfg, dict(WRITE_G=True, HAS_THR=mask))
                fn, tile, pairs = pair_tile_kernel, f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}", \
                    cfg["BLOCK_M"] * cfg["BLOCK_N"]
            else:
                kernel, cfg = compile_pass(arch, dtype, D, row_pass, mask)
                fn, tile, pairs = pair_pass_kernel, f"{cfg['BLOCK_O']}x{cfg['BLOCK_S']}x{D}", cfg["BLOCK_O"] * cfg["BLOCK_S"]
            sass, usage = cubin_tools(kernel.asm["cubin"])
            registers = int(re.search(r"REG:(\d+)", usage)[1])
            shared = kernel.metadata.shared + int(re.search(r"SHARED:(\d+)", usage)[1])
            file, dots, _ = mma_source_lines(fn.fn)
            loop = tile_loop_instructions(*parse_sass(sass), file, dots)
            warps = cfg["num_warps"]
            out.append(dict(arch=f"sm_{arch}", dtype=TRITON_TYPES[dtype], design=design, D=D, tile=tile, warps=warps,
                            stages=cfg["num_stages"], shared=shared, registers=registers,
                            spill_bytes=spill_bytes(kernel.asm["ptx"], arch),
                            blocks_per_sm=blocks_per_sm(arch, registers, shared, warps),
                            loop_per_pair=round(loop * 32 * warps / pairs, 1)))
    return out


def rows_for(arch: int, mask: bool = False) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The rows of one arch; an optional arch the toolchain cannot compile for gives (None, reason)."""
    configs = [(dtype, write_g) for dtype in TRITON_TYPES for write_g in (False, True)]
    try:
        kernels = [compile_kernel(arch, dtype, write_g, mask) for dtype, write_g in configs]
    except Exception as e:  # noqa: BLE001 (only for OPTIONAL_ARCHS: the others re-raise)
        if arch not in OPTIONAL_ARCHS:
            raise
        text = str(e).strip()
        return None, f"sm_{arch}: not compiled with triton {triton.__version__} ({type(e).__name__}: " \
                     f"{text.splitlines()[0][:200] if text else ''})"
    return [report(arch, *config, *kernel) for config, kernel in zip(configs, kernels)], None


def _parser():
    p = argparse.ArgumentParser(prog="python -m prcl compile-report", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object: triton version, rows, skipped archs")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--false-negative-mask", action="store_true",
                   help="compile with false_negative_margin's compare (HAS_THR) switched on")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows, skipped = [], []
    for arch in args.arch:
        got, reason = rows_for(arch, args.false_negative_mask)
        rows.extend(got or [])
        skipped.extend([reason] if reason else [])
    loops_ = gradient_loops(mask=args.false_negative_mask) if 90 in args.arch else []
    if args.json:
        print(json.dumps(dict(triton=triton.__version__, false_negative_mask=args.false_negative_mask, rows=rows,
                              skipped=skipped, gradient_loops=loops_)))
        return 0
    print(f"triton {triton.__version__}, pair_tile_kernel{' with the false-negative mask' if args.false_negative_mask else ''}")
    _print_table(rows)
    for reason in skipped:
        print(reason)
    if loops_:
        print("\nsm_90 gradient kernels, whole tile loop (loop_per_pair: SASS instructions per pair a thread owns)")
        _print_table(loops_)
    return 0


def _print_table(rows):
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    sys.exit(main())
