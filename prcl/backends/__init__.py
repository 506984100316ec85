"""The implementations behind the `prcl::` ops: the eager float64-checked formula (reference), the
PyTorch twin of the kernels with its panel driver (torch_impl, panels), the Triton launcher with its
tuning tables (triton_impl, tuning) and the native CPU kernel's loader (native)."""
