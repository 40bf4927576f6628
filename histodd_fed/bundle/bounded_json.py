"""JSON from a bundle, bounded: depth, value count, duplicate keys, non-finite numbers.

Everything a bundle carries as JSON (header, manifest, the tensors part's header, the slides
part) is parsed here. A structure nested deeper than :data:`MAX_DEPTH` containers, or holding
more than :data:`MAX_NODES` values, is refused with the caller's typed error (one line) instead
of reaching a recursive walk later (config hash, receipt and patch-set writers), where a few
hundred levels raise a raw ``RecursionError``. The checks themselves are iterative.
"""

from __future__ import annotations

import json

MAX_DEPTH = 32          # containers inside one another (the top-level object counts as 1)
MAX_NODES = 1 << 20     # values in all (containers, keys' values, list items, scalars)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"non-finite number {name}")


def check_bounds(obj: object, where: str, error: type[Exception], *, max_depth: int = MAX_DEPTH,
                 max_nodes: int = MAX_NODES) -> None:
    """Raise ``error`` if ``obj`` nests deeper than ``max_depth`` containers or holds more than
    ``max_nodes`` values (an iterative walk: safe on any depth)."""
    stack: list[tuple[object, int]] = [(obj, 0)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise error(f"{where}: holds more than {max_nodes} values")
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if depth + 1 > max_depth:
            raise error(f"{where}: nested deeper than {max_depth} levels")
        stack.extend((c, depth + 1) for c in children)


def loads_bounded(raw: bytes | str, where: str, error: type[Exception], *, max_depth: int = MAX_DEPTH,
                  max_nodes: int = MAX_NODES) -> object:
    """Parse ``raw`` (UTF-8 JSON) strictly and within bounds; any failure is ``error`` naming ``where``."""
    try:
        text = bytes(raw).decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise error(f"{where}: duplicate key {ascii(str(exc))[:80]}") from None
    except RecursionError:  # the C parser's own guard, far beyond max_depth
        raise error(f"{where}: nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{where}: not valid JSON ({ascii(str(exc))[:120]})") from None
    check_bounds(obj, where, error, max_depth=max_depth, max_nodes=max_nodes)
    return obj
