"""`python -m gateway.demo` (what `make demo` runs): see gateway/demo/run.py."""

import sys

from .run import main

sys.exit(main())
