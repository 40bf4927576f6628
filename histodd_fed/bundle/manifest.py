"""The manifest sealed inside every bundle: built from a patch set when sealing, with the sender's
local paths stripped first (:func:`build_manifest`, :func:`strip_local_paths`), and checked field by
field after opening, before anything in it is used (:func:`check_manifest`). No keys, no crypto."""

from __future__ import annotations

import os
import re

from histodd_fed import __version__
from histodd_fed.bundle.errors import FormatError, ManifestHashError, SemanticError
from histodd_fed.bundle.format import BundleHeader
from histodd_fed.bundle.identity import Identity
from histodd_fed.bundle.payload import PayloadPart
from histodd_fed.patchset import PatchSet
from histodd_fed.runconfig import config_hash

LOCAL_PATH = "<local path removed>"
_PATH_KEYS = {"synthetic_dir", "path", "paths", "dir", "out_dir", "root", "files", "cwd", "home"}
_ABS_PATH = re.compile(r"^(/|~|\\\\|[A-Za-z]:[\\/]|\.\.?/)")
MANIFEST_KEYS = {"format", "format_version", "bundle_id", "source_centre", "created", "kind", "class_names",
                 "class_counts", "num_images", "ipc", "mode", "image_shape", "distillation_config",
                 "distillation_config_sha256", "code_version", "payload_parts", "privacy_report", "extra"}
#: optional manifest fields: ``dp`` (the set's DP guarantee, from meta["dp"]) and ``release`` (per
#: recipient: the sender's release count and epsilon spent, histodd_fed.bundle.releases)
MANIFEST_OPTIONAL_KEYS = {"dp", "release"}
#: how many points of a set's per-step loss curve a sealed manifest keeps (:func:`sealed_meta`)
LOSS_CURVE_POINTS = 16


def _is_local_path(s: str) -> bool:
    if _ABS_PATH.match(s):
        return True
    if os.sep in s and len(s) < 4096:
        try:
            return os.path.exists(s)
        except (OSError, ValueError):
            return False
    return False


