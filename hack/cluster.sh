#!/usr/bin/env bash
# The local control plane: etcd, kube-apiserver (TLS, RBAC), kube-controller-manager, kube-scheduler and kwok,
# all bound to 127.0.0.1, with the fake accelerator fleet of hack/fleet.yaml.
#
#   hack/cluster.sh up      start (or reuse) the cluster; prints the `export KUBECONFIG=...` line
#   hack/cluster.sh down    stop exactly the processes `up` started and remove their state
#   hack/cluster.sh status  exit 0 when the cluster answers
#
# State lives in .state/cluster (override with KUBEFORGE_CLUSTER_DIR); ports start at KUBEFORGE_PORT_BASE, by
# default one of 200 bases from 16440 picked by the state folder's path, so that two checkouts (a clean-clone
# CI run next to a working tree) run their clusters side by side.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
S=${KUBEFORGE_CLUSTER_DIR:-$ROOT/.state/cluster}
BASE=${KUBEFORGE_PORT_BASE:-$((16440 + 40 * ($(printf %s "$S" | cksum | cut -d' ' -f1) % 200)))}
API_PORT=$((BASE + 3)) ETCD_PORT=$((BASE + 9)) ETCD_PEER=$((BASE + 10))
KCM_PORT=$((BASE + 17)) SCHED_PORT=$((BASE + 19)) KWOK_PORT=$((BASE + 21))
KUBECONFIG_FILE=$S/kubeconfig
log() { printf '[cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

alive() { [[ -f $S/pids/$1 ]] && kill -0 "$(cat "$S/pids/$1")" 2>/dev/null; }
answers() { [[ -f $KUBECONFIG_FILE ]] && "$B/kubectl" --kubeconfig "$KUBECONFIG_FILE" get --raw=/readyz >/dev/null 2>&1; }

start() { # name, command...
  local name=$1; shift
  setsid nohup "$@" >"$S/logs/$name.log" 2>&1 < /dev/null 9>&- &  # 9: the lock, not to be inherited
  echo $! > "$S/pids/$name"
}

wait_for() { # description, seconds, command...
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS > deadline )); then log "timed out waiting for $what; logs in $S/logs"; tail -n 5 "$S"/logs/*.log >&2; exit 1; fi
    sleep 0.2
  done
}

certs() {
  local d=$S/pki; mkdir -p "$d"; cd "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 -subj "/CN=kubeforge-local-ca" 2>/dev/null
  cat > server.ext <<EXT
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EXT
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 365 -extfile server.ext 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  local who
  for who in admin:system:masters controller-manager:kcm scheduler:sched kwok:kwok; do
    local n=${who%%:*} cn o=${who#*:}
    case $n in
      admin) cn=kubeforge-admin ;;
      # one identity for all of the controller-manager's controllers (no per-controller service accounts)
      controller-manager) cn=system:kube-controller-manager; o=system:masters ;;
      scheduler) cn=system:kube-scheduler; o= ;; kwok) cn=kwok; o=system:masters ;;
    esac
    openssl req -newkey rsa:2048 -nodes -keyout "$n.key" -out "$n.csr" -subj "/CN=$cn${o:+/O=$o}" 2>/dev/null
    openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$n.crt" -days 365 -extfile client.ext 2>/dev/null
  done
  openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cd - >/dev/null
}

kubeconfig() { # user, file
  cat > "$2" <<KC
apiVersion: v1
kind: Config
clusters:
- name: kubeforge-local
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$S/pki/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$S/pki/$1.crt", client-key: "$S/pki/$1.key"}
contexts:
- name: kubeforge-local
  context: {cluster: kubeforge-local, user: $1, namespace: default}
current-context: kubeforge-local
KC
}

up() {
  B=$(bash "$HERE/build-control-plane.sh")
  if answers && alive kube-apiserver && alive kwok; then
    log "reusing the running cluster"
    echo "export KUBECONFIG=$KUBECONFIG_FILE"; return
  fi
  [[ -d $S ]] && down >/dev/null 2>&1 || true
  local t0=$SECONDS
  mkdir -p "$S/pids" "$S/logs" "$S/etcd"
  echo "$B" > "$S/bin-dir"
  certs
  for u in admin controller-manager scheduler kwok; do kubeconfig "$u" "$S/$u.kubeconfig"; done
  cp "$S/admin.kubeconfig" "$KUBECONFIG_FILE"

  start etcd "$B/etcd" --name default --data-dir "$S/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER" --listen-metrics-urls "" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
  wait_for etcd 20 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

  start kube-apiserver "$B/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --tls-cert-file "$S/pki/apiserver.crt" --tls-private-key-file "$S/pki/apiserver.key" \
    --client-ca-file "$S/pki/ca.crt" --authorization-mode Node,RBAC \
    --service-cluster-ip-range 10.0.0.0/24 --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$S/pki/sa.pub" --service-account-signing-key-file "$S/pki/sa.key" \
    --disable-admission-plugins ServiceAccount --endpoint-reconciler-type none --allow-privileged \
    --cert-dir "$S/pki" --profiling="${KUBEFORGE_APISERVER_PROFILING:-false}" --enable-priority-and-fairness=false \
    --max-requests-inflight 2000 --max-mutating-requests-inflight 1000 --v 0
  wait_for kube-apiserver 30 "$B/kubectl" --kubeconfig "$KUBECONFIG_FILE" get --raw=/readyz

  start kube-controller-manager "$B/kube-controller-manager" --kubeconfig "$S/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$S/controller-manager.kubeconfig" --authorization-kubeconfig "$S/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --root-ca-file "$S/pki/ca.crt" --service-account-private-key-file "$S/pki/sa.key" \
    --controllers '*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle,-bootstrapsigner,-tokencleaner' \
    --kube-api-qps 200 --kube-api-burst 400 --concurrent-job-syncs 20 --concurrent-gc-syncs 40 --v 0
  start kube-scheduler "$B/kube-scheduler" --kubeconfig "$S/scheduler.kubeconfig" \
    --authentication-kubeconfig "$S/scheduler.kubeconfig" --authorization-kubeconfig "$S/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false --kube-api-qps 200 --kube-api-burst 400 --v 0
  # kwok's stages from the build cache (minus its pod-delete, which ours replaces: caches built before that
  # change still hold it), then ours; every document closed by '---' whatever the files end with.
  awk 'function flush() { if (doc != "" && doc !~ /\n  name: pod-delete\n/) printf "%s---\n", doc; doc = "" }
       FNR == 1 { flush() } /^---$/ { flush(); next } { doc = doc $0 "\n" } END { flush() }' \
    "$(dirname "$B")/kwok-stages.yaml" "$HERE/kwok-pod-stages.yaml" > "$S/kwok-stages.yaml"
  start kwok "$B/kwok" --kubeconfig "$S/kwok.kubeconfig" --config "$S/kwok-stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-ip 127.0.0.1 --server-address "127.0.0.1:$KWOK_PORT" --node-lease-duration-seconds 40

  local k=("$B/kubectl" --kubeconfig "$KUBECONFIG_FILE")
  wait_for "default service account" 30 "${k[@]}" get serviceaccount default -n default
  "${k[@]}" apply -f "$HERE/fleet.yaml" >/dev/null
  local want; want=$(grep -c '^kind: Node' "$HERE/fleet.yaml")
  fleet_ready() { # every fake node Ready and without the not-ready taint
    local out; out=$("${k[@]}" get nodes -l type=kwok -o \
      jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{.spec.taints[*].key}{"\n"}{end}')
    [[ $(grep '^True' <<<"$out" | grep -vc 'node.kubernetes.io/not-ready') -eq $want ]]
  }
  wait_for "fleet ready" 90 fleet_ready
  echo "$((SECONDS - t0))" > "$S/startup-seconds"
  log "ready in $((SECONDS - t0)) s: $("${k[@]}" get nodes --no-headers | wc -l) fake nodes"
  echo "export KUBECONFIG=$KUBECONFIG_FILE"
}

down() {
  [[ -d $S/pids ]] || { log "no cluster state in $S"; rm -rf "$S"; return 0; }
  local n pid
  for n in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [[ -f $S/pids/$n ]] || continue
    pid=$(cat "$S/pids/$n")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$S"
  log "stopped and removed $S"
}

# one `up` or `down` at a time (concurrent test sessions share the cluster)
mkdir -p "$(dirname "$S")"
exec 9>"$S.lock"

case ${1:-up} in
  up) flock 9; up ;;
  down) flock 9; down ;;
  status) B=$(cat "$S/bin-dir" 2>/dev/null || echo /nonexistent); answers && echo "export KUBECONFIG=$KUBECONFIG_FILE" ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
