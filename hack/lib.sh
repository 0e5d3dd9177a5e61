# Shared by the hack/ scripts (sourced, not run): logging and Debian packages.
# The sourcing script sets LOG_PREFIX (e.g. "cluster") before sourcing.

log() { printf '[%s] %s\n' "$LOG_PREFIX" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$LOG_PREFIX" "$*" >&2; exit 1; }

# apt_install PACKAGE...: installs the Debian packages that are missing (one `apt-get update`
# per run, only when something is missing); needs root for that.
apt_updated=
apt_install() {
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  [[ $(id -u) == 0 ]] || die "missing Debian packages: ${missing[*]} (run as root or install them)"
  if [[ -z $apt_updated ]]; then apt-get update -qq; apt_updated=1; fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
