"""The one seed-mixing function: every RNG of a run is seeded from a tuple of integers through it.

The data stream (seed, segment, rank, worker slot...) and the trainer's per-micro-step torch seed
(seed, step, micro-step, rank) both come from here, so a resumed run replays the same draws.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """Well-mixed 63-bit seed from integers (a SeedSequence hash: nearby tuples give unrelated seeds)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state.view(np.uint64)[0] >> 1)
