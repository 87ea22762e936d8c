"""Locate-then-edit methods (ROME, MEMIT, AlphaEdit, MetaKE) and their shared machinery.

keys.py (prefixes, subject positions, keys), target.py (target residual optimisation), stats.py (cached key
second moments), solvers.py (closed-form updates), base.py (the shared method), one module per method.
"""

from . import alphaedit, memit, metake, rome  # noqa: F401  (registration)
