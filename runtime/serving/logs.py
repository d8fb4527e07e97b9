"""Structured logs: one JSON object per line on stderr, with the `extra={...}` fields of each call.

The settings of Triton's logging extension (`GET/POST v2/logging`, gRPC `LogSettings`; protocol.triton) map
onto them: `log_info`, `log_warnings` and `log_errors` let each level through or not, `log_verbose_level` 1
adds the server's debug lines (one per answered request among them), 2 and up also the info lines of torch's
compiler and MLflow (otherwise warnings only), and `log_format` is ours: `json` or `text`. Decision:
`log_file` stays empty, logs go to stderr (where Kubernetes collects them); setting another file is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


NOISY = ("torch._inductor", "torch._dynamo", "mlflow", "alembic")
FORMATS = ("json", "text")
_settings: dict[str, Any] = {
    "log_file": "",
    "log_info": True,
    "log_warnings": True,
    "log_errors": True,
    "log_verbose_level": 0,
    "log_format": "json",
}


class _Toggles(logging.Filter):
    """Lets a record through when the log settings let its level through."""

    def filter(self, record: logging.LogRecord) -> bool:
        n = record.levelno
        if n >= logging.ERROR:
            return bool(_settings["log_errors"])
        if n >= logging.WARNING:
            return bool(_settings["log_warnings"])
        if n >= logging.INFO:
            return bool(_settings["log_info"])
        return int(_settings["log_verbose_level"]) > 0


def setup_logging(level: str = "info", json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Toggles())
    logging.getLogger().handlers[:] = [handler]
    n = logging.getLevelName(level.upper())
    if not isinstance(n, int):
        raise ValueError(f"log level {level!r}: give one of debug, info, warning, error")
    apply_log_settings(
        {
            "log_info": n <= logging.INFO,
            "log_warnings": n <= logging.WARNING,
            "log_errors": n <= logging.ERROR,
            "log_verbose_level": int(n <= logging.DEBUG),
            "log_format": "json" if json else "text",
        }
    )


def log_settings() -> dict[str, Any]:
    """Triton's log settings as they are in this process."""
    return dict(_settings)


def checked_log_settings(changes: object) -> dict[str, Any]:
    """The log settings with `changes` (a JSON object of Triton's settings) made, not applied; ValueError
    naming the setting and what it takes."""
    if not isinstance(changes, dict):
        raise ValueError(f"log settings must be a JSON object of settings, not {type(changes).__name__}")
    out = dict(_settings)
    for key, value in changes.items():
        if key not in _settings:
            raise ValueError(f"unknown log setting {key!r}: the settings are {', '.join(_settings)}")
        if key in ("log_info", "log_warnings", "log_errors") and not isinstance(value, bool):
            raise ValueError(f"log setting {key} takes true or false, not {value!r}")
        if key == "log_verbose_level" and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32
        ):
            raise ValueError(f"log setting log_verbose_level takes a whole number from 0, not {value!r}")
        if key == "log_format" and value not in FORMATS:
            raise ValueError(f"log setting log_format takes {' or '.join(FORMATS)}, not {value!r}")
        if key == "log_file" and value != "":
            raise ValueError(
                f"log setting log_file cannot be set ({value!r}): this server logs to stderr, where the "
                'cluster collects it; leave it ""'
            )
        out[key] = value
    return out


def apply_log_settings(changes: dict[str, Any]) -> None:
    """Make (checked) log settings this process's."""
    _settings.update(changes)
    verbose = int(_settings["log_verbose_level"])
    root = logging.getLogger()
    lowest = (
        logging.DEBUG
        if verbose
        else logging.INFO
        if _settings["log_info"]
        else logging.WARNING
        if _settings["log_warnings"]
        else logging.ERROR
    )
    root.setLevel(lowest)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.INFO if verbose >= 2 else logging.WARNING)
    formatter = (
        JsonFormatter()
        if _settings["log_format"] == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    for h in root.handlers:
        h.setFormatter(formatter)


def name_os_thread() -> None:
    """Give the calling thread's Python name to its OS thread (Linux, first 15 bytes), so `top -H`, py-spy and
    /proc show which of the server's threads uses the CPU (Python < 3.14 leaves them all "python")."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(15, threading.current_thread().name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def vital_thread(
    target: Callable[[], object], name: str, failed: Callable[[BaseException], object] | None
) -> threading.Thread:
    """Start a daemon thread the server cannot serve without: should `target` raise (a bug of ours), the
    failure is logged as critical and `failed` is told (the server then drains and exits with it, so that the
    pod restarts rather than stay up answering nothing)."""

    def run() -> None:
        name_os_thread()
        try:
            target()
        except BaseException as e:
            logging.getLogger("runtime.serving").critical(
                f"thread {name} failed: the server cannot serve without it; stopping", exc_info=e
            )
            if failed is not None:
                failed(e)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t
