"""A node run by a new interpreter: what a launcher execs after `mesh restart NODE`, so
the node runs the code on disk now, not the code the launcher imported when it began.

    python -m mesh.fresh CONFIG NODE BOOT PREVIOUS_JSON CONTROL_FD

It is the launcher's own child (exec keeps the pid the launcher watches) and speaks to
it over the inherited socket, as a forked node does.
"""

from __future__ import annotations

import json
import socket
import sys


def main(argv: list[str]) -> int:
    config_path, name, boot, previous, fd = argv
    from . import config as config_mod
    from .serve import configure_logging, run_node
    configure_logging()
    control = socket.socket(fileno=int(fd))
    return run_node(config_mod.load(config_path), name, boot, json.loads(previous), control)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
