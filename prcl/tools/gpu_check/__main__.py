"""`python -m prcl.tools.gpu_check`, the same as `python -m prcl gpu-check`."""
from prcl.tools.gpu_check import main

raise SystemExit(main())
