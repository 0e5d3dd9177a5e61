#!/usr/bin/env bash
# Runs every test: unit tests, the CRD drift test, and the tests against a real cluster.
# They use the local cluster (control plane and one node, started here and stopped afterwards if
# this script started it; the images of hack/images.sh imported into its node) unless
# VMKEEP_TEST_KUBECONFIG names another cluster (kind, k3d, a real one: load the images of
# hack/images.sh into it for the tests that run Pods).
# Extra arguments go to `cargo test` (e.g. `hack/test.sh --test foundation`).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_PREFIX='test'
# shellcheck source=hack/lib.sh
source hack/lib.sh

command -v cargo >/dev/null || { echo "cargo not found: install Rust (>= 1.89) with rustup" >&2; exit 1; }

if [[ -z ${VMKEEP_TEST_KUBECONFIG:-} ]]; then
  # Stopped again only when this script started it: wiped (`reset`) when it also made it, so
  # no test's leftovers (a VM in a namespace still being deleted) run in the next run; only
  # stopped (`down`, data kept) when it started a cluster someone else made and stopped.
  if ! bash hack/cluster.sh status; then
    if [[ -d ${VMKEEP_CLUSTER_DIR:-${VMKEEP_CACHE:-$HOME/.cache/vmkeep}/cluster} ]]; then
      trap 'bash hack/cluster.sh down' EXIT
    else
      trap 'bash hack/cluster.sh reset' EXIT
    fi
  fi
  kubeconfig=$(bash hack/cluster.sh up | tail -n 1)
  # The operator, launcher and pause images, built from this checkout and imported into the
  # node's containerd (the in-cluster install tests and the launcher Pods run them).
  bash hack/images.sh >/dev/null
  echo "testing against the local cluster (control plane and one node)"
else
  kubeconfig=$VMKEEP_TEST_KUBECONFIG
  echo "testing against the cluster of $kubeconfig"
fi
bash hack/cluster.sh tools >/dev/null # kubectl for the tests

cargo test --locked "$@"

# The benchmark harness at a small N, so it cannot rot (docs/performance.md has the real runs):
# 20 VMs reach Starting and a restarted operator writes nothing. Skipped when only some tests
# were asked for.
if [[ $# -eq 0 ]]; then
  echo "benchmark smoke test (cargo run --bin vmkeep-bench -- --smoke)"
  cargo run --locked --quiet --bin vmkeep-bench -- --smoke --kubeconfig "$kubeconfig" --out-dir "$(cargo_target_dir)/bench-smoke"
fi
