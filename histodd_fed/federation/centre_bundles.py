"""A centre's bundles: seal a set to recipients (release budget and ledger), open a received bundle
(trust store and replay ledger), what its verified manifest says (:func:`provenance`), and a re-check
of senders against the current trust store."""

from __future__ import annotations

from typing import Any

from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.centre_identity import load_or_create_identity
from histodd_fed.patchset import PatchSet


def seal_for(cfg: CentreConfig, ps: PatchSet, recipients: list[str], label: str,
             privacy_report: dict[str, Any] | None = None, extra: dict[str, Any] | None = None, *,
             seed: int | None = None) -> bytes:
    """Seal ``ps`` from this centre to ``recipients`` (all must be in its trust store).

    The release is checked against the centre's release budget (``cfg.policy``) and recorded per
    recipient in its release ledger (``releases.json`` in the key dir) under one lock;
    :class:`~histodd_fed.bundle.releases.ReleaseBudgetError` when refused (nothing sealed or recorded).
    ``seed``: the distillation seed the centre picked (recorded in the ledger). Slide ids and source
    indices are replaced by per-bundle pseudonyms unless the policy allows them (``export-slide-ids``).
    """
    import os

    from histodd_fed.bundle import seal
    from histodd_fed.bundle.releases import ReleaseBudget, ReleaseLedger, SetRelease
    from histodd_fed.bundle.trust import TrustStore

    ident = load_or_create_identity(cfg)
    trust = TrustStore.load(cfg.key_dir)
    keys = trust.recipients(recipients)
    policy = getattr(cfg, "policy", None)
    budget = policy.budget() if policy is not None else ReleaseBudget()
    release = SetRelease.of(ps, seed=seed, where=f"{cfg.centre_id} set {label}")
    if policy is None or not policy.slide_ids:  # real slide ids / source indices stay home
        from histodd_fed.federation.pseudonyms import pseudonymise

        ps = pseudonymise(ps)
    with ReleaseLedger.in_key_dir(cfg.key_dir).claim(release, recipients, budget,
                                                     who=f"{cfg.centre_id}: {label}") as claim:
        claim.bundle_id = os.urandom(16).hex()
        return seal(ps, ident, keys, privacy_report=privacy_report, release=claim.manifest(),
                    bundle_id=claim.bundle_id,
                    extra_manifest={"transfer": label,
                                    "accepted_privacy_risk": bool((privacy_report or {}).get("accepted_risk")),
                                    **(extra or {})})


def open_received_bundle(cfg: CentreConfig, data: bytes):
    """Verify and open a bundle addressed to this centre (replay-checked by its ledger): OpenedBundle."""
    from histodd_fed.bundle import open_bundle
    from histodd_fed.bundle.ledger import Ledger
    from histodd_fed.bundle.trust import TrustStore

    ident = load_or_create_identity(cfg)
    return open_bundle(data, ident, TrustStore.load(cfg.key_dir), Ledger.in_key_dir(cfg.key_dir))


def open_received(cfg: CentreConfig, data: bytes) -> PatchSet:
    """Verify and open a bundle addressed to this centre (replay-checked by its ledger)."""
    return open_received_bundle(cfg, data).patchset


def provenance(opened) -> dict[str, Any]:
    """What a target knows of a received bundle from its opened, verified manifest (not the relay)."""
    m = opened.manifest
    extra = m.get("extra") or {}
    return {"source": opened.header.source_centre, "sign_key_id": opened.header.sign_key_id,
            "bundle_id": opened.header.bundle_id, "transfer": str(extra.get("transfer", "")),
            "kind": m.get("kind"), "ipc": extra.get("ipc", m.get("ipc")), "num_images": m.get("num_images"),
            "row": extra.get("row"), "part": extra.get("part"), "train_total": extra.get("train_total"),
            "m_per_slide": extra.get("m_per_slide"), "export_policy": extra.get("export_policy")}


def recheck_senders(cfg: CentreConfig, blobs: list[bytes]) -> None:
    """Re-verify bundles against the CURRENT trust store (a revoked sender's cached rows are refused)."""
    from histodd_fed.bundle import verify
    from histodd_fed.bundle.trust import TrustStore

    trust = TrustStore.load(cfg.key_dir)
    for b in blobs:
        verify(b, trust)
