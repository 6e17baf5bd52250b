"""``python -m nwave_param``: the command line (:mod:`nwave_param.checkpoints.cli`)."""

import sys

from nwave_param.checkpoints.cli import main

sys.exit(main())
