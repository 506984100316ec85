"""Tooling around the library: `prcl bench`, `prcl gpu-check` and `prcl compile-report`."""
