"""The consortium's app release: the one Flower app (FAB) the centres run, signed by the consortium.

Whoever holds the app key decides what code runs on every centre, so the key stays with the
consortium's release holder, never on the coordinator (which only submits the signed app):

    python -m histodd_fed.federation.app_release keygen KEY.pem       # once, by the consortium
    python -m histodd_fed.federation.app_release sign --key KEY.pem --out RELEASE

``sign`` copies the app's sources into ``RELEASE/app``, adds ``app-signature.json`` (Ed25519 over
every file's path and SHA-256, :func:`~histodd_fed.federation.app_trust.sign_fab`) and writes
``RELEASE/app-trust.json`` (the public key only) for each centre to pin. ``RELEASE`` holds no
private key; the coordinator gets ``RELEASE`` (``examples/deploy/start.sh``, ``Deployment.use_release``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from histodd_fed.atomic import atomic_write_text
from histodd_fed.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("centre_node", "coordinator", "histodd_fed")
SOURCE_SUFFIXES = {".py", ".yaml", ".json", ".toml"}


def build_fab(app_dir: Path, env: dict[str, str] | None = None) -> bytes:
    """The FAB ``flwr run app_dir`` submits (Flower's own builder, in a subprocess)."""
    code = ("import sys; from pathlib import Path; from flwr.cli.build import build_fab_from_disk; "
            "sys.stdout.buffer.write(build_fab_from_disk(Path(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-c", code, str(app_dir)], env=env or dict(os.environ), capture_output=True,
                       timeout=300)
    if r.returncode != 0:
        raise ConfigError(f"building the FAB of {app_dir} failed: {r.stderr.decode(errors='replace')[-400:]}")
    return r.stdout


def _public_key(key_file: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{key_file}: unreadable app key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{key_file}: not an Ed25519 private key")
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def release_app(out: str | Path, app_key: str | Path) -> Path:
    """Stage and sign the app in ``out/app`` with the existing ``app_key``; write ``out/app-trust.json``."""
    from histodd_fed.federation.app_trust import SIGNATURE_FILE, AppTrust, check_fab, sign_fab

    out, key = Path(out).resolve(), Path(app_key).resolve()
    if not key.is_file():
        raise ConfigError(f"{key}: no app key (the consortium makes it once: app_release keygen)")
    if key.is_relative_to(out):
        raise ConfigError(f"{key}: the app key must not lie inside the release {out} that is handed out")
    pub = _public_key(key)
    app = out / "app"
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "pyproject.toml", app / "pyproject.toml")
    for pkg in PACKAGES:
        for f in sorted((REPO_ROOT / pkg).rglob("*")):
            if f.is_file() and f.suffix in SOURCE_SUFFIXES and "__pycache__" not in f.parts:
                dst = app / f.relative_to(REPO_ROOT)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst)
    atomic_write_text(app / SIGNATURE_FILE, json.dumps(sign_fab(build_fab(app), key), indent=1) + "\n")
    trust = out / "app-trust.json"
    atomic_write_text(trust, json.dumps({"format": "histodd-app-trust", "format_version": 1, "digests": [],
                                         "keys": [base64.b64encode(pub).decode()]}))
    check_fab(build_fab(app), AppTrust.load(trust))  # what flwr run will submit passes
    return out


def main(argv: list[str] | None = None) -> None:
    from histodd_fed.errors import HistoddError
    from histodd_fed.federation.app_trust import generate_app_key

    p = argparse.ArgumentParser(prog="python -m histodd_fed.federation.app_release",
                                description="The consortium's signed app release (keep the key off the coordinator).")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="a new Ed25519 app key (PEM, 0600); refuses to overwrite")
    k.add_argument("key", type=Path)
    s = sub.add_parser("sign", help="stage and sign the app into OUT/app, OUT/app-trust.json for the centres")
    s.add_argument("--key", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "keygen":
            if args.key.exists():
                raise ConfigError(f"{args.key}: exists; refusing to overwrite an app key")
            args.key.parent.mkdir(parents=True, exist_ok=True)
            generate_app_key(args.key)
            print(f"app key {args.key} (keep it with the consortium, not on the coordinator)")
        else:
            out = release_app(args.out, args.key)
            print(f"signed app {out / 'app'}; centres pin {out / 'app-trust.json'}")
    except HistoddError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
