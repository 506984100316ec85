"""Adapters that plug prcl's loss into other training libraries (each needs its own optional extra)."""
