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

stop() {
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    # Only our folio serve: after a reboot the pid may belong to something else.
    if kill -0 "$pid" 2>/dev/null && grep -q "folio" "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid"
        i=0
        while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 60 ]; do sleep 1; i=$((i + 1)); done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
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
        nohup "$@" >"$log" 2>&1 </dev/null &
        echo $! >"$pidfile"
        ;;
    *) echo "usage: $0 start COMMAND... | stop" >&2; exit 2 ;;
esac
