#!/usr/bin/env bash
# On the lent GPU machine (see hack/device-kit.sh; carry .cache/dev), one part per call (each fits in 10 min):
#   tests        the CUDA-only tests in one pytest process
#   tables       the bench tables of $MODELS (bert resnet50), $PATHS (binary,grpc; add shm for inputs through
#                Triton's system shared memory: what the sockets cost), at $CONC clients (1,16,64), max batch
#                32, 8 workers, to $OUT/<model>.md (whatever finished comes back if the call runs out of time);
#                the compile caches stay under /tmp/kf-serve-profile, where hack/serve-profile.py (copy-stream,
#                ab, ...) finds them on the same warm machine (so run it first: its cold start needs them empty)
#   copy-stream  a same-machine A/B of --copy-stream with ResNet-50 (8 workers, $C clients (64), max batch 32,
#                REST, or gRPC with GRPC=1;
#                $TAGS: the runs, default one-stream copy-stream one-stream copy-stream),
#                interleaved so that drift shows (hack/serve-profile.py's SUMMARY lines)
#   grpc         gRPC over our HTTP/2 and over grpc.aio, BERT, 8 workers, concurrency 1 and 64 (bench tables)
#   datapath     what the server moves of 602 KB rows with no compute (tinyimage, 8 workers, 64 clients, max
#                batch 32) over REST then gRPC, with py-spy profiles of the model process (GIL) and of a
#                worker under $OUT/{rest,grpc} (ResNet-50 reaches the same rows/s: its limit is this path)
#   latency      where a batch-1 request's time goes (BERT, 8 workers, 1 client; $MODEL to change): hops, thread
#                CPU, and py-spy profiles of the model process (waiting included) and of a worker, to $OUT/latency
#   clients      gRPC load from bench/grpcload's two HTTP/2 clients, interleaved ($TOOLS: grpc-go xnet grpc-go
#                xnet; ghz too if named, with a kit built with GHZ=1), ResNet-50 ($MODEL), 8 workers, at each of $CONCS (1 64) clients:
#                what the client's framing (16 KiB DATA frames, or as large as the server allows, as grpcio's C
#                core sends them) costs the server and the latency it measures
#   loops        the server's --event-loop, asyncio against uvloop, interleaved (asyncio uvloop asyncio uvloop),
#                ResNet-50 ($MODEL), 8 workers, REST then gRPC, at each of $CONCS (1 128) clients
#                (hack/serve-profile.py's SUMMARY lines: rows/s, p50, CPU per request of the workers)
#   gomaxprocs   the gRPC load generator's Go threads, $PROCS (default 4) against Go's default (one per CPU),
#                interleaved (default, $PROCS, default, $PROCS), ResNet-50 ($MODEL), 8 workers, at each of $CONCS
#                (128 1) clients (hack/serve-profile.py's SUMMARY, THREADS (the client's CPU) and HOST lines):
#                whether grpc-go's share of the host's cores is what gRPC's rows/s at 128 clients lacks
#                (ran in the seventeenth session: the bench now gives grpcload wrk's threads; the arms set
#                $BENCH_GRPC_PROCS, 0 for Go's default)
#   poll         the server's --busy-poll-us, $POLLS (0 2000 0 2000) interleaved, ResNet-50 ($MODEL), 8 workers,
#                REST then gRPC, at each of $CONCS (1 128) clients (hack/serve-profile.py's SUMMARY lines: p50,
#                rows/s, CPU per request of the model process and the workers)
#   spread       how the load spreads over the protocol workers (hack/serve-profile.py's WORKERS line), the
#                server's --balance least-connections against kernel, interleaved (least, kernel, least,
#                kernel), for each line "MODEL C GRPC CONNECTIONS" of $RUNS (CONNECTIONS: gRPC's; default:
#                ResNet-50 at 64 clients over REST, and over gRPC on 16 connections)
#   idle         why the device idles under load: hack/serve-profile.py's SUMMARY (device busy, idle with a
#                request waiting, queued or being launched, or for one: kubeforge_device_idle_seconds) and
#                THREADS lines, 8 workers, max batch 32, twice for each line "MODEL C GRPC" of $RUNS
#                (default: ResNet-50 then BERT at 64 clients over REST)
#   deviations   the server's --launch-deviations (a launch's budget beyond its mean), 2 against 0, interleaved
#                (2 0 2 0), ResNet-50 at 64 clients over REST (hack/serve-profile.py's SUMMARY: rows/s, mean batch,
#                device idle with a batch being launched); $RUNS as for idle
#   gather       bench/h2d_gather_bench.py: a batch's copies from a registered arena to the GPU, torch's ways against
#                the CUDA driver's (µs of the launching thread, alone and beside Python threads), to $OUT/gather.md
#   overlap      bench/h2d_overlap_bench.py: ResNet-50 in a CUDA graph with its inputs over the host link on the
#                compute stream, on a second stream a batch ahead, at full and half bytes, to $OUT/overlap.md
#                ($OVERLAP_FLAGS: its flags, e.g. --compile for the forward pass as the server compiles it)
#   precompile   ResNet-50's cold start with the compile cache, TORCH_CACHING_PRECOMPILE=0 then 1 (each fills
#                its own cache first)
#   ab           the tree against itself with .cache/ab.patch reversed (`git diff HEAD~1 > .cache/ab.patch`,
#                carry it too; `git apply -R --check .cache/ab.patch` here first: an older commit's diff may
#                no longer apply to the tree, and the call then ends at once), same machine, interleaved
#                base/new/base/new, for each line "MODEL C GRPC" of $RUNS (default: datapath's load,
#                "tinyimage 64 0"); D seconds per run (5)
#   trees        the tree against copies of it with each of $PATCHES applied (files, carried; a copy is named
#                after its file), same machine, interleaved (tree, each patch; twice), for each line of $RUNS as
#                for ab: several branches in one call (`git diff main BRANCH > .cache/patches/NAME.patch`);
#                $LOGGREP (ab too): each run's last server log line that holds it
# $PATCH (tests): run them in a copy of the tree with that patch applied (a branch's tests, no checkout)
set -uo pipefail
cd "$(dirname "$0")/.."
# everything printed also goes to $OUT/gpu-check.log, which comes back whole: a call's reply keeps only the
# last 12,000 characters (the ninth session lost half an A/B that way)
if [[ -n ${OUT:-} ]]; then
  exec > >(tee -a "$OUT/gpu-check.log") 2>&1
  tee_pid=$!
  trap 'exec >&- 2>&-; wait $tee_pid' EXIT  # the log whole before the call ends
