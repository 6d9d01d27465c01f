"""Console logging of every stage: one format, rank-tagged, quiet on ranks > 0."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int) -> None:
    """Rank-tagged log lines on stderr; ranks > 0 only warn, so the console is not doubled."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
