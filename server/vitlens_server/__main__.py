"""`python -m vitlens_server` is `vitlens serve`."""

import sys

from vitlens_server.cli import main

sys.exit(main())