fi
bash .cache/dev/setup.sh >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.cache/dev/bin:/tmp/site/bin:$PATH BENCH_WRK_THREADS=4
export BENCH_GRPC_CONNECTIONS=16 GRPC_LOAD=$PWD/.cache/dev/bin/grpcload
# ab and trees: hack/serve-profile.py in each of the trees $dirs (named $names), in turn, twice, for each line
# "MODEL C GRPC" of $RUNS
interleaved() {
  echo "${RUNS:-tinyimage 64 0}" | while read -r m c g; do
    [[ -z $m ]] && continue
    for round in 1 2; do
      for i in "${!names[@]}"; do
        (cd "${dirs[$i]}" && PYTHONPATH=/tmp/site:${dirs[$i]} MODEL=$m W=8 C=$c D=${D:-5} DEV=cuda MAXB=32 \
          GRPC=$g TAG=$m-c$c-g$g-${names[$i]} timeout 200 python hack/serve-profile.py 2>&1 |
          grep -E "SUMMARY|THREADS|WORKERS|HOST|Error|errors")
        if [[ -n ${LOGGREP:-} ]]; then grep -a "$LOGGREP" /tmp/kf-serve-profile/log | tail -1; fi
      done
    done
  done
}
case ${1:-tests} in
tests) # --noconftest: the tests' conftest loads the cluster fixtures, whose packages the GPU image lacks
  if [[ -n ${PATCH:-} ]]; then
    rm -rf /tmp/tests-tree && cp -a . /tmp/tests-tree && cd /tmp/tests-tree && git apply "$PATCH" || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
  timeout 500 python -m pytest -q --noconftest -p no:cacheprovider tests/unit/runtime/serving -k gpu 2>&1 | tail -15 ;;
