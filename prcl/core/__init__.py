"""The loss core: the input contract and defaults (contract), the label forms and their conversions
(labels), the `prcl::` ops with the Backend protocol and registry (ops) and the checked loss over the
label-light layouts (loss)."""
