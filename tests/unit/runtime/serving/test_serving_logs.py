"""Log settings (Triton's logging extension mapped onto our structured logs): --log-level as settings, each
level's toggle, verbose levels, the format, and the checks."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from runtime.serving import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs.log_settings())
    out = io.StringIO()
    logs.setup_logging("info")
    root.handlers[0].stream = out  # type: ignore[attr-defined]
    yield out
    root.handlers[:], _, settings = saved
    root.setLevel(saved[1])
    logs.apply_log_settings(settings)


def _levels(out: io.StringIO) -> list[str]:
    return [json.loads(line)["level"] for line in out.getvalue().splitlines()]


def _emit() -> None:
    log = logging.getLogger("runtime.serving.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")


@pytest.mark.parametrize(
    ("level", "settings"),
    [
        ("debug", (True, True, True, 1)),
        ("info", (True, True, True, 0)),
        ("warning", (False, True, True, 0)),
        ("error", (False, False, True, 0)),
    ],
)
def test_the_log_level_flag_is_the_settings_that_let_it_and_above_through(
    captured: io.StringIO, level: str, settings: tuple[bool, bool, bool, int]
) -> None:
    logs.setup_logging(level)
    logging.getLogger().handlers[0].stream = captured  # type: ignore[attr-defined]
    s = logs.log_settings()
    assert (s["log_info"], s["log_warnings"], s["log_errors"], s["log_verbose_level"]) == settings
    _emit()
    assert (
        _levels(captured)
        == ["debug", "info", "warning", "error"][["debug", "info", "warning", "error"].index(level) :]
    )


def test_each_level_is_let_through_on_its_own_and_verbose_adds_debug(captured: io.StringIO) -> None:
    logs.apply_log_settings(logs.checked_log_settings({"log_info": False, "log_verbose_level": 1}))
    _emit()
    assert _levels(captured) == ["debug", "warning", "error"]  # Triton's toggles are independent
    assert logging.getLogger("torch._inductor").level == logging.WARNING
    logs.apply_log_settings(logs.checked_log_settings({"log_verbose_level": 2, "log_errors": False}))
    assert logging.getLogger("torch._inductor").level == logging.INFO  # level 2: the compiler's info too
    captured.truncate(0)
    captured.seek(0)
    _emit()
    assert _levels(captured) == ["debug", "warning"]


def test_text_format_and_back(captured: io.StringIO) -> None:
    logs.apply_log_settings(logs.checked_log_settings({"log_format": "text"}))
    logging.getLogger("runtime.serving.test").warning("plain")
    assert " WARNING runtime.serving.test plain" in captured.getvalue()
    logs.apply_log_settings(logs.checked_log_settings({"log_format": "json"}))
    logging.getLogger("runtime.serving.test").warning("again")
    assert json.loads(captured.getvalue().splitlines()[-1])["msg"] == "again"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"log_verbose_level": 1 << 32}, "log_verbose_level takes a whole number"),
        ({"log_verbose_level": 1.0}, "log_verbose_level takes a whole number"),
        ({"log_errors": 0}, "log_errors takes true or false"),
        ({"log_format": "default"}, "log_format takes json or text"),
        ({"log_file": "x.log"}, "log_file cannot be set"),
        ({"verbose": 1}, "unknown log setting 'verbose'"),
        ("log_info", "must be a JSON object"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting_and_nothing_changes(
    changes: object, message: str
) -> None:
    before = logs.log_settings()
    with pytest.raises(ValueError, match=message):
        logs.checked_log_settings(changes)
    assert logs.log_settings() == before