def strip_local_paths(obj: object) -> object:
    """A copy of ``obj`` (JSON-like) without the sender's local paths: keys that name paths are
    dropped, string values that are absolute paths (or relative paths that exist here) replaced."""
    if isinstance(obj, dict):
        return {k: strip_local_paths(v) for k, v in obj.items()
                if not (isinstance(k, str) and (k in _PATH_KEYS or k.endswith(("_dir", "_path", "_file"))))}
    if isinstance(obj, (list, tuple)):
        return [strip_local_paths(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return LOCAL_PATH
    if isinstance(obj, str) and _is_local_path(obj):
        return LOCAL_PATH
    return obj


def sealed_meta(meta: dict) -> dict:
    """The set's meta as it is sealed: without local paths, and with the per-step loss curve
    (``loss_curve``, one row per outer step: ~50 KB at 400 steps, most of an ipc-10 bundle) replaced by
    ``loss_curve_summary`` - its length, first / last / lowest mean loss and :data:`LOSS_CURVE_POINTS`
    evenly spaced (step, mean) points. The recipient needs none of it to use the set; the full curve and
    its plot stay with the sender (``loss_curve.png`` next to the set)."""
    out = strip_local_paths(dict(meta))
    curve = out.pop("loss_curve", None)
    if isinstance(curve, list) and curve:
        means = [r.get("mean") for r in curve if isinstance(r, dict) and isinstance(r.get("mean"), (int, float))]
        picks = sorted({round(i * (len(curve) - 1) / (LOSS_CURVE_POINTS - 1)) for i in range(LOSS_CURVE_POINTS)})
        out["loss_curve_summary"] = {
            "steps": len(curve),
            "first": means[0] if means else None, "last": means[-1] if means else None,
            "min": min(means) if means else None,
            "points": [[curve[i].get("step", i), curve[i].get("mean")] for i in picks if isinstance(curve[i], dict)],
        }
    return out


def build_manifest(ps: PatchSet, bundle_id: str, sender: Identity, created: str, parts: list[PayloadPart],
              privacy_report: dict | None, extra: dict | None, release: dict | None = None) -> dict:
    from histodd_fed.bundle.releases import dp_of
    from histodd_fed.errors import InputError

    counts = ps.class_counts()
    meta = sealed_meta(ps.meta)  # no local directory of the sender; the loss curve as a summary
    try:
        dp = dp_of(meta, f"seal bundle {bundle_id}")  # the set's DP guarantee, as sealed in the config
    except InputError as exc:
        raise FormatError(str(exc)) from exc
    privacy_report = strip_local_paths(privacy_report) if privacy_report is not None else None
    extra = strip_local_paths(extra) if extra else extra
    ipc = meta.get("ipc")
    if ipc is None and len(set(counts.values())) == 1:
        ipc = next(iter(counts.values()))
    mode = meta.get("mode") or ("per-slide" if len(ps) and int(ps.slide_index.max()) >= 0 else "patch-level")
    off = 0
    plist = []
    for p in parts:
        plist.append({"name": p.name, "format": p.format, "offset": off, "size": p.size, "sha256": p.sha256})
        off += p.size
    return {
        "format": "histodd-bundle-manifest", "format_version": 1,
        "bundle_id": bundle_id, "source_centre": sender.centre_id, "created": created,
        "kind": ps.kind, "class_names": list(ps.class_names), "class_counts": counts,
        "num_images": len(ps), "ipc": ipc, "mode": mode, "image_shape": list(ps.images.shape[1:]),
        "distillation_config": meta, "distillation_config_sha256": config_hash(meta),
        "code_version": __version__, "payload_parts": plist,
        "privacy_report": privacy_report, "extra": extra or {},
        **({"dp": dp} if dp is not None else {}), **({"release": release} if release else {}),
    }


def check_manifest(m: object, header: BundleHeader) -> dict:
    where = header.name
    if not isinstance(m, dict) or m.get("format") != "histodd-bundle-manifest" or m.get("format_version") != 1:
        raise SemanticError(f"{where}: manifest is not a version-1 histodd manifest")
    if not MANIFEST_KEYS <= set(m) <= MANIFEST_KEYS | MANIFEST_OPTIONAL_KEYS:
        raise SemanticError(f"{where}: manifest fields differ from version 1")
    _check_release_fields(m, where)
    if m["bundle_id"] != header.bundle_id or m["source_centre"] != header.source_centre:
        raise SemanticError(f"{where}: manifest names bundle {m['bundle_id']} from {m['source_centre']}, "
                            f"header says {header.bundle_id} from {header.source_centre}")
    cn = m["class_names"]
    if not isinstance(cn, list) or not cn or not all(isinstance(c, str) for c in cn) or len(set(cn)) != len(cn):
        raise SemanticError(f"{where}: manifest class_names must be distinct strings")
    if not isinstance(m["class_counts"], dict) or type(m["num_images"]) is not int:
        raise SemanticError(f"{where}: manifest class_counts / num_images malformed")
    if not isinstance(m["image_shape"], list) or not isinstance(m["distillation_config"], dict):
        raise SemanticError(f"{where}: manifest image_shape / distillation_config malformed")
    parts = m["payload_parts"]
    if (not isinstance(parts, list) or [p.get("name") if isinstance(p, dict) else None for p in parts]
            != ["tensors", "slides"]):
        raise SemanticError(f"{where}: manifest payload parts must be [tensors, slides]")
    off = 0
    for p in parts:
        if type(p.get("size")) is not int or p.get("offset") != off or p["size"] < 0 \
                or not isinstance(p.get("sha256"), str) or len(p["sha256"]) != 64:
            raise ManifestHashError(f"{where}: manifest part {p.get('name')} has a malformed offset/size/hash")
        off += p["size"]
    if off != header.fields["payload_size"]:
        raise ManifestHashError(f"{where}: manifest parts cover {off} bytes, payload has {header.fields['payload_size']}")
    return m


def _check_release_fields(m: dict, where: str) -> None:
    """The optional ``dp`` and ``release`` fields: well formed, and ``dp`` equal to the sealed config's."""
    import math

    if "dp" in m:
        dp = m["dp"]
        ok = isinstance(dp, dict) and set(dp) == {"epsilon", "delta", "accountant"}
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not ok or not num(dp["epsilon"]) or dp["epsilon"] < 0 or not num(dp["delta"]) \
                or not 0 <= dp["delta"] < 1 or not isinstance(dp["accountant"], str):
            raise SemanticError(f"{where}: manifest dp must be {{epsilon >= 0, delta in [0, 1), accountant}}")
        cfg_dp = m["distillation_config"].get("dp") if isinstance(m["distillation_config"], dict) else None
        if not isinstance(cfg_dp, dict) or any(cfg_dp.get(k) != dp[k] for k in dp):
            raise SemanticError(f"{where}: manifest dp differs from the sealed distillation config's dp")
    if "release" in m:
        rel = m["release"]
        if not isinstance(rel, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) and set(v) == {"count", "epsilon_total"}
                and type(v["count"]) is int and v["count"] >= 0
                and isinstance(v["epsilon_total"], (int, float)) and not isinstance(v["epsilon_total"], bool)
                for k, v in rel.items()):
            raise SemanticError(f"{where}: manifest release must map centres to {{count, epsilon_total}}")
