"""The command-line apps: pretrain, finetune, spectrum, demo.

XLA:CPU runs independent batched LAPACK calls (the Cholesky-QR of the fast
SVT, one per block shape) concurrently on its intra-op thread pool, which has
one thread per core; on small machines they can wait on each other forever.
A pool of at least 8 threads avoids that.  JAX reads NPROC when it starts, so
it is set here, before any app imports JAX (``python -m experiments.<app>``
imports this package first).
"""

import os

os.environ.setdefault("NPROC", str(max(8, os.cpu_count() or 1)))
