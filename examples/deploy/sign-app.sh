#!/usr/bin/env bash
# The consortium's step (NOT the coordinator's): sign the app every centre will run.
#   examples/deploy/sign-app.sh APP_KEY RELEASE_DIR
# APP_KEY: the consortium's Ed25519 app key (PEM, 0600), made once with
#   .venv/bin/python -m histodd_fed.federation.app_release keygen APP_KEY
# and kept with the consortium's release holder: whoever holds it decides what code runs on every centre.
# Writes RELEASE_DIR/app (the signed app) and RELEASE_DIR/app-trust.json (public key only): each
# centre pins app-trust.json; the coordinator gets RELEASE_DIR (examples/deploy/start.sh), never the key.
set -euo pipefail
cd "$(dirname "$0")/../.."
KEY=${1:?app key}; OUT=${2:?release dir}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec .venv/bin/python -m histodd_fed.federation.app_release sign --key "$KEY" --out "$OUT"
