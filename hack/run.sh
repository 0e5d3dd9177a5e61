#!/usr/bin/env bash
# Runs vmkeep.
#
#   hack/run.sh [KUBECONFIG]   build vmkeep, install its CRDs and start the operator in the
#                              background against that cluster, or against the local cluster
#                              (control plane and one node, started on demand, with the
#                              launcher image imported) when none is given; builds the
#                              kubectl plugin (kubectl-vmkeep, in cargo's target folder);
#                              prints the kubeconfig path to use with kubectl
#   hack/run.sh stop           stop the operator, and the local cluster if this script started
#                              it (its data stays: `hack/cluster.sh reset` forgets it)
#
# The operator serves on VMKEEP_HTTP_ADDR (default 127.0.0.1:18080); the binaries are where cargo
# builds them (CARGO_TARGET_DIR and the like are honoured). Only the operator this script
# started is ever signalled (its pid file records who it is).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_PREFIX=run
# shellcheck source=hack/lib.sh
source hack/lib.sh
CACHE=${VMKEEP_CACHE:-$HOME/.cache/vmkeep}
RUN=$CACHE/run
STATE=${VMKEEP_CLUSTER_DIR:-$CACHE/cluster}
HTTP_ADDR=${VMKEEP_HTTP_ADDR:-127.0.0.1:18080}

# A vmkeep.pid of an older hack/run.sh has no .id: its process is accepted when it is the
# `target/debug/vmkeep run` that script started, from this checkout.
# shellcheck disable=SC2317 # called through PROC_LEGACY
legacy_operator() { # PID PIDFILE
  local -a argv
  local legacy_binary=target/debug/vmkeep
  mapfile -t argv < <(proc_argv "$1")
  [[ ${argv[0]:-} == "$legacy_binary" && ${argv[1]:-} == run && $(readlink "/proc/$1/cwd") == "$PWD" ]]
}
PROC_LEGACY=legacy_operator

# vmkeep exits on SIGTERM within its shutdown grace (20 s).
stop_operator() { PROC_STOP_TIMEOUT=30 proc_stop "$RUN/vmkeep.pid"; }

if [[ ${1:-} == stop ]]; then
  stop_operator
  # The local cluster, only if it is still the one this script started.
  if [[ -f $RUN/cluster.started ]] && cmp -s "$RUN/cluster.started" "$STATE/kube-apiserver.pid.id"; then
    bash hack/cluster.sh down
  elif [[ -f $STATE/ready ]]; then
    log "left the local cluster running: hack/run.sh did not start it (hack/cluster.sh down stops it)"
  fi
  rm -f "$RUN/cluster.started"
  exit 0
fi

command -v cargo >/dev/null || die "cargo not found: install Rust (>= 1.89) with rustup"
if [[ -n ${1:-} ]]; then
  kubeconfig=$(realpath "$1")
  cargo build --locked --quiet --bin vmkeep
else
  # Whether `up` starts the cluster (a new API server) or finds it running: `stop` stops only
  # a cluster this script started.
  before=$(cat "$STATE/kube-apiserver.pid.id" 2>/dev/null || true)
  kubeconfig=$(bash hack/cluster.sh up | tail -n 1)
  after=$(cat "$STATE/kube-apiserver.pid.id" 2>/dev/null || true)
  mkdir -p "$RUN"
  if [[ -n $after && $after != "$before" ]]; then
    printf '%s\n' "$after" >"$RUN/cluster.started"
  fi
  # The launcher image (and the others) into the node, so the examples' VMs run.
  bash hack/images.sh >/dev/null
fi
# The kubectl plugin: `kubectl vmkeep console|start|stop|restart`.
cargo build --locked --quiet --bin kubectl-vmkeep
vmkeep=$(cargo_bin debug vmkeep)
[[ -x $vmkeep ]] || die "no $vmkeep after cargo build (cargo metadata names $(cargo_target_dir) as its target folder)"
kubectl="$(bash hack/cluster.sh tools)/kubectl"
"$kubectl" --kubeconfig "$kubeconfig" apply --server-side -f crds/ >/dev/null

stop_operator
ports_free "VMKEEP_HTTP_ADDR=${HTTP_ADDR##*:}" || die "the operator's address $HTTP_ADDR is taken"
mkdir -p "$RUN"
KUBECONFIG=$kubeconfig proc_start "$RUN/vmkeep.pid" "$RUN/vmkeep.log" "$vmkeep" run --http-addr "$HTTP_ADDR"
for _ in $(seq 1 100); do
  if curl -fsS --max-time 1 "http://$HTTP_ADDR/readyz" >/dev/null 2>&1 && proc_alive "$RUN/vmkeep.pid"; then
    cat >&2 <<MSG
vmkeep is running (pid $PROC_PID, log $RUN/vmkeep.log, metrics http://$HTTP_ADDR/metrics).
Try it:
  export KUBECONFIG=$kubeconfig PATH=$(dirname "$kubectl"):$(dirname "$vmkeep"):\$PATH
  kubectl apply -f examples/ && kubectl get vmkeep
  kubectl vmkeep console vm-a     # the VM's serial console; detach with Ctrl+]
Stop it: hack/run.sh stop
MSG
    echo "$kubeconfig"
    exit 0
  fi
  proc_alive "$RUN/vmkeep.pid" || break
  sleep 0.3
done
tail -20 "$RUN/vmkeep.log" >&2
die "vmkeep did not become ready (log: $RUN/vmkeep.log)"
