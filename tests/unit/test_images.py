"""The container images' Dockerfiles against the repository: CI runs no container engine, so what can be
checked without building is checked here: every file they copy exists and reaches the build context, the
package they install has every package of ours and the extras they name, the entry point is a console script
that imports, the user is the chart's, and the base images are pinned."""

from __future__ import annotations

import fnmatch
import importlib
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": ROOT / "operator" / "Dockerfile", "runtime": ROOT / "runtime" / "Dockerfile"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    joined = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = joined.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            joined = ""
    return out


def in_context(rel: str) -> bool:
    """Whether .dockerignore lets `rel` into the build context (its rules in order, the last match wins)."""
    keep = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = Path(rel).parts
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            keep = negate
    return keep


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_a_dockerfile_copies_what_exists_and_installs_every_package(image: str) -> None:
    steps = instructions(DOCKERFILES[image])
    copied: set[str] = set()
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), f"{image}: COPY {src}: no such file in the repository"
                assert in_context(src), (
                    f"{image}: COPY {src}: .dockerignore keeps it out of the build context"
                )
                copied.add(src)
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = {p.rstrip("*") for p in packages} - copied
    assert not missing, f"{image}: pip install . would lack the packages {missing}: COPY them"
    assert PYPROJECT["project"]["readme"] in copied  # setuptools reads it when it builds the wheel
    [install] = [rest for word, rest in steps if word == "RUN" and "pip install" in rest]
    extras = install.split('".[', 1)[1].split("]", 1)[0].split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]), extras


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_a_dockerfile_runs_a_console_script_as_the_charts_user_on_pinned_bases(image: str) -> None:
    steps = instructions(DOCKERFILES[image])
    scripts = PYPROJECT["project"]["scripts"]
    [entry] = [rest for word, rest in steps if word == "ENTRYPOINT"]
    command = yaml.safe_load(entry)[0]
    assert command in scripts, f"{image}: ENTRYPOINT {command} is not one of the package's scripts"
    module, _, function = scripts[command].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    values = yaml.safe_load((ROOT / "charts" / "kubeforge" / "values.yaml").read_text())
    [user] = [rest for word, rest in steps if word == "USER"]
    assert user.split(":")[0] == str(values["podSecurityContext"]["runAsUser"])
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases), bases
    python = PYPROJECT["project"]["requires-python"].lstrip(">=")
    assert all(f"python:{python}" in b for b in bases), (bases, python)


def test_the_chart_runs_the_operator_images_entry_point() -> None:
    template = (ROOT / "charts" / "kubeforge" / "templates" / "deployment.yaml").read_text()
    [entry] = [rest for word, rest in instructions(DOCKERFILES["operator"]) if word == "ENTRYPOINT"]
    assert f"command: [{yaml.safe_load(entry)[0]}]" in template
    registry = (ROOT / "charts" / "kubeforge" / "templates" / "registry.yaml").read_text()
    assert (
        "command: [kubeforge-registry]" in registry
        and "kubeforge-registry" in PYPROJECT["project"]["scripts"]
    )


def test_the_build_context_builds_a_wheel_with_every_file_the_packages_read(tmp_path: Path) -> None:
    """What the images' `pip install .` gets: a wheel built from the files they COPY alone, which must hold
    every tracked module and data file of our packages (templates, CRD manifests, protocol definitions)."""
    import subprocess
    import sys
    import zipfile

    context = tmp_path / "context"
    sources = {
        src
        for word, rest in instructions(DOCKERFILES["operator"])
        if word == "COPY" and not rest.startswith("--from")
        for src in shlex.split(rest)[:-1]
    }
    tracked = subprocess.run(["git", "ls-files", *sorted(sources)], cwd=ROOT, capture_output=True, text=True)
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
        and "/tests/" not in f
    ]
    missing = [f for f in wanted if f not in names]
    assert wanted and not missing, f"the image's package would lack {missing[:10]}"
