"""`python -m vitlens_server.bench` is `vitlens bench`."""

import sys

from vitlens_server.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
