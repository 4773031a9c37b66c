"""`flower-supernode`, with log lines that an IT department's tools can read.

Flower colours its log levels and leaves out timestamps; written to a file (`supernode.log`,
systemd's journal, CI) that is escape codes and no time. We run the unmodified SuperNode with
timestamps on and colour only on a terminal; everything else, its command line included, is
Flower's.
"""

from __future__ import annotations

import sys

from common.flower_compat import plain_console_logs


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    plain_console_logs()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
