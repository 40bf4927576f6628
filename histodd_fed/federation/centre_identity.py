"""A centre's identity: its keys in its key dir, created on first use and unlocked once per process."""

from __future__ import annotations

import logging
from typing import Any

from histodd_fed.errors import ConfigError
from histodd_fed.federation.centre_config import CentreConfig

log = logging.getLogger(__name__)

_IDENTITIES: dict[tuple, Any] = {}


def load_or_create_identity(cfg: CentreConfig):
    """The centre's identity from its key dir (created on first use), unlocked once per process.

    An ``env:NAME`` passphrase source is removed from ``os.environ`` once read (no process this
    centre starts afterwards inherits it); each key dir's unlocked identity is kept for the process."""
    from histodd_fed.bundle.identity import (IDENTITY_FILE, SIGNING_KEY_FILE, forget_env_passphrase,
                                             generate_identity, load_identity, read_passphrase)

    source = getattr(cfg, "key_passphrase", "") or None   # node config key-passphrase: env:NAME, file:PATH, fd:N
    pw = None
    if not (cfg.key_dir / IDENTITY_FILE).exists():
        log.info("%s: no identity in %s, generating one", cfg.centre_id, cfg.key_dir)
        pw = read_passphrase(source) if source else None
        generate_identity(cfg.centre_id, cfg.key_dir, passphrase=pw)
    f = cfg.key_dir / SIGNING_KEY_FILE
    where = str(cfg.key_dir.resolve())
    memo = (where, source, f.stat().st_mtime_ns if f.exists() else 0)
    ident = _IDENTITIES.get(memo)
    if ident is None:  # unlock once per process (scrypt at login cost)
        ident = (load_identity(cfg.key_dir, pw) if pw is not None
                 else load_identity(cfg.key_dir, passphrase_source=source))
        for old in [m for m in _IDENTITIES if m[0] == where]:
            del _IDENTITIES[old]
        _IDENTITIES[memo] = ident
    forget_env_passphrase(source)
    if ident.centre_id != cfg.centre_id:
        raise ConfigError(f"{cfg.key_dir}: holds the identity of {ident.centre_id!r}, not {cfg.centre_id!r}")
    return ident
