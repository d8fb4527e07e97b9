"""Operator entry of the ModelVersion integration tests (`kopf run <this file>`): the real operator,
controllers.app (its kopf settings, probes and every controller), run as a process of its own so tests can
kill it."""

import controllers.app  # noqa: F401  (settings, probes, all handlers)
