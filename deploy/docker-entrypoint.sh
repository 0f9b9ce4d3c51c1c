#!/bin/sh
# Entrypoint of the Writ image (deploy/Dockerfile; docs/operations.md, "Docker").
#
#   (no arguments) or `serve [OPTIONS]`
#       writ serve --data /var/lib/writ --host 0.0.0.0 --port 8000 [OPTIONS]
#       (OPTIONS: any other `writ serve` option, e.g. --checkpoint-interval 5)
#   anything else: the `writ` command line as given, e.g.
#       server init --data /var/lib/writ --anchor HEX --origin ORIGIN
#       audit --data /var/lib/writ --anchor HEX
set -eu

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    [ "$#" -gt 0 ] && shift
    if [ ! -f /var/lib/writ/server.json ]; then
        echo "docker-entrypoint: /var/lib/writ holds no ledger server yet; create it once with" >&2
        echo "  docker run --rm -v writ-data:/var/lib/writ IMAGE server init --data /var/lib/writ --anchor HEX --origin ORIGIN" >&2
        exit 2
    fi
    exec writ serve --data /var/lib/writ --host 0.0.0.0 --port 8000 "$@"
fi
exec writ "$@"
