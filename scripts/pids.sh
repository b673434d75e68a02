# Pids recorded with their process's start time (field 22 of /proc/PID/stat, in clock ticks since
# boot), so a pid the kernel has since handed to another process (after a machine restart, say) is
# neither taken for the recorded one nor signalled. Sourced by cluster-up.sh and cluster-down.sh.

started_at() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }  # field 22: 20th after "comm) "

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
    case $pid in ''|*[!0-9]*) return 1 ;; esac
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]
}