tables)
  for m in ${MODELS:-bert resnet50}; do
    t=230; [[ $m == resnet50 ]] && t=330; [[ ${PATHS:-} == *shm* ]] && t=$((t + 90))
    [[ -n ${CONC:-} ]] && t=$((t + 90))
    timeout $t python bench/serve_bench.py --device cuda --models "$m" --mode aot --precision bf16 --max-batch 32 \
      --delay-ms 2.0 --seconds 3 --workers 8 --paths "${PATHS:-binary,grpc}" --concurrency "${CONC:-1,16,64}" \
      --workdir /tmp/kf-serve-profile --out "${OUT:-/tmp}/$m.md" > "${OUT:-/tmp}/$m.log" 2>&1
    echo "$m rc=$?"; grep -E "^\||Cold" "${OUT:-/tmp}/$m.log" | tail -22
  done ;;
copy-stream)
  for tag in ${TAGS:-one-stream copy-stream one-stream copy-stream}; do
    cs=0; [[ $tag == copy-stream ]] && cs=1
    MODEL=${MODEL:-resnet50} W=8 C=${C:-64} D=5 DEV=cuda MAXB=32 COPY_STREAM=$cs GRPC=${GRPC:-0} TAG=$tag \
      timeout 200 python hack/serve-profile.py 2>&1 | grep -E "SUMMARY|THREADS|HOST|Error" | tail -3
  done ;;
loops)
  # --event-loop asyncio against uvloop, interleaved, at each of $CONCS (1 128), REST then gRPC
  for c in ${CONCS:-1 128}; do
    for g in 0 1; do
      for loop in asyncio uvloop asyncio uvloop; do
        MODEL=${MODEL:-resnet50} W=8 C=$c D=5 DEV=cuda MAXB=32 GRPC=$g EVENT_LOOP=$loop TAG=$loop-c$c-g$g \
          timeout 200 python hack/serve-profile.py 2>&1 | grep -E "SUMMARY|HOST|Error" | tail -2
      done
    done
  done ;;
gomaxprocs)
  for c in ${CONCS:-128 1}; do
    for g in "" "${PROCS:-4}" "" "${PROCS:-4}"; do
      BENCH_GRPC_PROCS=${g:-0} MODEL=${MODEL:-resnet50} W=8 C=$c D=5 DEV=cuda MAXB=32 GRPC=1 \
        TAG=gomaxprocs${g:-all}-c$c timeout 200 python hack/serve-profile.py 2>&1 |
        grep -E "SUMMARY|THREADS|HOST|Error"
    done
  done ;;
poll)
  for c in ${CONCS:-1 128}; do
    for g in 0 1; do
      for us in ${POLLS:-0 2000 0 2000}; do
        MODEL=${MODEL:-resnet50} W=8 C=$c D=5 DEV=cuda MAXB=32 GRPC=$g BUSY_POLL=$us TAG=poll$us-c$c-g$g \
          timeout 200 python hack/serve-profile.py 2>&1 | grep -E "SUMMARY|HOST|Error" | tail -2
      done
    done
  done ;;
grpc)
  for g in native grpcio; do
    timeout 280 python bench/serve_bench.py --device cuda --models ${MODEL:-bert} --mode aot --precision bf16 \
      --max-batch 32 --workers 8 --paths grpc --concurrency 1,64 --seconds 3 --grpc-server $g \
      --workdir /tmp/gpu-grpc 2>&1 | grep -E "^\| (1|64) \|" | sort -u | sed "s/^/$g /"
  done ;;
datapath)
  for g in ${PROTOCOLS:-0 1}; do  # 0 REST, 1 gRPC
    d=${OUT:-/tmp/gpu-datapath}/$([[ $g == 1 ]] && echo grpc || echo rest); mkdir -p "$d"
    MODEL=tinyimage W=8 C=64 D=5 DEV=cuda MAXB=32 GRPC=$g GIL=1 WALL=1 SPYW=1 SPY=/tmp/site/bin/py-spy OUT=$d \
      TAG=$(basename "$d") timeout 100 python hack/serve-profile.py 2>&1 | grep -E "SUMMARY|THREADS|HOST|Error"
  done ;;
clients)
  for c in ${CONCS:-1 64}; do
    for tool in ${TOOLS:-grpc-go xnet grpc-go xnet}; do
      flags="-h2 $tool"; load=grpcload; [[ $tool == ghz ]] && flags="" load=ghz
      GRPC_LOAD=$PWD/.cache/dev/bin/$load BENCH_GRPCLOAD_FLAGS=$flags MODEL=${MODEL:-resnet50} W=8 C=$c D=5 \
        DEV=cuda MAXB=32 GRPC=1 TAG=$tool-c$c timeout 150 python hack/serve-profile.py 2>&1 |
        grep -E "SUMMARY|THREADS|HOST|Error"
    done
  done ;;
