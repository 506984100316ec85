"""Tile selection and panel shape (prcl.backends.tuning), on CPU: the candidate tables, the cached choice, the
timed choice with a stand-in timer, and the panel shape rule."""
import math

import pytest
import torch

from prcl.backends import tuning

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ARCHS = (80, 86, 89, 90, 100, 120)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(tuning, "_picked", {})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("D", [1, 64, 65, 256, 768, 1024, 4096])
def test_candidates_fit_their_gpu(arch, dtype, grad, D):
    options = tuning.candidates(arch, dtype, grad, D)
    assert options and len(options) == len({tuple(sorted(c.items())) for c in options})
    limit = tuning.MAX_SHARED[tuning.gpu_class(arch)]
    for cfg in options:
        assert tuning.shared_bytes(cfg, dtype, grad) <= limit, cfg
        assert all(cfg[k] & (cfg[k] - 1) == 0 and cfg[k] >= 16 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] >= 2
        if D <= 64:
            assert cfg["num_stages"] == 2


def test_consumer_gpus_get_smaller_tiles_than_hopper():
    for dtype in DTYPES:
        for grad in (False, True):
            big = max(tuning.shared_bytes(c, dtype, grad) for c in tuning.candidates(120, dtype, grad, 768))
            assert big <= 99 * 1024
            assert big <= max(tuning.shared_bytes(c, dtype, grad) for c in tuning.candidates(90, dtype, grad, 768))
    assert tuning.gpu_class(86) == tuning.gpu_class(89) == tuning.gpu_class(120) == "consumer"
    assert tuning.gpu_class(100) == tuning.gpu_class(90) == "sm90" and tuning.gpu_class(80) == "sm80"


def test_large_d_gets_a_deeper_pipeline_where_it_fits():
    mid = tuning.candidates(90, torch.bfloat16, False, 768)
    deep = tuning.candidates(90, torch.bfloat16, False, 4096)
    assert [c["num_stages"] for c in deep] == [c["num_stages"] + 1 for c in mid]


def test_pick_without_timing_is_the_first_candidate_and_cached():
    first = tuning.candidates(90, torch.bfloat16, True, 768)[0]
    assert tuning.pick(90, torch.bfloat16, True, 768) == first
    # a later timer for the same key (same D bucket) does not change the process's choice
    assert tuning.pick(90, torch.bfloat16, True, 1000, measure=lambda c: pytest.fail("timed again")) == first


def test_pick_times_each_candidate_once_and_keeps_the_fastest():
    options = tuning.candidates(90, torch.float16, False, 256)
    assert len(options) >= 2
    winner = options[-1]
    calls = []

    def measure(cfg):
        calls.append(cfg)
        return 1.0 if cfg == winner else 2.0

    assert tuning.pick(90, torch.float16, False, 256, measure=measure) == winner
    assert calls == options
    assert tuning.pick(90, torch.float16, False, 200, measure=measure) == winner  # same bucket: cached
    assert len(calls) == len(options)
    # another key is chosen on its own
    assert tuning.pick(90, torch.float16, True, 256, measure=lambda c: 1.0) == tuning.candidates(90, torch.float16, True, 256)[0]


def test_pick_returns_a_copy():
    cfg = tuning.pick(80, torch.float32, False, 64)
    cfg["BLOCK_M"] = 1
    assert tuning.pick(80, torch.float32, False, 64)["BLOCK_M"] != 1


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="arch"):
        tuning.candidates(75, torch.float16, False, 64)
    with pytest.raises(ValueError, match="dtype"):
        tuning.candidates(90, torch.float64, False, 64)
    with pytest.raises(ValueError, match="D"):
        tuning.candidates(90, torch.float16, False, 0)
    with pytest.raises(ValueError, match="panel_elems"):
        tuning.panel_shape(4, 4, 0)


@pytest.mark.parametrize("B,N,P", [(65536, 65536, 1 << 26), (512, 65536, 1 << 26), (16, 1 << 20, 1 << 26),
                                   (1 << 20, 16, 1 << 26), (3, 5, 1 << 26), (1000, 3000, 4096), (7, 9, 10),
                                   (1, 1, 1), (0, 8, 64)])
def test_panel_shape(B, N, P):
    rows, cols = tuning.panel_shape(B, N, P)
    assert cols == max(1, min(N, P // max(1, min(B, math.isqrt(P)))))
    assert rows == max(1, min(B, P // cols))
    assert rows * cols <= P
    # a batch that fits in one panel is one panel; otherwise the panel is filled as far as B and N allow
    if B * N <= P:
        assert (rows, cols) == (max(B, 1), N)
    else:
        assert rows * cols > P // 2 or rows == B or cols == N


def test_panel_shape_short_batches_use_wide_panels():
    assert tuning.panel_shape(512, 65536, 1 << 26) == (512, 65536)  # one panel, not 8 panels 6 % full
    assert tuning.panel_shape(65536, 65536, 1 << 26) == (8192, 8192)
    assert tuning.panel_shape(16, 1 << 20, 1 << 26) == (16, 1 << 20)
    assert tuning.panel_shape(1 << 20, 16, 1 << 26) == (1 << 20, 16)  # and short N tall ones
