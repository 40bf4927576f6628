#!/usr/bin/env bash
# Stop every process started by examples/deploy/start.sh DEPLOY_DIR (by the pids it recorded).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:?deploy dir}
.venv/bin/python -c "import sys; from histodd_fed.federation.deployment import stop_pids; print('stopped', stop_pids(sys.argv[1]), 'process group(s)')" "$DIR"
