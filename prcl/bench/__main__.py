"""`python -m prcl.bench`, the same as `python -m prcl bench`."""
from prcl.bench.cli import main

raise SystemExit(main())
