"""`python -m prcl.tools.bench`, the same as `python -m prcl bench`."""
from prcl.tools.bench.cli import main

raise SystemExit(main())
