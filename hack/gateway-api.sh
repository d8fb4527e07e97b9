#!/usr/bin/env bash
# The Gateway API's standard CRDs (HTTPRoute, GRPCRoute, Gateway, ...) from the Go module proxy: the module
# sigs.k8s.io/gateway-api carries them under config/crd/standard. Go's module cache keeps the download.
#   hack/gateway-api.sh          print the folder holding the CRD manifests
#   hack/gateway-api.sh install  apply HTTPRoute's, GRPCRoute's and Gateway's CRDs to the cluster of KUBECONFIG
#                                (kubectl from the local control plane's build, or PATH) and wait for them
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=${GATEWAY_API_VERSION:-v1.6.3}
dir=$(cd "${TMPDIR:-/tmp}" && GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "sigs.k8s.io/gateway-api@$VERSION" |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error", "no Dir")))')
crds=$dir/config/crd/standard
[[ -d $crds ]] || { echo "no $crds in sigs.k8s.io/gateway-api@$VERSION" >&2; exit 1; }
case ${1:-path} in
  path) echo "$crds" ;;
  install)
    kubectl=$(command -v kubectl || true)
    if [[ -z $kubectl ]]; then kubectl=$(bash "$HERE/build-control-plane.sh")/kubectl; fi
    files=()
    for k in httproutes grpcroutes gateways gatewayclasses; do files+=(-f "$crds/gateway.networking.k8s.io_$k.yaml"); done
    "$kubectl" apply --server-side --force-conflicts "${files[@]}" >&2
    "$kubectl" wait --for=condition=Established --timeout=60s \
      crd/httproutes.gateway.networking.k8s.io crd/grpcroutes.gateway.networking.k8s.io >&2
    echo "$crds" ;;
  *) echo "usage: $0 [path|install]" >&2; exit 2 ;;
esac
