"""Enrolment of a small federation on one machine: keys, mutual trust, coordinator trust.

For each centre: an identity in ``<root>/<centre>/keys`` (kept if present), every other centre's
public identity added to its trust store, and every public identity added to the coordinator's
trust store ``<root>/coordinator/trust.json`` (public keys only). Returns the centres' configs.
"""

from __future__ import annotations

from pathlib import Path

from histodd_fed.federation.centre_config import CentreConfig, ExportPolicy


def policy_from_settings(d: dict | None) -> ExportPolicy:
    """An :class:`ExportPolicy` from YAML-style settings (``export_real``, ``max_ipc``, ``recipients``, ``gate``,
    ``max_epsilon``, ``max_epsilon_total``, ``max_releases``, ``seeds``)."""
    from histodd_fed.errors import ConfigError

    d = dict(d or {})
    known = {"export_real": "export-real", "max_ipc": "export-max-ipc", "recipients": "export-recipients",
             "gate": "export-gate", "max_epsilon": "export-max-epsilon", "max_epsilon_total": "export-max-epsilon-total",
             "max_releases": "export-max-releases", "seeds": "export-seeds"}
    bad = set(d) - set(known)
    if bad:
        raise ConfigError(f"centre policy: unknown key(s) {sorted(bad)} ({', '.join(known)})")
    vals = {known[k]: v for k, v in d.items()}
    return ExportPolicy.from_node_config(lambda k, default=None: vals.get(k, default))


def enrol(root: str | Path, data: dict[str, Path], *, preset: str = "cpu", seed: int = 0,
          faults: dict[str, str] | None = None,
          policies: dict[str, ExportPolicy] | None = None,
          key_passphrase: str = "", scrypt_log2n: int | None = None) -> tuple[list[CentreConfig], Path]:
    """Identities + mutual trust for ``data`` (centre id -> data path); returns (configs, coordinator trust).

    ``policies``: each centre's own export policy (default: synthetic only, real patches stay home).
    ``key_passphrase``: a passphrase source (``env:NAME``, ``file:PATH``): new keys are encrypted with
    it and each node config names it (``key-passphrase``) so the SuperNode unlocks its key at start.
    """
    from histodd_fed.bundle.identity import IDENTITY_FILE, generate_identity, load_public_identity, read_passphrase
    from histodd_fed.bundle.trust import TrustStore

    root = Path(root).resolve()
    configs = []
    pubs = {}
    for cid, path in data.items():
        key_dir = root / cid / "keys"
        if not (key_dir / IDENTITY_FILE).exists():
            pw = read_passphrase(key_passphrase) if key_passphrase else None
            generate_identity(cid, key_dir, passphrase=pw,
                              **({"scrypt_log2n": scrypt_log2n} if scrypt_log2n and pw else {}))
        pubs[cid] = load_public_identity(key_dir)
        configs.append(CentreConfig(centre_id=cid, data=Path(path).resolve(), key_dir=key_dir,
                                    work_dir=root / cid / "work", preset=preset, seed=seed,
                                    fault=(faults or {}).get(cid, ""),
                                    policy=(policies or {}).get(cid, ExportPolicy()),
                                    key_passphrase=key_passphrase))
    for cfg in configs:
        store = TrustStore.load(cfg.key_dir)
        changed = False
        for cid, pub in pubs.items():
            if cid != cfg.centre_id:
                changed |= store.add(pub)
        if changed:
            store.save()
    coord = root / "coordinator"
    coord.mkdir(parents=True, exist_ok=True)
    store = TrustStore.load(coord / "trust.json")
    if any([store.add(pub) for pub in pubs.values()]):
        store.save()
    return configs, coord / "trust.json"
