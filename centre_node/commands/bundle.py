"""`centre-node` commands for identities, trust and bundles.

``keygen``, ``rekey``, ``trust add|list|remove``, ``export``, ``inspect``, ``verify``, ``open``. Thin: each
parses options and calls :mod:`histodd_fed.bundle`; failures raise its typed errors, which
``centre_node.cli`` prints as one line (exit 2).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from histodd_fed.terminal import printable

trust_app = typer.Typer(name="trust", help="Manage the centres this node trusts (trust.json in the key dir).",
                        no_args_is_help=True)

#: read when no passphrase option is given (scripts that cannot use a prompt)
DEFAULT_PASSPHRASE_ENV = "HISTODD_KEY_PASSPHRASE"
PASSPHRASE_ENV_HELP = "Read the private-key passphrase from this environment variable."
PASSPHRASE_FD_HELP = "Read the private-key passphrase from this file descriptor (e.g. a pipe: 3<<<\"$PW\")."
#: the release budget's defaults (= histodd_fed.bundle.releases.DEFAULT_*; literal here so the CLI
#: starts without importing the bundle package)
DEFAULT_MAX_EPSILON, DEFAULT_MAX_EPSILON_TOTAL, DEFAULT_MAX_RELEASES = 8.0, 16.0, 10
SCRYPT_HELP = ("scrypt cost as log2(n) for new key files (default 17: ~0.3 s and 128 MiB per guess); "
               "recorded in the key file. Lower only for tests.")


def _source(env: Optional[str], fd: Optional[int], what: str = "the keys"):
    """The passphrase source the options name: env, fd, or (default) an interactive prompt that is
    only asked when a key is encrypted."""
    from histodd_fed.bundle.errors import KeyFileError

    if env and fd is not None:
        raise KeyFileError("give --passphrase-env or --passphrase-fd, not both")
    if env:
        return f"env:{env}"
    if fd is not None:
        return f"fd:{fd}"
    if os.environ.get(DEFAULT_PASSPHRASE_ENV):
        return f"env:{DEFAULT_PASSPHRASE_ENV}"
    return lambda: _prompt(f"Passphrase for {what}", what, confirm=False)


def _prompt(text: str, what: str, confirm: bool) -> str:
    """Ask on the terminal (not echoed); without one, a one-line error naming the options."""
    import click

    from histodd_fed.bundle.errors import KeyFileError

    err = KeyFileError(f"{what}: a passphrase is needed and there is no terminal to ask on; give "
                       "--passphrase-env NAME or --passphrase-fd N" + (" (or --no-passphrase)" if confirm else ""))
    if not sys.stdin.isatty() and not _stdin_is_test_input():
        raise err
    try:
        return typer.prompt(text, hide_input=True, confirmation_prompt=confirm)
    except click.exceptions.Abort:
        raise err from None


def _new_passphrase(env: Optional[str], fd: Optional[int], no_passphrase: bool, what: str) -> Optional[bytes]:
    """The passphrase for new key files: env, fd, or a prompt (with confirmation) on a terminal.

    ``--no-passphrase`` is the explicit way to write clear keys. Without any of these, the
    ``HISTODD_KEY_PASSPHRASE`` environment variable is used when set; otherwise, without a terminal
    (scripts, CI), the keys are written in the clear with a warning on stderr.
    """
    from histodd_fed.bundle.errors import KeyFileError
    from histodd_fed.bundle.identity import read_passphrase

    if no_passphrase:
        if env or fd is not None:
            raise KeyFileError("--no-passphrase contradicts a passphrase option")
        return None
    if env or fd is not None:
        return read_passphrase(_source(env, fd))
    if os.environ.get(DEFAULT_PASSPHRASE_ENV):
        return read_passphrase(f"env:{DEFAULT_PASSPHRASE_ENV}")
    if not sys.stdin.isatty():
        typer.echo(f"warning: {what} are NOT encrypted (no --passphrase-env/--passphrase-fd, no "
                   f"{DEFAULT_PASSPHRASE_ENV} and no terminal to ask on); encrypt them with `centre-node rekey`",
                   err=True)
        return None
    return read_passphrase(lambda: _prompt(f"New passphrase for {what}", what, confirm=True))


def _stdin_is_test_input() -> bool:
    """typer's CliRunner feeds ``input=`` through a non-tty stdin: allow the prompt there."""
    return type(sys.stdin).__module__.startswith("click.")


