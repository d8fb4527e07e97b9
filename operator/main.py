"""Kubeforge operator entry for `kopf run operator/main.py`.

`operator/` deliberately has no __init__.py: `operator` is a standard-library module and must never be
shadowed. Everything lives in the `controllers` package; this file only loads it.
"""

import controllers.app  # noqa: F401  (kopf settings, probes and handlers register on import)
