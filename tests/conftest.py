import os

import torch  # importing torch does not import triton

# Triton reads TRITON_INTERPRET when it is imported: without a GPU, run the kernels in its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
