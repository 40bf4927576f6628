#!/usr/bin/env bash
# Start a local TLS + SuperNode-auth Flower deployment for histodd-fed:
#   one flower-superlink (all its APIs on 127.0.0.1) and, per centre, one flower-supernode with
#   --isolation process plus the centre's ClientApp launcher (centre_node.app_guard), which runs
#   only the app signed by the consortium app key the centre pinned (RELEASE_DIR/app-trust.json).
# Usage: examples/deploy/start.sh DEPLOY_DIR NODES_JSON RELEASE_DIR
#   RELEASE_DIR: the consortium's signed app (examples/deploy/sign-app.sh, run by the consortium with
#   its app key; this script never makes or reads an app key).
#   NODES_JSON: JSON list of centre node configs (centre-id, data, key-dir, work-dir, preset and the
#   centre's export policy: export-real, export-max-ipc, export-recipients, export-gate),
#   e.g. demo-data/nodes.json written by `coordinator demo`.
# Then submit the staged, signed app (any other app is refused by every centre):
#   FLWR_HOME=DEPLOY_DIR/flwr-home flwr run DEPLOY_DIR/app histodd --stream --run-config "..."
# Stop everything with examples/deploy/stop.sh DEPLOY_DIR (pids in DEPLOY_DIR/pids.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:?deploy dir}; NODES=${2:?nodes json}; RELEASE=${3:?signed app release dir (examples/deploy/sign-app.sh)}
export FLWR_HOME="$DIR/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec .venv/bin/python - "$DIR" "$NODES" "$RELEASE" <<'PY'
import json, sys
from histodd_fed.federation.centre import CentreConfig
from histodd_fed.federation.deployment import Deployment
dep = Deployment(sys.argv[1])
try:
    dep.start_superlink()
    app = dep.use_release(sys.argv[3])
    for nc in json.load(open(sys.argv[2])):
        c = CentreConfig.from_node_config(nc)
        print(f"{c.centre_id}: export policy {c.policy.summary()}")
        dep.add_supernode(c.centre_id, c.node_config_string())
except Exception:
    dep.stop()
    raise
print(f"SuperLink https://127.0.0.1:{dep.port} (connection 'histodd' in {dep.flwr_home}/config.toml); "
      f"signed app in {app} (submit that one); pids in {dep.root}/pids.txt")
PY
