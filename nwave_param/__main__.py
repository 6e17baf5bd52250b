"""``python -m nwave_param``: the command line (:mod:`nwave_param.cli`)."""

import sys

from .cli import main

sys.exit(main())
