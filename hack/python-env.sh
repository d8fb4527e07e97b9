#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and link it as ./.venv.
# The environment is keyed by the hash of pyproject.toml's dependency lists and kept in the machine cache
# (default ~/.cache/kubeforge, override with KUBEFORGE_CACHE) so fresh clones reuse it; pip's own
# download cache makes a rebuild after a dependency change fast.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# key: the dependency lists and the interpreter, not the whole file (editing tool settings reuses the env)
key=$("$PY" - "$ROOT/pyproject.toml" <<'PYEOF'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = {"d": project.get("dependencies", []), "o": project.get("optional-dependencies", {}), "v": sys.version}
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:16])
PYEOF
)
V=$CACHE/venv-$key
if [[ ! -f $V/.complete ]]; then
  rm -rf "$V"; mkdir -p "$CACHE"
  "$PY" -m venv "$V"
  "$V/bin/pip" install -q --upgrade pip
  "$V/bin/pip" install -q -e "$ROOT[all]"
  touch "$V/.complete"
else
  # a new clone: point the editable install at this checkout (cheap, no downloads)
  "$V/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null
fi
ln -sfn "$V" "$ROOT/.venv"
echo "$V"
