"""attnkit's benchmarks (`attnkit bench`, `python -m attnkit.bench.<name>`).

They time kernels after a warm-up call, so in their processes a kernel not compiled yet is
compiled by that call (ATTNKIT_WHILE_COMPILING=wait) rather than stood in for by the NumPy
reference while helper processes compile it, which the timed calls would then measure.
"""

import os

os.environ.setdefault("ATTNKIT_WHILE_COMPILING", "wait")
