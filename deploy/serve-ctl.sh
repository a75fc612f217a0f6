#!/bin/sh
# Starts and stops the head's `folio serve` for the `ray up` configs (deploy/*.yaml).
#
#   serve-ctl.sh start folio serve --api-key-file ... --port 8000   # stops a previous one first
#   serve-ctl.sh stop
#
# A restart (`ray up --restart-only`, or `ray up` again) stops the old server before
# `ray stop`, while its cluster can still release its replicas, so the port is free for
# the new one. A server whose cluster went another way (`ray down` runs a bare
# `ray stop`) exits by itself within seconds (cluster/ray_watch.py).
set -eu
pidfile=${FOLIO_SERVE_PIDFILE:-$HOME/.folio/serve.pid}
log=${FOLIO_SERVE_LOG:-$HOME/folio-serve.log}

# Alive and not a zombie: an exited server whose new parent (an init that does not reap,
# as a container's shell can be) has not collected it yet holds nothing, not even its port.
running() {
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ "$state" != Z ]
}

stop() {
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    # Only our folio serve: after a reboot the pid may belong to something else.
    if kill -0 "$pid" 2>/dev/null && grep -q "folio" "/proc/$pid/cmdline" 2>/dev/null; then
        echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ') serve-ctl stop: SIGTERM to $pid" >>"$log"
        kill -TERM "$pid"
        i=0
        while running "$pid" && [ "$i" -lt 60 ]; do sleep 1; i=$((i + 1)); done
        if running "$pid"; then kill -KILL "$pid"; fi
    fi
    rm -f "$pidfile"
}

case "${1:-}" in
    stop) stop ;;
    start)
        shift
        stop
        mkdir -p "$(dirname "$pidfile")"
        # Detached from `ray up`'s SSH session: no terminal, every stream redirected.
        echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ') serve-ctl start: $*" >>"$log"
        nohup "$@" >>"$log" 2>&1 </dev/null &
        echo $! >"$pidfile"
        ;;
    *) echo "usage: $0 start COMMAND... | stop" >&2; exit 2 ;;
esac
