"""`python -m gateway` runs the `iot-gateway` command."""

import sys

from .cli import main

sys.exit(main())
