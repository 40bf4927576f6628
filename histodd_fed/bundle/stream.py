"""One pass over a bundle's bytes, the machinery under :mod:`histodd_fed.bundle.seal`.

Sealing cuts chunks from the payload without copying (:func:`cut_chunks`); opening reads the file
once for the signature digest (:func:`hash_pass`) and once more to decrypt while re-hashing
(:func:`stream_bundle`). SHA-256 runs on worker threads (:class:`Lane`; hashlib releases the GIL)
for payloads of ``THREAD_MIN_BYTES`` and more (``docs/bundle-format.md``, "One pass over the file").
Nothing here checks a signature, unwraps a key or reads what it decrypted: seal.py decides when
each pass runs and what is done with its result.
"""

from __future__ import annotations

import bisect
import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from histodd_fed.bundle.errors import SizeLimitError
from histodd_fed.bundle.format import TAG_SIZE, BundleHeader, BundleSource, chunk_aad, chunk_nonce, encode_prefix
from histodd_fed.logging_setup import progress

THREAD_MIN_BYTES = 4 << 20   # payloads from this size hash on worker threads; smaller ones inline
SNAPSHOT_BYTES = 4 << 20     # open keeps the plaintext SHA-256 state about every this many bytes
PREFAULT_CHUNKS = 8          # open faults in the payload buffer this many chunks ahead, on a worker
HASH_BLOCK = 1 << 20         # the signature pass reads and hashes the file in blocks of this size


def cut_chunks(pieces: Iterable[memoryview], size: int) -> Iterator[memoryview]:
    """Cut a stream of byte pieces into blocks of exactly ``size`` bytes (the last one shorter).

    Blocks inside one piece are zero-copy slices of it; only a block that spans pieces is
    assembled in a staging buffer, which is reused, so the consumer must be done with a block
    before asking for the next. An empty stream gives one empty block; a stream whose length is
    a multiple of ``size`` gives no trailing empty block.
    """
    stage = memoryview(np.empty(size, dtype=np.uint8))  # no zero-fill: only written bytes are read
    fill = 0
    emitted = False
    for p in pieces:
        p = p.cast("B") if p.format != "B" or p.ndim != 1 else p
        n, pos = p.nbytes, 0
        if fill:
            take = min(size - fill, n)
            stage[fill:fill + take] = p[:take]
            fill += take
            pos = take
            if fill < size:
                continue
            emitted = True
            yield stage
            fill = 0
        while n - pos >= size:
            emitted = True
            yield p[pos:pos + size]
            pos += size
        if pos < n:
            stage[:n - pos] = p[pos:]
            fill = n - pos
    if fill or not emitted:
        yield stage[:fill]


class Lane:
    """Runs submitted calls in submission order on one worker thread, or inline when not threaded.

    Used to overlap SHA-256 (which releases the GIL on large buffers) with AES-GCM and I/O.
    """

    def __init__(self, threaded: bool):
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-hash") if threaded else None
        self._last: Future | None = None

    def submit(self, fn: Callable[..., object], *args: object) -> Future | None:
        """Queue ``fn(*args)``; returns its future (None when run inline, already done)."""
        if self._ex is None:
            fn(*args)
            return None
        self._last = self._ex.submit(fn, *args)
        return self._last

    def drain(self) -> None:
        """Wait until everything submitted so far has run (re-raising its error)."""
        if self._last is not None:
            self._last.result()

    def __enter__(self) -> "Lane":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True)


def wait_done(f: Future | None) -> None:
    if f is not None:
        f.result()


def quiet_if_small(n: int) -> dict:
    return {} if n > 64 else {"disable": True}


@dataclass
class StreamPass:
    """What one streaming pass over a bundle produced (see :func:`stream_bundle`)."""

    digest: bytes                    # SHA-256 of every byte before the signature (header as parsed)
    manifest_ct: bytes
    payload: np.ndarray | None       # decrypted payload (uint8); None when no key was available
    bad_chunk: int | None            # first payload chunk that failed authentication
    snapshots: list[tuple[int, "hashlib._Hash"]]  # (offset, SHA-256 state of payload[:offset])


def _readinto_exact(fh: BinaryIO, buf: memoryview) -> int:
    got = 0
    while got < buf.nbytes:
        n = fh.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _plain_step(h: "hashlib._Hash", data: memoryview, snapshots: list, end: int, snap: bool) -> None:
    h.update(data)
    if snap:
        snapshots.append((end, h.copy()))


def hash_pass(src: BundleSource, header: BundleHeader, blob: bytes | None = None) -> bytes:
    """SHA-256 of every byte before the signature, hash only: the signature is checked on this
    before anything is unwrapped, decrypted or allocated beyond two ``HASH_BLOCK`` buffers.

    The header bytes hashed are the ones :func:`parse_header` validated (not re-read)."""
    h = hashlib.sha256(encode_prefix(header.raw, header.version) + header.raw)
    start, end = header.manifest_offset, header.signature_offset
    if blob is not None:
        h.update(memoryview(blob)[start:end])
        return h.digest()
    threaded = end - start >= THREAD_MIN_BYTES
    nbuf = 2 if threaded else 1
    bufs = [memoryview(bytearray(max(1, min(HASH_BLOCK, end - start)))) for _ in range(nbuf)]
    busy: list[Future | None] = [None] * nbuf
    src.fh.seek(start)
    pos, i = start, 0
    with Lane(threaded) as lane:
        while pos < end:
            n = min(HASH_BLOCK, end - pos)
            slot = i % nbuf
            wait_done(busy[slot])
            buf = bufs[slot][:n]
            got = _readinto_exact(src.fh, buf)
            if got != n:
                raise SizeLimitError(f"{src.name}: file ended at byte {pos + got} while hashing "
                                     "(truncated or changed while reading)")
            busy[slot] = lane.submit(h.update, buf)
            pos += n
            i += 1
        lane.drain()
    return h.digest()


