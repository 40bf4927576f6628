"""PatchSet <-> payload bytes: one safetensors part (tensors) and one JSON part (slides).

Part ``tensors`` is a standard safetensors file holding ``images`` uint8 (N,H,W,3), ``labels``
int64 (N,), ``slide_index`` int32 (N,) and, when present, ``coords`` int64 (N,2), little-endian,
in that order. It is written here piece by piece (8-byte little-endian header length, JSON header
padded with spaces to a multiple of 8, raw tensor bytes) so a large or memory-mapped patch set is
streamed, never copied whole; it is read back with the ``safetensors`` library. Part ``slides``
is canonical JSON ``{"slide_ids": [...], "slide_labels": {...}}``. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from histodd_fed.bundle.errors import SemanticError
from histodd_fed.bundle.format import canonical_json
from histodd_fed.patchset import KINDS, PatchSet

PIECE = 1 << 20
_DTYPES = {"images": ("U8", np.dtype("u1")), "labels": ("I64", np.dtype("<i8")),
           "slide_index": ("I32", np.dtype("<i4")), "coords": ("I64", np.dtype("<i8"))}
MAX_SLIDES_JSON = 64 * 1024 * 1024


@dataclass
class PayloadPart:
    """One named part of the payload: its size and a way to stream its bytes."""

    name: str
    format: str
    size: int
    pieces: Callable[[], Iterator[memoryview]]
    sha256: str = ""


def _arrays(ps: PatchSet) -> list[tuple[str, np.ndarray]]:
    out = [("images", np.ascontiguousarray(ps.images)),
           ("labels", np.ascontiguousarray(ps.labels, dtype="<i8")),
           ("slide_index", np.ascontiguousarray(ps.slide_index, dtype="<i4"))]
    if ps.coords is not None:
        out.append(("coords", np.ascontiguousarray(np.asarray(ps.coords), dtype="<i8")))
    return out


def _tensor_part(ps: PatchSet) -> PayloadPart:
    arrays = _arrays(ps)
    header: dict = {}
    off = 0
    for name, a in arrays:
        header[name] = {"dtype": _DTYPES[name][0], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)
    head = struct.pack("<Q", len(hjson)) + hjson

    def pieces() -> Iterator[memoryview]:
        yield memoryview(head)
        for _, a in arrays:
            mv = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
            for i in range(0, mv.nbytes, PIECE):
                yield mv[i:i + PIECE]

    return PayloadPart("tensors", "safetensors", len(head) + off, pieces)


def _slides_part(ps: PatchSet) -> PayloadPart:
    blob = canonical_json({"slide_ids": list(ps.slide_ids),
                           "slide_labels": {str(k): int(v) for k, v in ps.slide_labels.items()}})
    return PayloadPart("slides", "json", len(blob), lambda: iter([memoryview(blob)]))


def payload_parts(ps: PatchSet) -> list[PayloadPart]:
    """The parts of ``ps``'s payload, each with its SHA-256 (one streaming pass)."""
    parts = [_tensor_part(ps), _slides_part(ps)]
    for p in parts:
        h = hashlib.sha256()
        for piece in p.pieces():
            h.update(piece)
        p.sha256 = h.hexdigest()
    return parts


def read_payload(tensors_file: Path, slides_file: Path, manifest: dict, where: str) -> PatchSet:
    """Rebuild a PatchSet from the decrypted, hash-checked parts; every mismatch is a SemanticError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(tensors_file), framework="numpy") as f:
            names = set(f.keys())
            need = {"images", "labels", "slide_index"}
            if not need <= names or not names <= need | {"coords"}:
                raise SemanticError(f"{where}: tensors {sorted(names)} are not {sorted(need)} (+ coords)")
            arrays = {k: f.get_tensor(k) for k in sorted(names)}
    except SafetensorError as exc:
        raise SemanticError(f"{where}: tensors part is not a valid safetensors file ({exc})") from exc
    except (ValueError, TypeError, OSError) as exc:
        raise SemanticError(f"{where}: tensors part unreadable ({exc})") from exc
    for k, a in arrays.items():
        if a.dtype != _DTYPES[k][1]:
            raise SemanticError(f"{where}: tensor {k} has dtype {a.dtype}, expected {_DTYPES[k][1]}")
    im, lab, si = arrays["images"], arrays["labels"], arrays["slide_index"]
    if im.ndim != 4 or im.shape[-1] != 3:
        raise SemanticError(f"{where}: images have shape {im.shape}, expected (N,H,W,3)")
    n = im.shape[0]
    if lab.shape != (n,) or si.shape != (n,):
        raise SemanticError(f"{where}: labels {lab.shape} / slide_index {si.shape} do not match {n} images")
    if "coords" in arrays and arrays["coords"].shape != (n, 2):
        raise SemanticError(f"{where}: coords shape {arrays['coords'].shape} is not ({n}, 2)")
    try:
        slides = json.loads(slides_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SemanticError(f"{where}: slides part is not valid JSON") from exc
    if not isinstance(slides, dict) or set(slides) != {"slide_ids", "slide_labels"}:
        raise SemanticError(f"{where}: slides part must hold exactly slide_ids and slide_labels")
    sids, slabels = slides["slide_ids"], slides["slide_labels"]
    if not isinstance(sids, list) or not all(isinstance(s, str) for s in sids) or len(set(sids)) != len(sids):
        raise SemanticError(f"{where}: slide_ids must be distinct strings")
    if not isinstance(slabels, dict) or not set(slabels) <= set(sids):
        raise SemanticError(f"{where}: slide_labels must map known slide ids to labels")

    classes = manifest["class_names"]
    ncls = len(classes)
    if not all(type(v) is int and 0 <= v < ncls for v in slabels.values()):
        raise SemanticError(f"{where}: a slide label is outside 0..{ncls - 1}")
    if n and (lab.min() < 0 or lab.max() >= ncls):
        raise SemanticError(f"{where}: labels range {lab.min()}..{lab.max()} outside 0..{ncls - 1}")
    if n and (si.min() < -1 or si.max() >= len(sids)):
        raise SemanticError(f"{where}: slide_index outside -1..{len(sids) - 1}")
    if manifest["num_images"] != n:
        raise SemanticError(f"{where}: manifest says {manifest['num_images']} images, payload has {n}")
    if list(manifest["image_shape"]) != list(im.shape[1:]):
        raise SemanticError(f"{where}: manifest image shape {manifest['image_shape']} != payload {list(im.shape[1:])}")
    counts = {c: int(k) for c, k in zip(classes, np.bincount(lab, minlength=ncls))}
    if counts != manifest["class_counts"]:
        raise SemanticError(f"{where}: class counts {counts} do not match the manifest {manifest['class_counts']}")
    if manifest["kind"] not in KINDS:
        raise SemanticError(f"{where}: kind {manifest['kind']!r} is not one of {KINDS}")
    try:
        return PatchSet(images=im, labels=lab, class_names=list(classes), slide_index=si, slide_ids=sids,
                        slide_labels={k: int(v) for k, v in slabels.items()}, coords=arrays.get("coords"),
                        kind=manifest["kind"], meta=manifest["distillation_config"])
    except Exception as exc:  # PatchSet.validate raises InputError; anything else is also semantic
        raise SemanticError(f"{where}: payload is not a valid patch set ({exc})") from exc
