# Is this pid still the process it was? After a machine restart the kernel hands pids out again, so
# a pid a pidfile names may belong to another process, which must be neither taken for the one
# recorded (waited for, or left to run in its place) nor signalled. Sourced by the scripts that
# keep pids: extra-engine.sh, ensure-docker.sh, cluster-up.sh and cluster-down.sh.

stat_field() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f"$(( $2 - 2 ))"; }  # stat_field PID N: proc(5)'s field N (from 3, after "comm) ")

# pid_runs PID [TEXT]: PID runs, is not a zombie (a killed daemon whose parent is gone may never be
# reaped, and dockerd refuses to start while its pidfile's pid has a live /proc entry), and its
# command line holds TEXT when given (a daemon's own pidfile or config names it as itself).
pid_runs() {
    case $1 in ''|*[!0-9]*) return 1 ;; esac
    local state; state=$(stat_field "$1" 3)
    [ -n "$state" ] && [ "$state" != Z ] || return 1
    [ -z "${2:-}" ] || tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# Pids recorded with their process's start time (field 22, in clock ticks since boot): make cluster
# and make cluster-down.
started_at() { stat_field "$1" 22; }

record_pid() { echo "$2 $(started_at "$2")" >"$1"; }  # record_pid FILE PID

recorded_pid() {  # recorded_pid FILE: print the pid FILE records, if that very process still runs
    local pid="" at=""
    [ -f "$1" ] && read -r pid at <"$1" || true
    [ -n "$pid" ] && [ -n "$at" ] && [ "$(started_at "$pid")" = "$at" ] && echo "$pid"
}

# postgres_runs DATA: the postmaster.pid in DATA names a live postgres. `pg_ctl status` and `pg_ctl
# stop` take any live pid there for the server: after a restart, stop would signal another process.
postgres_runs() {
    local pid
    pid=$(head -n1 "$1/postmaster.pid" 2>/dev/null) || return 1
    pid_runs "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]
}
