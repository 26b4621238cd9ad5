"""attnkit's benchmarks (`attnkit bench`, `python -m attnkit.bench.<name>`).

They time kernels after a warm-up call, so in their processes a kernel not compiled yet is
compiled by that call (ATTNKIT_WHILE_COMPILING=wait) rather than stood in for by the NumPy
reference while helper processes compile it, which the timed calls would then measure.

Run from a source checkout's root, `python -m` puts the root on sys.path, where its folders would
shadow PyPI packages (attnkit/_checkout.py): it is taken off.
"""

import os

from .._checkout import drop_checkout_root

os.environ.setdefault("ATTNKIT_WHILE_COMPILING", "wait")
drop_checkout_root()