def keygen(
    centre_id: str = typer.Option(..., "--centre-id", help="This centre's id, e.g. C1."),
    out: Path = typer.Option(..., "--out", help="Key directory to create."),
    passphrase_env: Optional[str] = typer.Option(None, "--passphrase-env", help=PASSPHRASE_ENV_HELP),
    passphrase_fd: Optional[int] = typer.Option(None, "--passphrase-fd", help=PASSPHRASE_FD_HELP),
    no_passphrase: bool = typer.Option(False, "--no-passphrase", help="Store the private keys unencrypted."),
    scrypt_log2n: int = typer.Option(17, "--scrypt-log2n", help=SCRYPT_HELP),
) -> None:
    """Create this centre's signing (Ed25519) and encryption (X25519) keys and identity.json.

    The private keys are encrypted (scrypt + AES-256-GCM) with a passphrase from --passphrase-env,
    --passphrase-fd or a prompt; --no-passphrase stores them in the clear (mode 0600 either way).
    """
    from histodd_fed.bundle.identity import generate_identity

    pw = _new_passphrase(passphrase_env, passphrase_fd, no_passphrase, f"the new keys in {out}")
    ident = generate_identity(centre_id, out, passphrase=pw, scrypt_log2n=scrypt_log2n)
    typer.echo(printable(f"identity {ident.centre_id}: sign key {ident.public.sign_key_id}, "
                         f"kem key {ident.public.kem_key_id} ({'encrypted' if pw else 'NOT encrypted'}); "
                         f"share {out / 'identity.json'}"))


def rekey(
    keys: Path = typer.Option(..., "--keys", help="Key directory whose private keys to re-encrypt."),
    passphrase_env: Optional[str] = typer.Option(None, "--passphrase-env", help="Current passphrase: " + PASSPHRASE_ENV_HELP),
    passphrase_fd: Optional[int] = typer.Option(None, "--passphrase-fd", help="Current passphrase: " + PASSPHRASE_FD_HELP),
    new_passphrase_env: Optional[str] = typer.Option(None, "--new-passphrase-env", help="New passphrase from this variable."),
    new_passphrase_fd: Optional[int] = typer.Option(None, "--new-passphrase-fd", help="New passphrase from this fd."),
    no_passphrase: bool = typer.Option(False, "--no-passphrase", help="Store the keys unencrypted."),
    scrypt_log2n: int = typer.Option(17, "--scrypt-log2n", help=SCRYPT_HELP),
) -> None:
    """Re-encrypt this centre's private keys: change the passphrase, or migrate PBKDF2 key files to scrypt."""
    from histodd_fed.bundle.identity import rekey_identity

    src = _source(passphrase_env, passphrase_fd, f"the keys in {keys}")
    new = _new_passphrase(new_passphrase_env, new_passphrase_fd, no_passphrase, f"the keys in {keys}")
    ident = rekey_identity(keys, passphrase_source=src, new_passphrase=new, scrypt_log2n=scrypt_log2n)
    typer.echo(f"re-encrypted the keys of {ident.centre_id} in {keys} "
               f"({'scrypt n=2^' + str(scrypt_log2n) if new else 'NOT encrypted'})")


@trust_app.command("add")
def trust_add(
    identity: Path = typer.Argument(..., help="Another centre's identity.json or key directory."),
    keys: Path = typer.Option(..., "--keys", help="This node's key directory (holds trust.json)."),
    replace: bool = typer.Option(False, "--replace", help="Rotate: replace (and revoke) a different pinned key."),
) -> None:
    """Trust another centre's public keys (pinned by key id)."""
    from histodd_fed.bundle.identity import load_public_identity
    from histodd_fed.bundle.trust import TrustStore

    pub = load_public_identity(identity)
    store = TrustStore.load(keys)
    changed = store.add(pub, replace=replace)
    if changed:
        store.save()
    typer.echo(f"{'trusted' if changed else 'already trusted'}: {pub.centre_id} sign key {pub.sign_key_id}")