def stream_bundle(src: BundleSource, header: BundleHeader, aead: AESGCM | None, desc: str,
                   blob: bytes | None = None, hash_ct: bool = True) -> StreamPass:
    """Read the bundle once: hash the ciphertext for the signature and, with a key, decrypt.

    :func:`~histodd_fed.bundle.seal.open_bundle` calls this only after the signature over :func:`hash_pass` verified,
    with ``hash_ct`` for a file (the digest must come out the same: the file did not change
    between the passes) and without it for an immutable ``bytes`` bundle.

    The header bytes hashed are the ones :func:`parse_header` validated (not re-read), so the
    digest, the AAD and the parsed header all describe the same bytes. Each payload chunk is read
    once into one of two reused buffers; SHA-256 of it runs on a worker thread while the main
    thread decrypts it (``decrypt_into``) straight into the payload buffer, and a second worker
    hashes the plaintext (keeping the hash state every few MiB so each manifest part's SHA-256
    can be finished after the signature is verified). A third worker faults in the fresh
    payload pages a few chunks ahead of the decryption (first-touch page faults cost as much as
    the decryption itself on the VMs measured), always finishing a range before it is decrypted. After a chunk fails authentication the
    rest is only hashed. Nothing decrypted here is parsed, returned or written by this function.
    ``blob``: the bundle itself when the caller passed an (immutable) ``bytes`` object, which is
    then sliced instead of copied into the chunk buffers.
    """
    n, cs, psize = header.num_chunks, header.chunk_size, header.fields["payload_size"]
    hh = header.header_sha256
    ct_hash = hashlib.sha256(encode_prefix(header.raw, header.version) + header.raw) if hash_ct else None
    manifest_ct = src.read_at(header.manifest_offset, header.fields["manifest_ciphertext_size"])
    if ct_hash is not None:
        ct_hash.update(manifest_ct)
    # np.empty, not bytearray(n): no zero-fill pass, and numpy asks for huge pages on large buffers
    payload = np.empty(psize, dtype=np.uint8) if aead is not None else None
    pview = memoryview(payload) if payload is not None else None
    pt_hash = hashlib.sha256()
    snapshots: list = [(0, pt_hash.copy())]
    stride = max(1, SNAPSHOT_BYTES // cs)
    threaded = psize >= THREAD_MIN_BYTES
    nbuf = 2 if threaded else 1
    bufs = [memoryview(np.empty(min(cs, psize) + TAG_SIZE, dtype=np.uint8))
            for _ in range(nbuf if blob is None else 0)]
    busy: list[Future | None] = [None] * nbuf
    bad: int | None = None
    whole = memoryview(blob) if blob is not None else None
    src.fh.seek(header.payload_offset)
    bar = progress(total=n, desc=desc, unit="chunk", **quiet_if_small(n))
    prefault = PREFAULT_CHUNKS > 0 and threaded and payload is not None
    faulted: dict[int, Future | None] = {}  # chunk index -> its pages are being faulted in
    with bar, Lane(threaded) as ct_lane, Lane(threaded) as pt_lane, Lane(prefault) as pf_lane:
        for i in range(n):
            off, length = header.chunk_span(i)
            slot = i % nbuf
            if prefault and bad is None:  # keep PREFAULT_CHUNKS chunks of the payload faulted in ahead
                for j in range(i, min(n, i + PREFAULT_CHUNKS + 1)):
                    if j not in faulted:
                        faulted[j] = pf_lane.submit(_touch_pages, payload, j * cs, min(psize, (j + 1) * cs))
                wait_done(faulted.pop(i))  # never decrypt into a range the toucher may still write
            wait_done(busy[slot])  # the worker is done hashing what this buffer held
            if blob is not None:
                buf = whole[off:off + length]
                got = buf.nbytes
            else:
                buf = bufs[slot][:length]
                got = _readinto_exact(src.fh, buf)
            if got != length:
                raise SizeLimitError(f"{src.name}: file ended at byte {off + got} while reading chunk {i} "
                                     "(truncated or changed while reading)")
            if ct_hash is not None:
                busy[slot] = ct_lane.submit(ct_hash.update, buf)
            if pview is not None and bad is None:
                start = i * cs
                dst = pview[start:start + length - TAG_SIZE]
                try:
                    aead.decrypt_into(chunk_nonce(i), buf, chunk_aad(hh, i, i == n - 1), dst)
                except InvalidTag:
                    bad = i
                else:
                    pt_lane.submit(_plain_step, pt_hash, dst, snapshots, start + dst.nbytes, (i + 1) % stride == 0)
            bar.update(1)
        ct_lane.drain()
        pt_lane.drain()
    return StreamPass(ct_hash.digest() if ct_hash is not None else b"", manifest_ct, payload, bad, snapshots)


def _touch_pages(a: np.ndarray, start: int, end: int) -> None:
    """Fault in the pages of ``a[start:end]`` by writing a zero to each (before anything else writes there)."""
    a[start:end:4096] = 0


def part_sha256(done: StreamPass, start: int, end: int) -> str:
    """SHA-256 (hex) of ``payload[start:end]``; a prefix resumes from the pass's hash states."""
    view = memoryview(done.payload)
    if start != 0:
        return hashlib.sha256(view[start:end]).hexdigest()
    k = bisect.bisect_right([off for off, _ in done.snapshots], end) - 1
    off, state = done.snapshots[k]
    h = state.copy()
    h.update(view[off:end])
    return h.hexdigest()
