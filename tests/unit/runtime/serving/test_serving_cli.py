"""kubeforge-serve's flags: defaults from an InferenceService YAML, overridden by flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runtime.serving import cli


def test_spec_yaml_gives_defaults_and_flags_override(tmp_path: Path) -> None:
    doc = {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "iris"},
        "spec": {
            "model": {"uri": "models:/iris@champion"},
            "compile": {"mode": "jit", "backend": "cpu", "warmupBatchSizes": [1, 4]},
            "batching": {
                "maxBatchSize": 16,
                "maxDelayMs": 5,
                "maxQueueSize": 100,
                "queueTimeoutMs": 250,
                "lifoAfterMs": 40,
                "priorityLevels": 3,
                "defaultPriorityLevel": 2,
            },
            "ports": {"http": 9000, "grpc": 9001},
        },
    }
    spec = tmp_path / "isvc.yaml"
    spec.write_text(yaml.safe_dump(doc))
    defaults = cli._spec_defaults(str(spec))
    assert defaults["model_uri"] == "models:/iris@champion"
    assert (defaults["mode"], defaults["backend"], defaults["warmup_batch_sizes"]) == ("jit", "cpu", "1,4")
    assert (defaults["max_batch_size"], defaults["max_delay_ms"], defaults["max_queue_size"]) == (16, 5, 100)
    assert (defaults["http_port"], defaults["grpc_port"]) == (9000, 9001)
    parser = cli._parser()
    argv = ["serve", "--spec", str(spec), "--max-batch-size", "8"]
    for sp in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        sp.set_defaults(**defaults)
    args = parser.parse_args(argv)
    cfg = cli._config(args)
    assert cfg.model_uri == "models:/iris@champion" and cfg.max_batch_size == 8  # the flag wins
    assert cfg.mode == "jit" and cfg.warmup_batch_sizes == (1, 4) and cfg.http_port == 9000
    assert cfg.max_delay_ms == 5 and cfg.max_queue_size == 100
    assert cfg.queue_timeout_ms == 250 and cfg.lifo_after_ms == 40
    assert (cfg.priority_levels, cfg.default_priority_level) == (3, 2)


@pytest.mark.parametrize(
    ("flag", "bad"),
    [
        ("--max-queue-size", "0"),
        ("--max-batch-size", "0"),
        ("--max-batch-size", "big"),
        ("--max-delay-ms", "-1"),
        ("--launch-deviations", "-1"),
        ("--launch-deviations", "nan"),
        ("--launch-deviations", "many"),
        ("--busy-poll-us", "-1"),
        ("--busy-poll-us", "20000"),
        ("--busy-poll-us", "long"),
    ],
)
def test_batching_flags_refuse_values_that_would_serve_nothing(
    flag: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A queue of 0 would refuse every request, a batch of 0 rows run none: argparse names the flag."""
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--model-uri", "m", flag, bad])
    assert flag in capsys.readouterr().err