@trust_app.command("list")
def trust_list(
    keys: Path = typer.Option(..., "--keys", help="This node's key directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List trusted centres and revoked keys."""
    from histodd_fed.bundle.trust import TrustStore

    store = TrustStore.load(keys)
    rows = [{"centre": c, "sign_key_id": p.sign_key_id, "kem_key_id": p.kem_key_id, "added": store.added.get(c, "")}
            for c, p in sorted(store.centres.items())]
    if as_json:
        typer.echo(json.dumps({"trusted": rows, "revoked": store.revoked}, indent=2))
        return
    for r in rows:
        typer.echo(printable(f"trusted  {r['centre']:<16} sign {r['sign_key_id']}  kem {r['kem_key_id']}"))
    for r in store.revoked:
        typer.echo(printable(f"revoked  {r.get('centre_id', '?'):<16} sign {r['sign_key_id']}  ({r.get('reason', '')})"))
    if not rows and not store.revoked:
        typer.echo("trust store is empty")


@trust_app.command("remove")
def trust_remove(
    centre: str = typer.Argument(..., help="Centre id to stop trusting (its keys are revoked)."),
    keys: Path = typer.Option(..., "--keys", help="This node's key directory."),
) -> None:
    """Stop trusting a centre; its keys go on the revoked list."""
    from histodd_fed.bundle.trust import TrustStore

    store = TrustStore.load(keys)
    pub = store.remove(centre)
    store.save()
    typer.echo(f"revoked: {centre} sign key {pub.sign_key_id}")


ledger_app = typer.Typer(name="ledger", help="The replay ledger (ledger.json in the key dir).", no_args_is_help=True)


@ledger_app.command("reset")
def ledger_reset(
    keys: Path = typer.Option(..., "--keys", help="This centre's key directory."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in KEYDIR/ledger-resets.log and the log)."),
    passphrase_env: Optional[str] = typer.Option(None, "--passphrase-env", help=PASSPHRASE_ENV_HELP),
    passphrase_fd: Optional[int] = typer.Option(None, "--passphrase-fd", help=PASSPHRASE_FD_HELP),
) -> None:
    """After a real loss of the replay ledger: start a new, empty one (needs the unlocked keys).

    Every bundle created before the reset is refused from then on (its earlier opening may have been
    lost with the old ledger); the old file, if any, is kept as ledger.json.before-reset-TIME, and a
    line goes to KEYDIR/ledger-resets.log.
    """
    from histodd_fed.bundle import Ledger, load_identity

    ident = load_identity(keys, passphrase_source=_source(passphrase_env, passphrase_fd, f"the keys in {keys}"))
    rec = Ledger.in_key_dir(keys).bound(ident).reset(reason)
    typer.echo(printable(f"replay ledger {rec['ledger']} reset ({rec['reason']}; previous: {rec['previous']}); "
                          f"bundles created before {rec['time']} are refused; logged in {Path(keys) / 'ledger-resets.log'}"))


def _privacy_gate(ps, synthetic: Path, accept_risk: bool, patches: Optional[Path],
                  holdout: Optional[Path]) -> dict:
    """Run the export gate (:func:`histodd_fed.privacy.gate.check_export`) with an audit required.

    ``patches`` (the centre's real patches) become the gate's ``real_dir`` and ``holdout`` its
    held-out set. With no reference (``--patches`` or the privacy config's ``real_patches``; a path in
    the set's meta is never used) the gate refuses, ``accept_risk`` or not; a fired rule refuses unless
    ``accept_risk``. The returned decision summary is sealed into the manifest;
    for a DP set (meta "dp") only the verdict, not the audit's statistics of the real patches (the
    accounting does not cover them).
    """
    from histodd_fed.errors import InputError
    from histodd_fed.patchset import PatchSet, load_image_folder
    from histodd_fed.privacy.gate import check_export

    for opt, path in (("--patches", patches), ("--holdout", holdout)):
        if path is not None and not path.is_dir():
            raise InputError(f"{opt} {path}: not a patch-set directory or image folder")
    hold = None
    if holdout is not None:
        hold = PatchSet.load(holdout) if (holdout / "patchset.json").exists() else load_image_folder(holdout)
    decision = check_export(synthetic=ps, synthetic_dir=synthetic, accept_risk=accept_risk, real_dir=patches,
                            holdout=hold, require_audit=True)
    typer.echo(decision.message())
    report = decision.to_dict()
    if ps.meta.get("dp"):
        report = {"gate": report["gate"], "accepted_risk": report["accepted_risk"],
                  "note": "DP set: the audit's statistics of the real patches stay at the centre (not covered by "
                          "the DP accounting); the verdict is a 1-bit function of them"}
    return report


def export(
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic patch-set directory to send."),
    to: str = typer.Option(..., "--to", help="Recipient centre id(s), comma-separated, from the trust store."),
    keys: Path = typer.Option(..., "--keys", help="This centre's key directory."),
    out: Path = typer.Option(..., "--out", help="Bundle file to write."),
    patches: Optional[Path] = typer.Option(None, "--patches",
                                           help="This centre's real patches (patch set or CLASS/*.jpg folder) "
                                                "the privacy gate audits the set against, as they sit on "
                                                "disk (raw: the set's recorded view is applied)."),
    holdout: Optional[Path] = typer.Option(None, "--holdout",
                                           help="Held-out real patches (enables the gate's membership attack)."),
    accept_privacy_risk: bool = typer.Option(False, "--accept-privacy-risk",
                                             help="Export even if a privacy gate rule fires; recorded in the "
                                                  "manifest. A missing reference (no --patches) is refused regardless."),
    passphrase_env: Optional[str] = typer.Option(None, "--passphrase-env", help=PASSPHRASE_ENV_HELP),
    passphrase_fd: Optional[int] = typer.Option(None, "--passphrase-fd", help=PASSPHRASE_FD_HELP),
    chunk_size: int = typer.Option(1 << 20, "--chunk-size", help="Plaintext bytes per encrypted chunk."),
    max_epsilon: float = typer.Option(DEFAULT_MAX_EPSILON, "--max-epsilon",
                                      help="Release budget: refuse a DP set (meta dp) whose epsilon is above this."),
    max_epsilon_total: float = typer.Option(DEFAULT_MAX_EPSILON_TOTAL, "--max-epsilon-total",
                                            help="Release budget: refuse when the epsilons of all DP sets released "
                                                 "to a recipient would sum above this (basic composition)."),
    max_releases: int = typer.Option(DEFAULT_MAX_RELEASES, "--max-releases",
                                     help="Release budget: distinct sets (DP or not) a recipient may receive; "
                                          "re-sending the identical set is not a new release."),
) -> None:
    """Seal a synthetic patch set for the given centres (encrypted for them, signed by this centre).

    The privacy gate audits the set against real patches first and blocks risky or unaudited
    exports unless ``--accept-privacy-risk``. It applies the set's recorded preprocessing
    (meta "view", e.g. the centre 32 px of 96-px patches) to the --patches as they sit on disk, and
    also audits the other plausible view (resize only / centre crop); the worst view decides. No
    --preset is needed: the view comes from the set.

    Every export is recorded per recipient in the key dir's release ledger (releases.json); the
    release budget (--max-epsilon, --max-epsilon-total, --max-releases) is checked before the gate
    and again, under the ledger lock, just before sealing. A refused export writes nothing.
    """
    from histodd_fed.bundle import inspect as bundle_inspect
    from histodd_fed.bundle import load_identity, seal
    from histodd_fed.bundle.releases import ReleaseBudget, ReleaseLedger, SetRelease
    from histodd_fed.bundle.trust import TrustStore
    from histodd_fed.patchset import PatchSet

    budget = ReleaseBudget(max_epsilon=max_epsilon, max_epsilon_total=max_epsilon_total, max_releases=max_releases)
    ps = PatchSet.load(synthetic)
    sender = load_identity(keys, passphrase_source=_source(passphrase_env, passphrase_fd, f"the keys in {keys}"))
    store = TrustStore.load(keys)
    names = [c.strip() for c in to.split(",") if c.strip()]
    recipients = store.recipients(names)
    release = SetRelease.of(ps, where=str(synthetic))
    ledger = ReleaseLedger.in_key_dir(keys)
    ledger.check(release, names, budget, who=f"export to {', '.join(names)}")  # before the (slow) gate
    report = _privacy_gate(ps, synthetic, accept_privacy_risk, patches, holdout)
    with ledger.claim(release, names, budget, who=f"export to {', '.join(names)}") as claim:
        claim.bundle_id = os.urandom(16).hex()
        path = seal(ps, sender, recipients, out=out, privacy_report=report,
                    extra_manifest={"accepted_privacy_risk": accept_privacy_risk},  # no local paths leave
                    chunk_size=chunk_size, release=claim.manifest(), bundle_id=claim.bundle_id)
    h = bundle_inspect(path)
    typer.echo(printable(f"sealed {len(ps)} patches for {', '.join(names)}: {path} "
                         f"(bundle {h.bundle_id}, {h.file_size} bytes)"))
    typer.echo("release: " + _release_line(release.dp, claim.manifest(), budget.summary(),
                                             {r: v["new"] for r, v in claim.recipients.items()}))


def _release_line(dp: Optional[dict], counts: dict, budget: Optional[dict] = None,
                  new: Optional[dict] = None) -> str:
    """One line: the set's DP guarantee (or "no formal bound") and each recipient's release count."""
    parts = [f"dp epsilon {dp['epsilon']:g} delta {dp['delta']:g} ({dp['accountant']})" if dp
             else "not DP (no formal privacy bound)"]
    for r, v in counts.items():
        s = f"{r}: release {v['count']}"
        if budget:
            s += f" of max {budget['max_releases']}, epsilon {v['epsilon_total']:g} of {budget['max_epsilon_total']:g}"
        else:
            s += f", epsilon total {v['epsilon_total']:g}"
        if new is not None and not new.get(r, True):
            s += " (same set as before: not a new release)"
        parts.append(s)
    return "; ".join(parts)


def set_summary(folder: Path) -> dict:
    """What ``inspect`` shows of a patch-set directory: kind, method, size, view, steps, drift summary,
    the export gate's verdict (``gate.json``) and whether a local per-image drift record is there."""
    from histodd_fed.patchset import PatchSet

    ps = PatchSet.load(folder)
    m = ps.meta
    out = {"set": str(folder), "kind": ps.kind, "method": m.get("method") or m.get("study_method") or "-",
           "images": len(ps), "class_counts": ps.class_counts(), "image_size": ps.image_size}
    if m.get("config"):
        c = m["config"]
        out["recipe"] = (f"{c.get('objective', 'gradient')} on {c.get('model')} {c.get('model_kwargs') or ''}, "
                         f"ipc {c.get('ipc')}, K {c.get('outer_steps')} x U {c.get('inner_steps')}, init {c.get('init')}")
    if "steps_done" in m:
        out["steps"] = f"{m['steps_done']}/{m.get('steps_total')}" + ("" if m.get("complete", True) else " (incomplete)")
    if m.get("view"):
        out["view"] = m["view"]
    d = m.get("drift")
    if d and d.get("steps"):
        out["drift"] = {"steps": d["steps"], **{k: d[k] for k in ("rms_mean", "ssim_mean", "structure_mean") if k in d}}
        out["drift_last"] = (f"after {d['steps'][-1]} outer steps, mean over {d.get('n_images')} images: RMS "
                             f"{d['rms_mean'][-1]:.4f}, SSIM {d['ssim_mean'][-1]:.3f}, structure "
                             f"{d['structure_mean'][-1]:.3f} (to each image's start)")
    gate = folder / "gate.json"
    if gate.is_file():
        try:
            g = json.loads(gate.read_text())
            out["gate"] = "passes" if g.get("passed") else f"BLOCKED - {(g.get('reasons') or ['?'])[0]}"
        except (OSError, ValueError):
            out["gate"] = "gate.json unreadable"
    if (folder / "drift.json").is_file():
        out["drift_local"] = "drift.json: per-image drift (and to real source patches) - local only, never exported"
    return out


def inspect(
    file: Path = typer.Argument(..., help="Bundle file, or a patch-set directory (shows its method and drift)."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="Key dir whose trust store checks the signer."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a bundle's public header and signature status, without decrypting; or a patch set's summary
    (kind, method, recipe, drift from the start, the export gate's verdict)."""
    if file.is_dir():
        summary = printable(set_summary(file))
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        for k, v in summary.items():
            if k == "drift":
                continue
            typer.echo(f"{k:>15}: {json.dumps(v) if isinstance(v, dict) else v}")
        return
    from histodd_fed.bundle import BundleError, inspect as bundle_inspect, verify
    from histodd_fed.bundle.trust import TrustStore

    header = bundle_inspect(file)
    if keys is None:
        status = {"checked": False, "status": "not checked (no --keys: no trust store)"}
    else:
        try:
            verify(file, TrustStore.load(keys))
            status = {"checked": True, "valid": True,
                      "status": f"valid; signer {header.source_centre} is trusted"}
        except BundleError as exc:
            status = {"checked": True, "valid": False, "error": type(exc).__name__, "status": str(exc)}
    summary = {**header.summary(), "signature": status}
    if keys is not None:  # a bundle this centre sealed: its release ledger says what it released
        from histodd_fed.bundle.releases import ReleaseLedger

        sealed = ReleaseLedger.in_key_dir(keys).find_bundle(header.bundle_id)
        if sealed:
            summary["dp"] = next(iter(sealed.values()))["entry"].get("dp")
            summary["release"] = {r: {"count": v["count"], "epsilon_total": v["epsilon_total"]}
                                  for r, v in sealed.items()}
    summary = printable(summary)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for k, v in summary.items():
        if k == "recipients":
            v = ", ".join(f"{r['centre']} ({r['kem_key_id']})" for r in v)
        elif k == "signature":
            v = v["status"] if "error" not in v else f"{v['error']}: {v['status']}"
        elif k == "dp":
            v = "not DP (no formal privacy bound)" if v is None else \
                f"epsilon {v['epsilon']:g} delta {v['delta']:g} ({v['accountant']})"
        elif k == "release":
            v = "; ".join(f"{r}: release {e['count']}, epsilon total {e['epsilon_total']:g} (sealed here)"
                          for r, e in v.items())
        elif isinstance(v, dict):
            v = json.dumps(v)
        typer.echo(f"{k:>15}: {v}")


def verify_cmd(
    file: Path = typer.Argument(..., help="Bundle file."),
    keys: Path = typer.Option(..., "--keys", help="Key dir (or trust dir) holding trust.json."),
) -> None:
    """Check format, sizes, signer trust and signature (no private key needed, nothing decrypted)."""
    from histodd_fed.bundle import verify
    from histodd_fed.bundle.trust import TrustStore

    h = verify(file, TrustStore.load(keys))
    typer.echo(printable(f"OK: bundle {h.bundle_id} signed by trusted {h.source_centre} "
                         f"(key {h.sign_key_id}) for {', '.join(h.recipient_centres)}"))


def open_cmd(
    file: Path = typer.Argument(..., help="Bundle file."),
    keys: Path = typer.Option(..., "--keys", help="This centre's key directory."),
    out: Path = typer.Option(..., "--out", help="New directory for the opened patch set."),
    passphrase_env: Optional[str] = typer.Option(None, "--passphrase-env", help=PASSPHRASE_ENV_HELP),
    passphrase_fd: Optional[int] = typer.Option(None, "--passphrase-fd", help=PASSPHRASE_FD_HELP),
    max_age_days: float = typer.Option(30.0, "--max-age-days",
                                       help="Freshness window: refuse bundles created longer ago than this."),
) -> None:
    """Verify, decrypt and check a bundle addressed to this centre; write its patch set.

    Refuses a replay (ledger.json in the key dir, keyed by signer key and bundle id), a bundle
    older than --max-age-days, and runs at all only while an initialised ledger is present.
    """
    from histodd_fed.bundle import Ledger, Limits, load_identity, open_bundle
    from histodd_fed.bundle.trust import TrustStore

    ident = load_identity(keys, passphrase_source=_source(passphrase_env, passphrase_fd, f"the keys in {keys}"))
    limits = Limits(max_age_seconds=int(max_age_days * 86400))
    opened = open_bundle(file, ident, TrustStore.load(keys), Ledger.in_key_dir(keys), out_dir=out, limits=limits)
    ps = opened.patchset
    typer.echo(printable(f"opened bundle {opened.header.bundle_id} from {opened.header.source_centre}: "
                         f"{len(ps)} patches {ps.class_counts()} -> {out}"))
    m = opened.manifest
    if "dp" in m or "release" in m:
        typer.echo("release (as the sender states it): " + printable(_release_line(m.get("dp"), {r: v for r, v in (m.get("release") or {}).items()
                                                 if r == ident.centre_id})))


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("keygen")(keygen)
    app.command("rekey")(rekey)
    app.add_typer(trust_app, name="trust")
    app.add_typer(ledger_app, name="ledger")
    app.command("export")(export)
    app.command("inspect")(inspect)
    app.command("verify")(verify_cmd)
    app.command("open")(open_cmd)
