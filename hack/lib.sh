# Shared by the hack/ scripts (sourced, not run): logging, Debian packages, where cargo builds,
# the processes the scripts start (pid files with identities) and the ports they bind.
# The sourcing script sets LOG_PREFIX (e.g. "cluster") before sourcing.
# shellcheck shell=bash

log() { printf '[%s] %s\n' "$LOG_PREFIX" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$LOG_PREFIX" "$*" >&2; exit 1; }

# apt_install PACKAGE...: installs the Debian packages that are missing (one `apt-get update`
# per run, only when something is missing); needs root for that. Installing one can remove
# another of the list that came from elsewhere (this machine's backported qemu-utils 10 goes when
# Debian's qemu-system-x86 7.2 comes in): those are installed again, from Debian.
apt_updated=
apt_missing() { # apt_missing PACKAGE...: those not installed, a line each
  local p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"; done
}
apt_install() {
  local missing=() round
  for round in 1 2; do
    mapfile -t missing < <(apt_missing "$@")
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing Debian packages: ${missing[*]} (run as root or install them)"
    if [[ -z $apt_updated ]]; then apt-get update -qq; apt_updated=1; fi
    if [[ $round == 1 ]]; then log "installing ${missing[*]}"; else log "installing again ${missing[*]} (removed by the first install)"; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  done
  mapfile -t missing < <(apt_missing "$@")
  ((${#missing[@]} == 0)) || die "Debian packages ${missing[*]} cannot be installed beside the others of: $*"
}

# --- where cargo builds -------------------------------------------------------------------------
# cargo_target_dir: the folder cargo builds into, as `cargo metadata` reports it (it honours
# CARGO_TARGET_DIR, CARGO_BUILD_TARGET_DIR and build.target-dir of .cargo/config.toml); without
# cargo, $CARGO_TARGET_DIR or target/. Absolute. Run it from the repository.
cargo_target_dir() {
  local dir=
  if command -v cargo >/dev/null 2>&1; then
    dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
      sed -n 's/.*"target_directory":"\([^"\\]*\)".*/\1/p')
  fi
  [[ -n $dir ]] || dir=${CARGO_TARGET_DIR:-target}
  [[ $dir == /* ]] || dir=$PWD/$dir
  printf '%s\n' "$dir"
}

# cargo_bin PROFILE NAME: the path of binary NAME that `cargo build` (PROFILE debug) or
# `cargo build --release` (PROFILE release) makes.
cargo_bin() { printf '%s/%s%s/%s\n' "$(cargo_target_dir)" "${CARGO_BUILD_TARGET:+$CARGO_BUILD_TARGET/}" "$1" "$2"; }

# --- processes these scripts start --------------------------------------------------------------
# A process is signalled only when it is verifiably the one a script started. proc_start writes
# the pid into PIDFILE (the pid alone, as older scripts wrote and read it) and its identity into
# PIDFILE.id: the boot, its start time (field 22 of /proc/PID/stat, clock ticks after boot; exec
# keeps it) and the sha256 of its command line. A pid file without PIDFILE.id (written by an older
# script) is accepted only when the function named by PROC_LEGACY (called with PID PIDFILE)
# accepts the process; without PROC_LEGACY, never.
PROC_STOP_TIMEOUT=${PROC_STOP_TIMEOUT:-20}

# proc_starttime PID: field 22 of /proc/PID/stat; fails when PID is gone or a zombie (exited, not
# yet reaped: gone too).
proc_starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) } # after the command name, which may hold spaces and parentheses
  local -a f
  read -r -a f <<<"$stat"
  [[ ${f[0]:-Z} != [ZX] ]] || return 1
  printf '%s\n' "${f[19]}"
}
proc_boot() { cat /proc/sys/kernel/random/boot_id; }
proc_cmdline_sum() { sha256sum <"/proc/$1/cmdline" 2>/dev/null | cut -d' ' -f1; }
argv_sum() { printf '%s\0' "$@" | sha256sum | cut -d' ' -f1; }
# proc_argv PID: its command line, one argument a line.
proc_argv() { tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null; }

# proc_start PIDFILE LOGFILE COMMAND...: COMMAND in a session of its own, in the background, its
# output into LOGFILE; records its pid and identity. Returns once COMMAND runs (or has exited).
proc_start() {
  local pidfile=$1 logfile=$2; shift 2
  rm -f "$pidfile" "$pidfile.id"
  nohup setsid "$@" >"$logfile" 2>&1 </dev/null &
  local pid=$! start sum
  sum=$(argv_sum "$@")
  start=$(proc_starttime "$pid") || start=gone
  printf 'boot=%s\nstart=%s\ncmdline=%s\nargv=%s\n' "$(proc_boot)" "$start" "$sum" "$*" >"$pidfile.id"
  printf '%s\n' "$pid" >"$pidfile"
  # Until it has exec'd COMMAND (nohup and setsid exec in turn), its command line is not the
  # recorded one yet.
  local i
  for ((i = 0; i < 200; i++)); do
    [[ $(proc_cmdline_sum "$pid") == "$sum" ]] && return 0
    proc_starttime "$pid" >/dev/null || return 0
    sleep 0.02
  done
}

# proc_check PIDFILE: 0 when PIDFILE names a running process that is verifiably the one started
# (sets PROC_PID and PROC_START); 1 when there is no pid file or its process is gone; 2 when a
# process runs under that pid but is not verifiably ours (sets PROC_PID and PROC_WHY).
proc_check() {
  local pidfile=$1 pid start
  PROC_PID='' PROC_START='' PROC_WHY=''
  [[ -f $pidfile ]] || return 1
  pid=$(head -n 1 "$pidfile" 2>/dev/null) || return 1
  [[ $pid =~ ^[1-9][0-9]*$ ]] || return 1
  start=$(proc_starttime "$pid") || return 1
  PROC_PID=$pid
  if [[ -f $pidfile.id ]]; then
    local k v boot='' rstart='' sum=''
    while IFS='=' read -r k v; do
      case $k in boot) boot=$v ;; start) rstart=$v ;; cmdline) sum=$v ;; esac
    done <"$pidfile.id"
    if [[ $boot != "$(proc_boot)" ]]; then
      PROC_WHY="$pidfile.id was written before this machine booted"; return 2
    elif [[ $rstart != "$start" ]]; then
      PROC_WHY="it started at tick $start, not at tick $rstart as recorded in $pidfile.id (the pid was reused)"; return 2
    elif [[ $sum != "$(proc_cmdline_sum "$pid")" ]]; then
      PROC_WHY="its command line is not the one recorded in $pidfile.id"; return 2
    fi
  elif [[ -n ${PROC_LEGACY:-} ]] && "$PROC_LEGACY" "$pid" "$pidfile"; then
    : # an older script's pid file, and the process is what that script launched
  else
    PROC_WHY="$pidfile records no identity (no $pidfile.id)${PROC_LEGACY:+ and the process is not what the script launches}"
    return 2
  fi
  PROC_START=$start
}

# proc_alive PIDFILE: its process runs and is ours.
proc_alive() { proc_check "$1"; }

# proc_legacy_match PID ARGV0 MARKER: PID runs ARGV0 (its argv[0], exactly) and MARKER (e.g. the
# state folder, with a trailing slash) is part of one of its arguments.
proc_legacy_match() {
  local -a argv
  mapfile -t argv < <(proc_argv "$1")
  ((${#argv[@]})) && [[ ${argv[0]} == "$2" ]] || return 1
  [[ -z $3 ]] && return 0
  local a
  for a in "${argv[@]:1}"; do [[ $a == *"$3"* ]] && return 0; done
  return 1
}

# proc_stop PIDFILE...: SIGTERM to each process that is ours, at once, SIGKILL to those still
# there after PROC_STOP_TIMEOUT seconds (the same process: pid and start time checked again);
# a process that is not verifiably ours is left alone, and said so. The pid files go.
proc_stop() {
  local f rc pids=() starts=()
  for f in "$@"; do
    rc=0; proc_check "$f" || rc=$?
    case $rc in
      0) kill -TERM "$PROC_PID" 2>/dev/null || true; pids+=("$PROC_PID"); starts+=("$PROC_START") ;;
      2) log "not signalling pid $PROC_PID named by $f: $PROC_WHY" ;;
    esac
    rm -f "$f" "$f.id"
  done
  local i end=$((SECONDS + PROC_STOP_TIMEOUT))
  for i in "${!pids[@]}"; do
    while [[ $(proc_starttime "${pids[i]}" 2>/dev/null) == "${starts[i]}" ]]; do
      if ((SECONDS >= end)); then
        log "pid ${pids[i]} ignored SIGTERM for ${PROC_STOP_TIMEOUT} s: SIGKILL"
        kill -KILL "${pids[i]}" 2>/dev/null || true
        break
      fi
      sleep 0.2
    done
  done
}

# procs_using DIR: the pids (other than this shell's) whose command line names something under DIR.
procs_using() {
  local d p
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [[ $p == "$$" || $p == "$BASHPID" ]] && continue
    tr '\0' '\n' <"$d/cmdline" 2>/dev/null | grep -qF -- "$1/" && echo "$p"
  done
  return 0
}

# --- ports --------------------------------------------------------------------------------------
# port_pids PORT: the pids with a TCP socket listening on PORT (any address, IPv4 or IPv6).
port_pids() {
  local inodes inode fd
  inodes=$(awk -v p="$(printf '%04X' "$1")" \
    'FNR > 1 && $4 == "0A" { n = split($2, a, ":"); if (a[n] == p) print $10 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null)
  [[ -n $inodes ]] || return 0
  for inode in $inodes; do
    for fd in /proc/[0-9]*/fd/*; do
      [[ $(readlink "$fd" 2>/dev/null) == "socket:[$inode]" ]] && { fd=${fd#/proc/}; echo "${fd%%/*}"; }
    done
  done | sort -un
  return 0
}

# port_listening PORT: something listens on TCP PORT.
port_listening() {
  awk -v p="$(printf '%04X' "$1")" \
    'FNR > 1 && $4 == "0A" { n = split($2, a, ":"); if (a[n] == p) f = 1 } END { exit !f }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# ports_free VARIABLE=PORT...: each PORT is free (nothing listens on it, on any address);
# otherwise says, for each one in use, who holds it and which environment variable moves it,
# and fails.
ports_free() {
  local spec var port pids who p busy=0
  for spec in "$@"; do
    var=${spec%%=*} port=${spec#*=}
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
      printf '[%s] error: %s=%s is not a TCP port\n' "$LOG_PREFIX" "$var" "$port" >&2; busy=1; continue
    fi
    port_listening "$port" || continue
    who=
    pids=$(port_pids "$port")
    for p in $pids; do who+="${who:+, }pid $p ($(proc_argv "$p" | head -c 200 | tr '\n' ' ' | sed 's/ $//'))"; done
    printf '[%s] error: port %s is in use by %s; set %s to a free port to move it\n' \
      "$LOG_PREFIX" "$port" "${who:-a process this user cannot see}" "$var" >&2
    busy=1
  done
  return "$busy"
}
