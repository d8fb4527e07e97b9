#!/usr/bin/env bash
# `make demo`: the main job on the local defaults.
#
# Runs examples/train-digits-cnn.yaml (a small CNN on scikit-learn's 8x8 digits, 200 steps, FSDP2 over 2
# processes) with the entry point the training pods use, `kubeforge-train --local`, and tracks it in a local
# MLflow server (hack/mlflow.sh, sqlite, 127.0.0.1). At the end it loads the logged model back from MLflow,
# scores it on the digits and prints what was produced and where.
#
# Needs only the virtual environment of hack/python-env.sh (`make install`); no cluster. A few minutes at most
# on a 2-core machine. State: .state/demo/ (checkpoints, progress, metrics, the MLflow server's database and
# artifacts). The MLflow server keeps running afterwards so its UI can be opened; the last line printed says
# how to stop it. Re-running trains afresh (the checkpoints are removed first; MLflow keeps every run).
#
# Settings: KUBEFORGE_DEMO_NPROC (worker processes, default 2), KUBEFORGE_DEMO_STEPS (default: the spec's 200).
#
# Network: MLflow, the rendezvous endpoint and the gloo connections use 127.0.0.1. PyTorch's TCPStore servers
# (the elastic agent's rendezvous store and rank 0's process-group store) listen on the wildcard address
# while the job runs: torch has no setting for their bind address.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
VENV=${KUBEFORGE_VENV:-$ROOT/.venv}
D=$ROOT/.state/demo
SPEC=$ROOT/examples/train-digits-cnn.yaml
NPROC=${KUBEFORGE_DEMO_NPROC:-2}
log() { printf '[demo %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "$*"; exit 1; }

[[ -x $VENV/bin/kubeforge-train ]] || die "no $VENV/bin/kubeforge-train: run 'make install' first"
[[ -f $SPEC ]] || die "no $SPEC"
cd "$ROOT"
t0=$SECONDS
mkdir -p "$D"

# 1. MLflow: a private server for the demo (its own state folder, a free port on 127.0.0.1, remembered)
export KUBEFORGE_MLFLOW_STATE_DIR=$D/mlflow
log "starting MLflow (state in $KUBEFORGE_MLFLOW_STATE_DIR)"
URI=$(bash "$HERE/mlflow.sh" start)

# 2. the job: the pods' entry point, one local node of $NPROC processes; checkpoints under .state/demo
rm -rf "$D/checkpoints" "$D/progress.json" "$D/metrics.jsonl" "$D/train.log"
sets=(--set "checkpoint.path=$D/checkpoints")
[[ -n ${KUBEFORGE_DEMO_STEPS:-} ]] && sets+=(--set "optimizer.steps=$KUBEFORGE_DEMO_STEPS")
log "training: kubeforge-train examples/train-digits-cnn.yaml --local --nproc-per-node $NPROC (MLflow $URI)"
t1=$SECONDS
set +e
MLFLOW_TRACKING_URI=$URI MLFLOW_EXPERIMENT_NAME=kubeforge-demo KUBEFORGE_JOB_NAME=digits-cnn \
  "$VENV/bin/kubeforge-train" "$SPEC" --local --nproc-per-node "$NPROC" "${sets[@]}" \
  --progress-file "$D/progress.json" --metrics-file "$D/metrics.jsonl" --log-every 10 \
  2>&1 | tee "$D/train.log"
code=${PIPESTATUS[0]}
set -e
train_s=$((SECONDS - t1))
((code == 0)) || die "training failed (exit code $code); log: $D/train.log"

# 3. what was produced: the run, the final loss, the model loaded back from MLflow and scored
MLFLOW_TRACKING_URI=$URI MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false "$VENV/bin/python" - "$D" "$URI" "$train_s" <<'PY'
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
state, uri, train_s = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
p = json.loads((state / "progress.json").read_text())
steps = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
first = next(s for s in steps if "loss" in s)

import mlflow
import mlflow.pytorch
import torch
from mlflow import MlflowClient

from runtime.training.data import Digits

client = MlflowClient(uri)
run = client.get_run(p["runId"])
model = mlflow.pytorch.load_model(p["modelUri"]).eval()
data = Digits()
with torch.no_grad():
    accuracy = float((model(data.x).argmax(1) == data.y).float().mean())
registered = client.search_registered_models()

rows = [
    ("training", f"{p['step']}/{p['totalSteps']} steps, {p['worldSize']} processes, {train_s} s"),
    ("loss", f"{first['loss']:.3f} at step {first['step']} -> {p['loss']:.4f} at step {p['step']}"),
    ("accuracy", f"{accuracy:.1%} on the 1,797 digits (the training data: the built-in set has no held-out split)"),
    ("checkpoints", f"{state / 'checkpoints'}  ({', '.join(sorted(x.name for x in (state / 'checkpoints').glob('step-*')))})"),
    ("metrics", f"{state / 'metrics.jsonl'}  (JSON lines: loss, lr, grad_norm, samples_per_s per step)"),
    ("progress", f"{state / 'progress.json'}  (what a pod publishes in its kubeforge.io/progress annotation)"),
    ("MLflow", uri),
    ("run", f"{run.info.run_id} ({run.info.status}) in experiment kubeforge-demo"),
    ("run page", p.get("runUrl") or "-"),
    ("model", f"{p['modelUri']}  (pytorch flavour; mlflow.pytorch.load_model)"),
    (
        "registered",
        ", ".join(m.name for m in registered)
        if registered
        else "none: spec.register (digits-cnn, alias staging) is carried out by the operator in a cluster, "
        "which creates a ModelVersion on success; kubeforge-train only logs the model",
    ),
]
print()
for k, v in rows:
    print(f"  {k:<12} {v}")
PY
log "done in $((SECONDS - t0)) s. Stop MLflow: KUBEFORGE_MLFLOW_STATE_DIR=$KUBEFORGE_MLFLOW_STATE_DIR bash hack/mlflow.sh stop"