latency)
  d=${OUT:-/tmp/gpu-latency}/latency; mkdir -p "$d"
  MODEL=${MODEL:-bert} W=8 C=1 D=5 DEV=cuda MAXB=32 WALL=1 SPYW=1 SPY=/tmp/site/bin/py-spy OUT=$d TAG=c1 \
    timeout 200 python hack/serve-profile.py 2>&1 | grep -E "SUMMARY|THREADS|HOST|Error" ;;
ab)
  base=/tmp/ab-base; rm -rf $base && cp -a . $base && (cd $base && git apply -R .cache/ab.patch) || exit 1
  names=(base new) dirs=("$base" "$PWD"); interleaved ;;
trees)
  names=(tree) dirs=("$PWD")
  for p in ${PATCHES:?}; do
    n=$(basename "$p" .patch) && d=/tmp/tree-$n
    rm -rf "$d" && cp -a . "$d" && (cd "$d" && git apply "$p") || exit 1
    names+=("$n") dirs+=("$d")
  done
  interleaved ;;
spread)
  echo "${RUNS:-$'resnet50 64 0 16\nresnet50 64 1 16'}" | while read -r m c g n; do
    [[ -z $m ]] && continue
    for b in least-connections kernel least-connections kernel; do
      BALANCE=$b BENCH_GRPC_CONNECTIONS=$n MODEL=$m W=8 C=$c D=${D:-5} DEV=cuda MAXB=32 GRPC=$g \
        TAG=$m-c$c-g$g-n$n-$b timeout 200 python hack/serve-profile.py 2>&1 |
        grep -E "SUMMARY|THREADS|WORKERS|HOST|Error|errors"
    done
  done ;;
idle)
  echo "${RUNS:-$'resnet50 64 0\nbert 64 0'}" | while read -r m c g; do
    [[ -z $m ]] && continue
    for i in 1 2; do
      MODEL=$m W=8 C=$c D=${D:-5} DEV=cuda MAXB=32 GRPC=$g TAG=$m-c$c-g$g-$i timeout 200 python hack/serve-profile.py \
        2>&1 | grep -E "SUMMARY|THREADS|HOST|Error"
    done
  done ;;
deviations)
  echo "${RUNS:-resnet50 64 0}" | while read -r m c g; do
    [[ -z $m ]] && continue
    for k in 2 0 2 0; do
      LAUNCH_DEVIATIONS=$k MODEL=$m W=8 C=$c D=${D:-5} DEV=cuda MAXB=32 GRPC=$g TAG=$m-c$c-g$g-dev$k \
        timeout 200 python hack/serve-profile.py 2>&1 | grep -E "SUMMARY|THREADS|HOST|Error"
    done
  done ;;
gather)
  timeout 300 python bench/h2d_gather_bench.py | tee "${OUT:-/tmp}/gather.md" ;;
overlap)
  timeout 300 python bench/h2d_overlap_bench.py ${OVERLAP_FLAGS:-} | tee "${OUT:-/tmp}/overlap.md" ;;
precompile) # cold start with a filled compile cache, torch's caching precompile (dynamo's traces cached too)
  # off then on, $MODEL (resnet50), 13 buckets; the naive server and a 1 s load come with the bench
  for v in 0 1; do
    TORCH_CACHING_PRECOMPILE=$v timeout 280 python bench/serve_bench.py --device cuda --models "${MODEL:-resnet50}" \
      --mode aot --precision bf16 --max-batch 32 --seconds 1 --concurrency 1 --workers 8 --paths binary \
      --workdir "/tmp/kf-precompile-$v" > "${OUT:-/tmp}/precompile-$v.log" 2>&1
    echo "TORCH_CACHING_PRECOMPILE=$v rc=$?"; grep -E "Cold|Error" "${OUT:-/tmp}/precompile-$v.log" | tail -3
  done ;;
*) echo "usage: $0 tests|tables|copy-stream|grpc|datapath|clients|latency|ab|trees|spread|idle|deviations|gather|overlap|precompile" >&2; exit 2 ;;
esac