def test_priority_flags_refuse_a_default_level_past_the_levels(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli._parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model-uri", "m", "--priority-levels", "-1"])
    assert "--priority-levels" in capsys.readouterr().err
    args = parser.parse_args(
        ["serve", "--model-uri", "m", "--priority-levels", "2", "--default-priority-level", "3"]
    )
    with pytest.raises(
        SystemExit, match="--default-priority-level 3 must be between 1 and --priority-levels"
    ):
        cli._config(args)
    args = parser.parse_args(["serve", "--model-uri", "m", "--priority-levels", "2"])
    assert (cli._config(args).priority_levels, cli._config(args).default_priority_level) == (2, 0)


def test_duration_flags_refuse_negative_and_non_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli._parser()
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--model-uri", "m", "--queue-timeout-ms", bad])
        assert "--queue-timeout-ms" in capsys.readouterr().err
    args = parser.parse_args(["serve", "--model-uri", "m", "--lifo-after-ms", "2.5"])
    assert cli._config(args).lifo_after_ms == 2.5


def test_copy_stream_is_on_unless_turned_off() -> None:
    parser = cli._parser()
    assert cli._config(parser.parse_args(["serve", "--model-uri", "m"])).copy_stream is True
    off = parser.parse_args(["serve", "--model-uri", "m", "--no-copy-stream"])
    assert cli._config(off).copy_stream is False


def test_the_event_loop_is_uvloops_where_installed_unless_asyncio_is_asked_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from runtime.serving.server import event_loop_kind

    parser = cli._parser()
    default = cli._config(parser.parse_args(["serve", "--model-uri", "m"])).event_loop
    assert default == "auto" and event_loop_kind(default) == "uvloop"  # the serving extra installs it
    for kind in ("asyncio", "uvloop"):
        args = parser.parse_args(["serve", "--model-uri", "m", "--event-loop", kind])
        assert event_loop_kind(cli._config(args).event_loop) == kind
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    assert event_loop_kind("auto") == "asyncio"  # without the package: asyncio's, no error
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--model-uri", "m", "--event-loop", "uvloop"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--event-loop uvloop" in err and "pip install uvloop" in err


def test_launch_deviations_default_to_two_and_reach_the_config() -> None:
    parser = cli._parser()
    assert cli._config(parser.parse_args(["serve", "--model-uri", "m"])).launch_deviations == 2.0
    args = parser.parse_args(["serve", "--model-uri", "m", "--launch-deviations", "0"])
    assert cli._config(args).launch_deviations == 0.0


def test_busy_polling_is_auto_by_default_and_reaches_the_config() -> None:
    parser = cli._parser()
    assert cli._config(parser.parse_args(["serve", "--model-uri", "m"])).busy_poll_us is None
    for given, want in (("1500", 1500.0), ("0", 0.0), ("auto", None)):
        args = parser.parse_args(["serve", "--model-uri", "m", "--busy-poll-us", given])
        assert cli._config(args).busy_poll_us == want


def test_no_flags_and_an_inferenceservice_of_defaults_both_give_serveconfigs_defaults(tmp_path: Path) -> None:
    """One set of defaults: the flags read theirs from ServeConfig, and an InferenceService that sets nothing
    (the CRD's own defaults) starts the same server as no flags at all."""
    import dataclasses

    from runtime.serving.config import ServeConfig

    default = ServeConfig(model_uri="models:/m/1")
    skip = {"model_uri", "started", "cache_dir"}  # given; the start time; $KUBEFORGE_CACHE_DIR
    parser = cli._parser()
    bare = cli._config(parser.parse_args(["serve", "--model-uri", "models:/m/1"]))
    spec = tmp_path / "isvc.yaml"
    spec.write_text(yaml.safe_dump({"spec": {"model": {"uri": "models:/m/1"}}}))
    for sp in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        sp.set_defaults(**cli._spec_defaults(str(spec)))
    from_spec = cli._config(parser.parse_args(["serve"]))
    for f in dataclasses.fields(ServeConfig):
        if f.name not in skip:
            assert getattr(bare, f.name) == getattr(default, f.name), f.name
            assert getattr(from_spec, f.name) == getattr(default, f.name), f.name


def test_the_cli_module_and_its_defaults_load_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, runtime.serving.cli as c; c._parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("spec:\n  model:\n    uri: iris\n", "spec.model.uri: "),
        (
            "spec:\n  model: {uri: 'models:/a/1'}\n  batching: {maxBatchSize: 0}\n",
            "spec.batching.maxBatchSize: Input should be greater than or equal to 1",
        ),
        ("a: [", "cannot read it as YAML"),
        ("- 1\n", "not an InferenceService or its spec"),
    ],
)
def test_a_bad_spec_file_ends_the_cli_with_the_field_named(tmp_path: Path, text: str, says: str) -> None:
    spec = tmp_path / "isvc.yaml"
    spec.write_text(text)
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--spec", str(spec)])
    assert says in str(e.value) and str(spec) in str(e.value)
