"""The container images' Dockerfile against the repository: CI runs no container engine, so what can be
checked without building is checked here: every file it copies exists and reaches the build context, a wheel
built from that context alone holds every module and data file of ours, each target installs the extras it
needs and runs a console script that imports, as the chart's user, on pinned bases."""

from __future__ import annotations

import fnmatch
import importlib
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# target -> (the extras it installs, the console script it runs)
TARGETS = {
    "operator": ({"operator", "registry"}, "kubeforge-operator"),
    "runtime": ({"training", "serving"}, "kubeforge-serve"),
}


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's (INSTRUCTION, rest), continuation lines joined, comments dropped; a stage's FROM first."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    joined = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip("\\").strip() + " "
        if line.rstrip().endswith("\\"):
            continue
        word, _, rest = joined.strip().partition(" ")
        joined = ""
        if word.upper() == "FROM":
            current = out.setdefault(rest.split(" AS ")[1].strip(), [])
        current.append((word.upper(), rest.strip()))
    return out


def chain(name: str) -> list[tuple[str, str]]:
    """A stage's instructions after those of the stages it is built FROM."""
    steps = stages()[name]
    base = steps[0][1].split(" AS ")[0].strip()
    return (chain(base) if base in stages() else []) + steps


def in_context(rel: str) -> bool:
    """Whether .dockerignore lets `rel` into the build context (its rules in order, the last match wins)."""
    keep = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        pattern = rule.lstrip("!").rstrip("/")
        parts = Path(rel).parts
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            keep = rule.startswith("!")
    return keep


def copied() -> set[str]:
    return {
        src
        for steps in stages().values()
        for word, rest in steps
        if word == "COPY" and not rest.startswith("--from")
        for src in shlex.split(rest)[:-1]
    }


def test_what_the_dockerfile_copies_exists_reaches_the_context_and_is_every_package() -> None:
    sources = copied()
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert in_context(src), f"COPY {src}: .dockerignore keeps it out of the build context"
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert not packages - sources, f"pip install . would lack the packages {packages - sources}: COPY them"
    assert PYPROJECT["project"]["readme"] in sources  # setuptools reads it when it builds the wheel


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_target_installs_its_extras_and_runs_a_script_as_the_charts_user(target: str) -> None:
    extras, script = TARGETS[target]
    # the final stage copies what its build stage installed
    [(_, copy)] = [s for s in stages()[target] if s[0] == "COPY"]
    builder = copy.split()[0].removeprefix("--from=")
    [install] = [rest for word, rest in chain(builder) if word == "RUN" and "pip install" in rest]
    named = set(install.split('".[', 1)[1].split("]", 1)[0].split(","))
    assert named == extras and named <= set(PYPROJECT["project"]["optional-dependencies"])
    [entry] = [rest for word, rest in stages()[target] if word == "ENTRYPOINT"]
    assert yaml.safe_load(entry) == [script]
    module, _, function = PYPROJECT["project"]["scripts"][script].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    values = yaml.safe_load((ROOT / "charts" / "kubeforge" / "values.yaml").read_text())
    [user] = [rest for word, rest in stages()[target] if word == "USER"]
    assert user.split(":")[0] == str(values["podSecurityContext"]["runAsUser"])


def test_bases_are_pinned_to_the_supported_python() -> None:
    bases = [s[0][1].split(" AS ")[0].strip() for s in stages().values()]
    external = [b for b in bases if b not in stages()]
    python = PYPROJECT["project"]["requires-python"].lstrip(">=")
    assert external and all(b == f"python:{python}-slim-bookworm" for b in external), external


def test_the_chart_runs_the_operator_images_entry_points() -> None:
    template = (ROOT / "charts" / "kubeforge" / "templates" / "deployment.yaml").read_text()
    assert f"command: [{TARGETS['operator'][1]}]" in template
    registry = (ROOT / "charts" / "kubeforge" / "templates" / "registry.yaml").read_text()
    assert (
        "command: [kubeforge-registry]" in registry
        and "kubeforge-registry" in PYPROJECT["project"]["scripts"]
    )


def test_the_build_context_builds_a_wheel_with_every_file_the_packages_read(tmp_path: Path) -> None:
    """What the images' `pip install .` gets: a wheel built from the files the Dockerfile copies alone, which
    must hold every tracked module and data file of our packages (templates, CRD manifests, protocol
    definitions)."""
    context = tmp_path / "context"
    tracked = subprocess.run(["git", "ls-files", *sorted(copied())], cwd=ROOT, capture_output=True, text=True)
    files = [f for f in tracked.stdout.splitlines() if in_context(f) and (ROOT / f).is_file()]
    for f in files:
        (context / f).parent.mkdir(parents=True, exist_ok=True)
        (context / f).write_bytes((ROOT / f).read_bytes())
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=context,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = tmp_path.glob("kubeforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [
        f
        for f in files
        if f.split("/")[0] in {"crds", "controllers", "model_registry", "runtime"}
        and Path(f).suffix in {".py", ".html", ".yaml", ".proto", ".js", ".css"}
    ]
    missing = [f for f in wanted if f not in names]
    assert wanted and not missing, f"the images' package would lack {missing[:10]}"
