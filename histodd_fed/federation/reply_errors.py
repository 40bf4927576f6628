"""What a centre tells the coordinator when a request fails: a code and a fixed message, nothing else.

An exception's text can hold anything the centre read (a folder named after a patient, a slide id
holding a record number, a path tail), so it never leaves the centre: the reply carries the
exception's class name as ``error_code``, a fixed message for that kind of failure and a random
``error_ref``; the full text is logged on the centre under that ref for its operator.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

log = logging.getLogger("histodd_fed.federation.centre")

#: fixed messages by the failure's kind (the first class in the exception's MRO that is listed)
FIXED_MESSAGES: dict[str, str] = {
    "PolicyError": "refused by this centre's export policy",
    "ReleaseBudgetError": "refused by this centre's release budget",
    "ProtocolError": "malformed or inconsistent request",
    "KeyFileError": "this centre cannot use its keys",
    "ReplayError": "bundle already opened (replay refused)",
    "UntrustedSignerError": "bundle signer not trusted by this centre",
    "BundleError": "bundle failed verification or opening",
    "ConfigError": "this centre's configuration is invalid",
    "NoPatchSetError": "row has no patch-level set to fine-tune on (its source's patch set was blocked by the "
                       "export gate, over budget or not sent: see that source's faults); its per-slide set alone "
                       "is not used",
    "InputError": "this centre could not read its data",
    "HistoddError": "request refused",
    "Exception": "internal error",
}
#: fixed messages of a policy refusal, by the rule that refused (``PolicyError.rule``)
POLICY_RULES: dict[str, str] = {
    "recipient": "export policy refuses a requested recipient (export-recipients / trust store)",
    "ipc": "export policy refuses a requested ipc (export-max-ipc)",
    "real": "export policy refuses real patches (export-real is off)",
    "seed": "export policy refuses the requested seed (the centre picks its seeds: export-seeds)",
    "override": "export policy refuses a request override (outside the centre's limits)",
}


def _kind(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in FIXED_MESSAGES:
            return cls.__name__
    return "Exception"


def error_fields(exc: BaseException, centre_id: str, what: str) -> dict[str, Any]:
    """``error_code``, ``error`` (``CODE: fixed message (ref R)``), ``error_ref``; logs the detail under R."""
    code = type(exc).__name__ if _kind(exc) != "Exception" else "InternalError"
    message = FIXED_MESSAGES[_kind(exc)]
    rule = getattr(exc, "rule", None)
    if code == "PolicyError" and rule in POLICY_RULES:
        message = POLICY_RULES[rule]
    ref = secrets.token_hex(4)
    log.warning("%s: %s failed [%s ref %s]: %s", centre_id, what, code, ref, exc)
    return {"error_code": code, "error": f"{code}: {message} (details in the centre's log, ref {ref})",
            "error_ref": ref}
