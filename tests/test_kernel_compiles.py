"""The Triton kernel compiles for Ampere and Hopper (and Blackwell where the toolchain can) without a
GPU, in the launcher's own configurations: no register spills in the 16-bit paths, wgmma and TMA on
sm_90; and the compile report's machine-code measures (epilogue instructions per pair, blocks per SM)
count what their definitions say."""
import inspect
import json
import os
import subprocess
import sys

import pytest

from prcl.tools import compile_report


@pytest.fixture(scope="module")
def report():
    # a fresh process: this session's triton may run in the interpreter, which cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "prcl.tools.compile_report", "--json"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rows(report):
    return {(r["arch"], r["dtype"], r["mode"]): r for r in report["rows"]}


SHARED_LIMIT_KIB = {"sm_80": 163, "sm_90": 227, "sm_100": 227, "sm_120": 99}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fwd", "grad"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles(rows, arch, dtype, mode):
    r = rows[arch, dtype, mode]
    print(r)
    assert 0 < r["shared"] <= SHARED_LIMIT_KIB[arch] * 1024
    assert 0 < r["registers"] <= 255 and r["blocks_per_sm"] >= 1
    assert r["epilogue_per_pair"] > 0
    if dtype != "fp32":
        assert r["spill_bytes"] == 0
        assert r["mma"] == ("wgmma" if arch == "sm_90" else "mma.sync")
    else:
        assert r["mma"] == "FMA"  # IEEE fp32 products run on the FMA units
    assert r["tma"] == (arch == "sm_90")


@pytest.mark.slow
@pytest.mark.parametrize("mode,goal", [("fwd", 16), ("grad", 25)])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sm90_16bit_epilogue_meets_its_goal(rows, dtype, mode, goal):
    r = rows["sm_90", dtype, mode]
    assert r["epilogue_per_pair"] <= goal and r["blocks_per_sm"] >= 2 and r["spill_bytes"] == 0


@pytest.mark.slow
def test_sm90_false_negative_mask_costs_its_compare_only(rows):
    """With HAS_THR (false_negative_margin) the sm_90 kernels still compile without spills at the same
    blocks per SM, and the 16-bit epilogues grow by the per-pair test only (3 instructions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "prcl.tools.compile_report", "--json", "--arch", "90",
                          "--false-negative-mask"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    masked = json.loads(out.stdout.strip().splitlines()[-1])
    assert masked["false_negative_mask"]
    for r in masked["rows"]:
        plain = rows[r["arch"], r["dtype"], r["mode"]]
        assert r["blocks_per_sm"] == plain["blocks_per_sm"] and r["mma"] == plain["mma"], r
        if r["dtype"] != "fp32":
            assert r["spill_bytes"] == 0 and r["epilogue_per_pair"] <= round(plain["epilogue_per_pair"] + 3, 1), r


@pytest.mark.slow
def test_optional_archs_are_reported_or_say_why(report, rows):
    for arch in ("sm_100", "sm_120"):
        reported = [r for r in rows.values() if r["arch"] == arch]
        if reported:
            assert len(reported) == 6
            assert all(0 < r["shared"] <= SHARED_LIMIT_KIB[arch] * 1024 for r in reported)
        else:
            assert any(s.startswith(arch + ":") for s in report["skipped"])


# A hand-written nvdisasm -g listing: a tile loop (0x10-0xc0) around a K loop (0x40-0x60) whose
# tl.dot is on line 12 of k.py; the loop statement spans lines 11-13. After EXIT, an out-of-line wait
# branches back into the K loop (not a loop: it spans the EXIT), and a spin loop, smaller than the K
# loop, carries the dot's line (a loop, but nested in none: not the MMA loop).
SASS = """
        /*0000*/                   MOV R1, R2 ;
.L_x_0:
	//## File "/src/k.py", line 10
        /*0010*/                   NOP ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
	//## File "/src/k.py", line 11
        /*0030*/                   UTMALDG.2D [UR8], [UR4] ;
.L_x_1:
	//## File "/src/k.py", line 12
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR16], R24 ;
.L_x_2:
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR10], R1 ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
	//## File "/src/k.py", line 13
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
	//## File "/src/k.py", line 15
        /*0080*/                   MUFU.EX2 R3, R3 ;
	//## File "/lib/standard.py", line 263
        /*0090*/                   SHFL.BFLY PT, R4, R3, 0x1, 0x1f ;
	//## File "/src/k.py", line 16
        /*00a0*/              @!P1 BRA `(.L_x_3) ;
        /*00b0*/                   STL [R1], R3 ;
        /*00c0*/               @P2 BRA `(.L_x_0) ;
        /*00d0*/                   EXIT ;
.L_x_3:
        /*00e0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR10], R1 ;
        /*00f0*/                   BRA `(.L_x_2) ;
.L_x_4:
	//## File "/src/k.py", line 12
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR10], R1 ;
        /*0110*/              @!P0 BRA `(.L_x_4) ;
"""


def test_epilogue_count_follows_its_definition():
    instructions, labels = compile_report.parse_sass(SASS)
    assert labels == {".L_x_0": 0x10, ".L_x_1": 0x40, ".L_x_2": 0x50, ".L_x_3": 0xe0, ".L_x_4": 0x100}
    source = os.path.realpath("/src/k.py")
    assert [i[2:] for i in instructions[:4]] == [(None, None), (source, 10), (source, 10), (source, 11)]
    assert compile_report.loops(instructions, labels) == [(0x40, 0x60), (0x10, 0xc0), (0x100, 0x110)]
    # tile loop 0x10-0xc0 (12 instructions) less the K loop 0x40-0x60 (3) less lines 11-13 outside
    # it (the TMA load at 0x30 and the wait at 0x70): NOP, IADD3, MUFU, SHFL, BRA, STL, BRA
    assert compile_report.epilogue_instructions(instructions, labels, source, {12}, {11, 12, 13}) == 7
    with pytest.raises(ValueError, match="tl.dot"):
        compile_report.epilogue_instructions(instructions, labels, source, {99}, {99})


def test_mma_source_lines_find_the_innermost_dot_loop():
    fn = compile_report.pair_tile_kernel.fn
    source, dots, loop_lines = compile_report.mma_source_lines(fn)
    with open(source) as f:
        text = f.read().splitlines()
    assert dots and all("tl.dot(" in text[line - 1] for line in dots)
    first = min(loop_lines)
    assert text[first - 1].lstrip().startswith("for ") and dots <= loop_lines
    body, start = inspect.getsourcelines(fn)
    end = start + len(body) - 1
    assert "tl.dot(" not in "\n".join(text[max(loop_lines):end])  # nothing after the loop is a dot


@pytest.mark.parametrize("arch,registers,shared,warps,expected", [
    (90, 208, 90136, 8, 1),    # 208 registers: one 8-warp block
    (90, 128, 90136, 8, 2),    # 128: two, and two fit in 228 KiB of shared memory
    (90, 128, 150000, 8, 1),   # shared memory limits
    (90, 32, 1000, 4, 16),     # warps limit (64 per SM)
    (120, 32, 1000, 4, 12),    # sm_120: 48 warps per SM
    (80, 85, 1000, 8, 2),      # 85 registers are allocated as 88: two blocks, not three
])
def test_blocks_per_sm(arch, registers, shared, warps, expected):
    assert compile_report.blocks_per_sm(arch, registers, shared, warps) == expected
