"""Triton's logging extension against a live server, with tritonclient (HTTP and gRPC) and plain HTTP: the
settings read by anyone, changed only with --allow-log-settings, followed by every protocol worker, and what
they change seen in the server's own log lines; the bad-input table."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.fixtures.polling import holds_within
from tests.integration.serving.conftest import Registry, Serve, start_mlp

pytestmark = pytest.mark.integration

DEFAULTS = {
    "log_file": "",
    "log_info": True,
    "log_warnings": True,
    "log_errors": True,
    "log_verbose_level": 0,
    "log_format": "json",
}


@pytest.fixture(scope="module", params=["0", "2"], ids=["one-process", "2-workers"])
def log_server(registry: Registry, request: pytest.FixtureRequest) -> Iterator[Serve]:
    s = start_mlp(registry, request.param, "--allow-log-settings")
    s.wait_ready()
    yield s
    s.stop()


def _infer(s: Serve) -> None:
    """One request over REST (a connection of its own) and one over gRPC."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.ones((1, 16), dtype=np.float32)
    for client, mod in (
        (httpclient.InferenceServerClient(s.url.removeprefix("http://")), httpclient),
        (grpcclient.InferenceServerClient(s.grpc_url), grpcclient),
    ):
        inp = mod.InferInput("input__0", [1, 16], "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("mlp", [inp]).as_numpy("output__0").shape == (1, 4)
        client.close()


def _answered(s: Serve) -> list[str]:
    return [e["protocol"] for e in s.logs if e.get("msg") == "answered" and e.get("level") == "debug"]


def test_log_settings_change_over_rest_and_grpc_reach_every_worker_and_the_logs(log_server: Serve) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    s = log_server
    http = httpclient.InferenceServerClient(s.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(s.grpc_url)
    assert http.get_log_settings() == DEFAULTS
    assert grpc.get_log_settings(as_json=True)["settings"]["log_verbose_level"] == {"uint32_param": 0}
    assert "logging" in httpx.get(f"{s.url}/v2").json()["extensions"]
    _infer(s)
    assert _answered(s) == []  # debug lines are off by default

    # over gRPC: a debug line per answered request, from whichever process answers it
    got = grpc.update_log_settings({"log_verbose_level": 1}, as_json=True)["settings"]
    assert got["log_verbose_level"] == {"uint32_param": 1} and got["log_info"] == {"bool_param": True}
    assert s.wait_log("log settings changed", 10)["settings"]["log_verbose_level"] == 1
    # two connections open at once: with 2 workers one lands on each (least connections); both follow
    with httpx.Client() as a, httpx.Client() as b:
        for c in (a, b):
            assert c.get(f"{s.url}/v2/logging").json()["log_verbose_level"] == 1
    _infer(s)
    assert holds_within(lambda: sorted(_answered(s)) == ["grpc", "rest"], 10), _answered(s)
    line = next(e for e in s.logs if e.get("msg") == "answered")
    assert line["model"] == "mlp" and line["code"] in ("200", "OK") and line["ms"] > 0

    # over REST, back off; only the settings named change
    settings = http.update_log_settings({"log_verbose_level": 0})
    assert settings == DEFAULTS
    before = len(_answered(s))
    _infer(s)
    time.sleep(0.5)  # for lines on their way through the server's stderr pipe
    assert len(_answered(s)) == before

    # warnings off, then on again: the change that turned them off is not logged (its line is a warning)
    def changes() -> list[bool]:
        return [e["settings"]["log_warnings"] for e in s.logs if e.get("msg") == "log settings changed"]

    r = httpx.post(f"{s.url}/v2/logging", json={"log_warnings": False})
    assert r.status_code == 200 and r.json()["log_warnings"] is False
    seen = len(changes())
    httpx.post(f"{s.url}/v2/logging", json={"log_warnings": True, "log_format": "json"}).raise_for_status()
    assert holds_within(lambda: len(changes()) > seen, 10)
    assert changes()[-1] is True and False not in changes()


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"log_verbose_level": -1}, "log_verbose_level"),
        ({"log_verbose_level": True}, "log_verbose_level"),
        ({"log_info": "yes"}, "log_info"),
        ({"log_format": "ISO8601"}, "log_format takes json or text"),
        ({"log_file": "/tmp/triton.log"}, "log_file cannot be set"),
        ({"log_colour": True}, "unknown log setting 'log_colour'"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_log_settings_get_400_naming_the_setting_and_change_nothing(
    log_server: Serve, body: object, names: str
) -> None:
    r = httpx.post(f"{log_server.url}/v2/logging", json=body)
    assert r.status_code == 400 and names in r.json()["error"], r.text
    assert httpx.get(f"{log_server.url}/v2/logging").json() == DEFAULTS


def test_bad_log_settings_over_grpc_are_invalid_argument_and_a_body_not_json_is_400(
    log_server: Serve,
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    grpc = grpcclient.InferenceServerClient(log_server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        grpc.update_log_settings({"log_format": "default"})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "log_format" in e.value.message()
    r = httpx.post(f"{log_server.url}/v2/logging", content=b"{verbose")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


def test_without_the_flag_log_settings_are_read_but_not_changed(mlp_server: Serve) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    r = httpx.post(f"{mlp_server.url}/v2/logging", json={"log_verbose_level": 1})
    assert r.status_code == 403 and "--allow-log-settings" in r.json()["error"]
    assert httpx.get(f"{mlp_server.url}/v2/logging").json() == DEFAULTS
    grpc = grpcclient.InferenceServerClient(mlp_server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        grpc.update_log_settings({"log_verbose_level": 1})
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    assert grpc.get_log_settings(as_json=True)["settings"]["log_verbose_level"] == {"uint32_param": 0}
