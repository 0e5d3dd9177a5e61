#!/usr/bin/env bash
# Runs vmkeep.
#
#   hack/run.sh [KUBECONFIG]   build vmkeep, install its CRDs and start the operator in the
#                              background against that cluster, or against the local cluster
#                              (control plane and one node, started on demand, with the
#                              launcher image imported) when none is given; builds the
#                              kubectl plugin (target/debug/kubectl-vmkeep); prints the
#                              kubeconfig path to use with kubectl
#   hack/run.sh stop           stop the operator and the local cluster
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${VMKEEP_CACHE:-$HOME/.cache/vmkeep}
RUN=$CACHE/run
HTTP_ADDR=${VMKEEP_HTTP_ADDR:-127.0.0.1:18080}

stop_operator() {
  if [[ -f $RUN/vmkeep.pid ]]; then
    local pid
    pid=$(cat "$RUN/vmkeep.pid")
    kill "$pid" 2>/dev/null || true
    # vmkeep exits on SIGTERM within its shutdown grace (20 s).
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.3; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$RUN/vmkeep.pid"
  fi
}

if [[ ${1:-} == stop ]]; then
  stop_operator
  bash hack/cluster.sh down
  exit 0
fi

command -v cargo >/dev/null || { echo "cargo not found: install Rust (>= 1.89) with rustup" >&2; exit 1; }
if [[ -n ${1:-} ]]; then
  kubeconfig=$(realpath "$1")
  cargo build --locked --quiet --bin vmkeep
else
  kubeconfig=$(bash hack/cluster.sh up | tail -n 1)
  # The launcher image (and the others) into the node, so the examples' VMs run.
  bash hack/images.sh >/dev/null
fi
# The kubectl plugin: `kubectl vmkeep console|start|stop|restart`.
cargo build --locked --quiet --bin kubectl-vmkeep
kubectl="$(bash hack/cluster.sh tools)/kubectl"
"$kubectl" --kubeconfig "$kubeconfig" apply --server-side -f crds/ >/dev/null

stop_operator
mkdir -p "$RUN"
KUBECONFIG=$kubeconfig nohup setsid target/debug/vmkeep run --http-addr "$HTTP_ADDR" >"$RUN/vmkeep.log" 2>&1 </dev/null &
echo $! >"$RUN/vmkeep.pid"
for _ in $(seq 1 100); do
  if curl -fsS --max-time 1 "http://$HTTP_ADDR/readyz" >/dev/null 2>&1; then
    cat >&2 <<MSG
vmkeep is running (pid $(cat "$RUN/vmkeep.pid"), log $RUN/vmkeep.log, metrics http://$HTTP_ADDR/metrics).
Try it:
  export KUBECONFIG=$kubeconfig PATH=$(dirname "$kubectl"):$PWD/target/debug:\$PATH
  kubectl apply -f examples/ && kubectl get vmkeep
  kubectl vmkeep console vm-a     # the VM's serial console; detach with Ctrl+]
Stop it: hack/run.sh stop
MSG
    echo "$kubeconfig"
    exit 0
  fi
  kill -0 "$(cat "$RUN/vmkeep.pid")" 2>/dev/null || break
  sleep 0.3
done
tail -20 "$RUN/vmkeep.log" >&2
echo "vmkeep did not become ready (log: $RUN/vmkeep.log)" >&2
exit 1
