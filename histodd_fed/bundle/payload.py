"""PatchSet <-> payload bytes: one safetensors part (tensors) and one JSON part (slides).

Part ``tensors`` is a standard safetensors file holding ``images`` uint8 (N,H,W,3), ``labels``
int64 (N,), ``slide_index`` int32 (N,) and, when present, ``coords`` int64 (N,2), little-endian,
in that order. It is written here piece by piece (8-byte little-endian header length, JSON header
padded with spaces to a multiple of 8, raw tensor bytes) so a large or memory-mapped patch set is
streamed, never copied whole. Part ``slides`` is canonical JSON ``{"slide_ids": [...],
"slide_labels": {...}}``. Nothing is pickled.

Reading (:func:`decode_payload`) works on the decrypted payload held in memory: the safetensors
header is parsed here, strictly (exactly the expected tensor names and dtypes, shapes that match
their byte spans, spans contiguous from 0 to the end of the part, no duplicate keys, no
``__metadata__``), and ``images`` is returned as a view into the payload buffer, not a copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from histodd_fed.bundle.bounded_json import loads_bounded
from histodd_fed.bundle.errors import SemanticError
from histodd_fed.bundle.format import canonical_json
from histodd_fed.patchset import KINDS, PatchSet

_DTYPES = {"images": ("U8", np.dtype("u1")), "labels": ("I64", np.dtype("<i8")),
           "slide_index": ("I32", np.dtype("<i4")), "coords": ("I64", np.dtype("<i8"))}
_NDIM = {"images": 4, "labels": 1, "slide_index": 1, "coords": 2}
_REQUIRED = ("images", "labels", "slide_index")
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
MAX_TENSORS_HEADER = 1 << 20  # a valid header for four tensors is a few hundred bytes


@dataclass
class PayloadPart:
    """One named part of the payload: its size and a way to stream its bytes.

    ``pieces()`` yields the part as a few large contiguous byte views (the safetensors header,
    then each array whole), so a chunker can slice them without copying.
    """

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


def _byte_view(a: np.ndarray) -> memoryview:
    """A flat unsigned-byte view of a C-contiguous array (no copy)."""
    return memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")


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
            yield _byte_view(a)

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


# ---------------------------------------------------------------------- reading
def _nonneg_int(v: object) -> bool:
    return type(v) is int and v >= 0


def parse_tensors(buf: memoryview, where: str) -> dict[str, np.ndarray]:
    """Parse the ``tensors`` part (a safetensors file in memory) strictly; arrays are views of ``buf``.

    Raises :class:`SemanticError` for anything but exactly ``images``, ``labels``,
    ``slide_index`` and optionally ``coords`` with their version-1 dtypes, shapes consistent with
    their byte spans, and spans that tile the data area contiguously.
    """
    if buf.nbytes < 8:
        raise SemanticError(f"{where}: tensors part of {buf.nbytes} bytes is too short for a safetensors header")
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    if hlen > buf.nbytes - 8 or hlen > MAX_TENSORS_HEADER:
        raise SemanticError(f"{where}: tensors header length {hlen} does not fit the {buf.nbytes}-byte part")
    header = loads_bounded(buf[8:8 + hlen], f"{where}: tensors header", SemanticError)
    if not isinstance(header, dict):
        raise SemanticError(f"{where}: tensors header is not a JSON object")
    names = set(header)
    if not set(_REQUIRED) <= names or not names <= set(_DTYPES):
        raise SemanticError(f"{where}: tensors {sorted(names)} are not {sorted(_REQUIRED)} (+ coords)")
    data = buf[8 + hlen:]
    spans = []
    for name, ent in header.items():
        if not isinstance(ent, dict) or set(ent) != _ENTRY_KEYS:
            raise SemanticError(f"{where}: tensor {name} entry must hold exactly {sorted(_ENTRY_KEYS)}")
        code, dtype = _DTYPES[name]
        if ent["dtype"] != code:
            raise SemanticError(f"{where}: tensor {name} has dtype {ent['dtype']!r}, expected {code!r}")
        shape, offs = ent["shape"], ent["data_offsets"]
        if not isinstance(shape, list) or len(shape) != _NDIM[name] or not all(_nonneg_int(s) for s in shape):
            raise SemanticError(f"{where}: tensor {name} shape {shape!r} is not {_NDIM[name]} non-negative ints")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_nonneg_int(o) for o in offs)
                or offs[0] > offs[1] or offs[1] > data.nbytes):
            raise SemanticError(f"{where}: tensor {name} data_offsets {offs!r} outside 0..{data.nbytes}")
        if offs[1] - offs[0] != math.prod(shape) * dtype.itemsize:
            raise SemanticError(f"{where}: tensor {name} spans {offs[1] - offs[0]} bytes, shape {shape} needs "
                                f"{math.prod(shape) * dtype.itemsize}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for a, b, name in spans:
        if a != pos:
            raise SemanticError(f"{where}: tensor {name} starts at {a}, expected {pos} (overlap or gap)")
        pos = b
    if pos != data.nbytes:
        raise SemanticError(f"{where}: tensors cover {pos} of {data.nbytes} data bytes")
    out = {}
    for a, b, name in spans:
        dtype = _DTYPES[name][1]
        shape = header[name]["shape"]
        out[name] = np.frombuffer(data, dtype=dtype, count=(b - a) // dtype.itemsize, offset=a).reshape(shape)
    return out


def decode_payload(payload: memoryview, manifest: dict, where: str) -> PatchSet:
    """Rebuild a PatchSet from the decrypted, hash-checked payload; every mismatch is a SemanticError.

    ``manifest["payload_parts"]`` (already checked: [tensors, slides], contiguous from 0) says
    where the parts lie. ``images`` stays a view into ``payload``; the small arrays are copied.
    """
    tpart, spart = manifest["payload_parts"]
    t_end = tpart["size"]
    arrays = parse_tensors(payload[:t_end], where)
    im = arrays["images"]
    lab = arrays["labels"].copy()  # small; a copy is aligned and owns its memory
    si = arrays["slide_index"].copy()
    coords = arrays["coords"].copy() if "coords" in arrays else None
    if im.shape[-1] != 3:
        raise SemanticError(f"{where}: images have shape {im.shape}, expected (N,H,W,3)")
    n = im.shape[0]
    if lab.shape != (n,) or si.shape != (n,):
        raise SemanticError(f"{where}: labels {lab.shape} / slide_index {si.shape} do not match {n} images")
    if coords is not None and coords.shape != (n, 2):
        raise SemanticError(f"{where}: coords shape {coords.shape} is not ({n}, 2)")
    slides = loads_bounded(payload[t_end:t_end + spart["size"]], f"{where}: slides part", SemanticError)
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
                        slide_labels={k: int(v) for k, v in slabels.items()}, coords=coords,
                        kind=manifest["kind"], meta=manifest["distillation_config"])
    except Exception as exc:  # PatchSet.validate raises InputError; anything else is also semantic
        raise SemanticError(f"{where}: payload is not a valid patch set ({exc})") from exc
