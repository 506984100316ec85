"""The loss core: the input contract and defaults (contract), the checked loss over the label-light
layouts (loss) and the `prcl::` ops with their backend registry (ops)."""
