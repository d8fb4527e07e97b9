#!/usr/bin/env bash
# Build the kit the lent GPU machine needs for bench/serve_bench.py (it has torch and Python 3.12 but no
# package index): Python 3.12 wheels of the serving runtime's dependencies, py-spy, bench/grpcload (gRPC
# load, Go module proxy), ghz only with GHZ=1 (14 MB: hack/gpu-check.sh clients names it only when asked) and
# wrk (REST load, Debian package with its LuaJIT). Output: .cache/dev (git-ignored, ~50 MiB, or ~63 with
# ghz: the device tool carries 64 MiB at most), passed to the device tool's `carry`. On
# the device: `bash .cache/dev/setup.sh` then run the bench with PYTHONPATH=/tmp/site
# PATH=$PWD/.cache/dev/bin:$PATH.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
K=$ROOT/.cache/dev
rm -rf "$K/wheels"  # only what is listed below, in the versions pip picks today (older ones weighed 7 MB)
mkdir -p "$K/wheels" "$K/bin" "$K/lib"
pip=${PIP:-$ROOT/.venv/bin/pip}
"$pip" download -q -d "$K/wheels" --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  fastapi uvicorn httptools orjson grpcio protobuf==6.33.6 prometheus_client pyyaml py-spy numpy==2.4.6 pytest hpack uvloop
if [[ ${GHZ:-0} == 1 ]]; then
  [[ -x $K/bin/ghz ]] || GOBIN=$K/bin CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" github.com/bojand/ghz/cmd/ghz@latest
else
  rm -f "$K/bin/ghz"
fi
(cd "$ROOT/bench/grpcload" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$K/bin/grpcload" .)
if [[ ! -x $K/bin/wrk ]]; then
  t=$(mktemp -d)
  (cd "$t" && apt-get download wrk 'libluajit-5.1-2' >/dev/null)
  for d in "$t"/*.deb; do dpkg-deb -x "$d" "$t/x"; done
  cp "$t/x/usr/bin/wrk" "$K/bin/wrk.bin"
  cp -P "$t"/x/usr/lib/x86_64-linux-gnu/libluajit-5.1.so* "$K/lib/"
  printf '#!/bin/sh\nd=$(dirname "$(readlink -f "$0")")\nLD_LIBRARY_PATH=$d/../lib exec "$d/wrk.bin" "$@"\n' >"$K/bin/wrk"
  chmod +x "$K/bin/wrk"
  rm -rf "$t"
fi
cat >"$K/setup.sh" <<'EOS'
# on the device: install the carried wheels into /tmp/site (no index there)
python -c "import numpy" 2>/dev/null || extra=numpy  # keep the image's numpy where it has one
pip install -q --no-index --find-links "$(dirname "$0")/wheels" --target /tmp/site \
  fastapi uvicorn httptools orjson grpcio protobuf prometheus_client pyyaml py-spy pytest hpack uvloop ${extra:-} 2>&1 | tail -2
EOS
du -sh "$K"
