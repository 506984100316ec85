"""Bad input raises ValueError naming the argument (and the shapes), for the fused op and the reference."""
import pytest
import torch

import prcl
from prcl.backends.reference import pair_bce

q = torch.randn(4, 8)
d = torch.randn(6, 8)
idx = torch.tensor([[0, 1], [2, -1], [3, 4], [5, -1]])
y = torch.rand(4, 2)

CASES = {
    "q-1d": ((torch.randn(8), d), {}, r"q: expected a 2-D tensor, got shape \(8,\)"),
    "d-int": ((q, torch.ones(6, 8, dtype=torch.int64)), {}, "d: dtype torch.int64"),
    "dtype-mismatch": ((q, d.half()), {}, "q and d must share a dtype"),
    # the meta device stands in for a second device on a machine without a GPU
    "device-mismatch": ((q, d.to("meta")), {}, "q and d must share a device, got q on cpu and d on meta"),
    "labels-device": ((q, d, torch.rand(4, device="meta")), {}, "labels: on meta but q is on cpu"),
    "dim-mismatch": ((q, torch.randn(6, 5)), {}, r"same embedding dim.*q\(4, 8\), d\(6, 5\)"),
    "empty-batch": ((q[:0], d), {}, r"empty batch: q\(0, 8\)"),
    "empty-docs": ((q, d[:0]), {}, r"empty batch: .*d\(0, 8\)"),
    "diagonal-N<B": ((q, d[:3]), {}, r"N >= B: q\(4, 8\), d\(3, 8\)"),
    "graded-N<B": ((q, d[:3], torch.rand(4)), {}, r"labels of shape \(B,\).*N >= B"),
    "graded-wrong-len": ((q, d, torch.rand(5)), {}, r"labels: graded diagonal labels must be \(B,\): q\(4, 8\), labels\(5,\)"),
    "dense-wrong-shape": ((q, d, torch.rand(4, 5)), {}, r"labels: expected \(B,\), \(B, N\).*labels\(4, 5\)"),
    "labels-above-1": ((q, d, torch.full((4,), 1.5)), {}, r"labels: values must lie in \[0, 1\]"),
    "labels-nan": ((q, d, torch.tensor([0.5, float("nan"), 0.0, 1.0])), {}, r"labels: .*NaN"),
    "labels-int": ((q, d, torch.ones(4, dtype=torch.int64)), {}, "labels: expected a floating tensor"),
    "index-without-labels": ((q, d), {"label_index": idx}, r"label_index\(4, 2\) given without labels"),
    "index-shape": ((q, d, y), {"label_index": idx[:, :1]}, r"labels and label_index must both be \(B, K\)"),
    "index-dtype": ((q, d, y), {"label_index": idx.int()}, "label_index: expected an int64 tensor"),
    "index-out-of-range": ((q, d, y), {"label_index": idx + 3}, r"label_index: values must lie in \[-1, N\) = \[-1, 6\)"),
    "index-below-pad": ((q, d, y), {"label_index": idx - 2}, r"label_index: values must lie in \[-1, N\)"),
    "index-duplicate": ((q, d, y), {"label_index": torch.tensor([[0, 0], [1, 2], [3, 4], [5, -1]])},
                        "label_index: a document index appears twice"),
    "scale-nonpositive": ((q, d), {"scale": 0.0}, "scale: must be > 0"),
    "scale-nan": ((q, d), {"scale": float("nan")}, "scale: expected a finite float"),
    "scale-vector": ((q, d), {"scale": torch.ones(2)}, r"scale: expected a float or a 0-dim floating tensor"),
    "bias-string": ((q, d), {"bias": "auto"}, "bias: expected a finite float"),
    "reduction": ((q, d), {"reduction": "avg"}, "reduction: expected one of"),
    "backend": ((q, d), {"backend": "cuda"}, "backend: expected one of"),
}


@pytest.mark.parametrize("fn", [prcl.fused_pair_bce, pair_bce], ids=["fused", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_value_error(case, fn):
    args, kwargs, message = CASES[case]
    with pytest.raises(ValueError, match=message):
        fn(*args, **kwargs)


def test_every_kernel_backend_choice_is_registered():
    from prcl.core.contract import BACKEND_CHOICES
    from prcl.core.ops import REGISTRY

    assert set(BACKEND_CHOICES) - {None, "reference"} == set(REGISTRY)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        prcl.fused_pair_bce(q, d, backend="triton")


def test_reference_rejects_process_group():
    with pytest.raises(ValueError, match="process_group"):
        pair_bce(q, d, process_group=object())
