"""What the timings section times: prcl (and its Triton gradient's two designs), the eager reference,
the peers of prcl.tools.bench, the three-GEMM floor; all at prcl.core.contract.DEFAULT_SCALE and bias
−log(N−1), the library's defaults."""
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prcl.tools import bench

if TYPE_CHECKING:
    from prcl.tools.bench.timing import LossFn
    from prcl.tools.gpu_check.common import Check

DESIGNS = ("prcl panels", "prcl two-pass")  # the Triton gradient's two designs, timed side by side


def _from_bench(name: str, *args: object) -> Callable[[], "LossFn"]:
    return lambda: getattr(bench, name)(*args)


def _design(design: str) -> Callable[[], "LossFn"]:  # docs/design.md, "Two-pass gradient"
    def make() -> "LossFn":
        from prcl.backends.triton_impl import gradient_design

        loss = bench.prcl_loss("triton")

        def fn(*args: Any) -> Any:
            with gradient_design(design):
                return loss(*args)

        return fn

    return make


def peers(ck: "Check") -> list[tuple[str, Callable[[], "LossFn"]]]:
    """[(name, factory)]: factories return fn(q, d, labels, label_index) -> scalar loss."""
    made = [("prcl", _from_bench("prcl_loss")), ("prcl panels", _design("panels")), ("prcl two-pass", _design("two-pass")),
            ("eager", lambda: bench.reference_loss)]
    if not ck.dry_run:  # compiling takes minutes on a CPU
        made.append(("torch.compile", _from_bench("compiled_reference")))
    return made + [("open_clip", _from_bench("open_clip_loss")), ("siglip-kernel", _from_bench("siglip_kernel_loss")),
                   ("3-GEMM floor", _from_bench("gemm_floor"))]
