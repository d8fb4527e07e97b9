#!/usr/bin/env bash
# Build the local control plane from the Go module proxy into a cache reused when present.
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (one Kubernetes version, version-stamped),
#   etcd 3.6.x, kwok, helm; plus kwok's stage manifests.
# The cache lives outside the checkout (default ~/.cache/kubeforge, override with KUBEFORGE_CACHE) so that
# fresh clones on the same machine (CI) reuse it. Go's own module and build caches make a rebuild fast too.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/versions.env"
CACHE=${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}
R=$CACHE/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION-kwok-v$KWOK_VERSION-helm-v$HELM_VERSION
B=$R/bin
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
log() { printf '[build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [[ -f $R/.complete ]]; then echo "$B"; exit 0; fi
mkdir -p "$B" "$R/km" "$R/em"
start=$(date +%s)

# 1. Kubernetes components from a wrapper module: k8s.io/kubernetes replaces its staging modules with local
#    paths, so the wrapper replaces each one with the published v0.Y.Z.
if [[ ! -x $B/kube-apiserver || ! -x $B/kubectl || ! -x $B/kube-scheduler || ! -x $B/kube-controller-manager ]]; then
  log "kubernetes v$K8S_VERSION"
  GOMOD=$(cd "$R/km" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  cd "$R/km"
  rm -f go.mod go.sum
  go mod init local/k8s >/dev/null 2>&1
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  minor=$(cut -d. -f2 <<<"$K8S_VERSION"); patch=$(cut -d. -f3 <<<"$K8S_VERSION")
  for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$GOMOD"); do
    go mod edit -replace="$m=$m@v0.$minor.$patch"
  done
  P=k8s.io/kubernetes/cmd
  T="$P/kube-apiserver $P/kube-controller-manager $P/kube-scheduler $P/kubectl"
  go get $(for t in $T; do echo "$t@v$K8S_VERSION"; done) >/dev/null 2>&1 || go get $(for t in $T; do echo "$t@v$K8S_VERSION"; done)
  LD="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    LD="$LD -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  go build -trimpath -ldflags "$LD" -o "$B/" $T
fi

# 2. etcd: the module root of go.etcd.io/etcd/server/v3 is package main; build it as a dependency.
if [[ ! -x $B/etcd ]]; then
  log "etcd v$ETCD_VERSION"
  cd "$R/em"; rm -f go.mod go.sum
  go mod init local/etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >/dev/null 2>&1
  go build -trimpath -ldflags "-s -w" -o "$B/etcd" go.etcd.io/etcd/server/v3
fi

# 3. kwok and helm install directly.
if [[ ! -x $B/kwok ]]; then log "kwok v$KWOK_VERSION"; GOBIN=$B go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"; fi
if [[ ! -x $B/helm ]]; then log "helm v$HELM_VERSION"; GOBIN=$B go install -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v$HELM_VERSION" "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION"; fi

# 4. kwok >= 0.8 ships no built-in stages: collect the ones we use from its module.
S=$(go env GOMODCACHE)/sigs.k8s.io/kwok@v$KWOK_VERSION/kustomize/stage
#    Pod completion and failure are ours (hack/kwok-pod-stages.yaml), appended by hack/cluster.sh.
for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
         pod/fast/pod-ready; do
  cat "$S/$f.yaml"; echo "---"
done > "$R/kwok-stages.yaml"

echo "$(( $(date +%s) - start ))" > "$R/build-seconds"
touch "$R/.complete"
log "built in $(( $(date +%s) - start )) s into $B"
echo "$B"
