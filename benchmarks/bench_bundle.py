"""Bundle seal/open throughput against raw AES-256-GCM of the same bytes, in one run.

For each payload size (default 1 MB, 100 MB, 1 GB of uint8 patch pixels, 64x64 RGB patches):

- ``seal``: :func:`histodd_fed.bundle.seal` of the PatchSet to a file (payload hashing, HPKE key
  wrap, chunked AES-256-GCM, Ed25519 signature, atomic write);
- ``open``: :func:`histodd_fed.bundle.open_bundle` of that file (signature check against a
  :class:`TrustStore`, key unwrap, chunked decryption, manifest hashes, ledger, tensors decode)
  into an in-memory PatchSet;
- ``raw enc`` / ``raw dec``: cryptography's ``AESGCM.encrypt`` / ``decrypt`` over the same payload
  bytes with the same chunking (``DEFAULT_CHUNK_SIZE``), in memory, nothing else (each call
  allocates its output: the issue's baseline);
- ``raw enc_into`` / ``raw dec_into``: ``AESGCM.encrypt_into`` / ``decrypt_into`` of the same
  chunks into one reused buffer (no allocation, no page faults: the cipher alone);
- ``raw dec kept``: allocating ``decrypt`` whose outputs are all kept, as a receiver must keep
  the plaintext (the other decrypt baselines free each 1 MiB output, so the allocator reuses one
  block and never touches fresh memory; here the first touch of ~1 GB of new pages is paid too);
- ``raw enc+file`` / ``raw file+dec``: allocating raw AES-GCM that also writes (with fsync) /
  reads the ciphertext file;

printed as MB/s and as ratios bundle / raw for each baseline (target >= 0.5x the allocating
raw), plus the bundle file size against the raw patch bytes it carries. Writes JSON with ``--json``.

glibc's malloc thresholds are pinned at start (``pin_malloc``; ``--no-pin-malloc`` to skip) so
the allocating baselines do not depend on what the process freed before.

    .venv/bin/python benchmarks/bench_bundle.py [--sizes 1,100,1000] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from histodd_fed.bundle import Ledger, TrustStore, generate_identity, load_public_identity, open_bundle, seal  # noqa: E402
from histodd_fed.bundle.format import DEFAULT_CHUNK_SIZE  # noqa: E402
from histodd_fed.patchset import PatchSet  # noqa: E402

MB = 1_000_000
PATCH = 64


def pin_malloc(threshold: int = 32 << 20) -> bool:
    """Fix glibc malloc's mmap/trim thresholds (no dynamic adjustment) so the raw baselines' 1 MiB
    temporaries come from a warm heap whatever ran before in the process.

    Without this, glibc raises its mmap threshold only after the process frees a large
    mmap'd block, so the allocating raw ``encrypt``/``decrypt`` baselines ran 2-4x faster after
    the old bundle code (which freed many 1 MiB ``bytes``) than after the new one (which frees
    none), on this VM where page faults are expensive. Returns False when not on glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 4 * threshold))


def make_patchset(nbytes: int, seed: int) -> PatchSet:
    """Random 64x64 RGB patches totalling about ``nbytes`` pixel bytes, two classes, 8 slides."""
    n = max(2, nbytes // (PATCH * PATCH * 3))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, PATCH, PATCH, 3), dtype=np.uint8)
    labels = np.arange(n) % 2
    sids = [f"S{i}" for i in range(8)]
    return PatchSet(images=images, labels=labels, class_names=["normal", "tumour"],
                    slide_index=(np.arange(n) % 8).astype(np.int32), slide_ids=sids,
                    slide_labels={s: i % 2 for i, s in enumerate(sids)}, kind="synthetic",
                    meta={"ipc": n // 2, "bench": True})


def raw_chunks(ps: PatchSet) -> list[memoryview]:
    """The pixel bytes cut into DEFAULT_CHUNK_SIZE pieces (views, no copy)."""
    mv = memoryview(np.ascontiguousarray(ps.images).reshape(-1))
    return [mv[i:i + DEFAULT_CHUNK_SIZE] for i in range(0, mv.nbytes, DEFAULT_CHUNK_SIZE)]


def raw_encrypt(chunks: list[memoryview], key: bytes) -> list[bytes]:
    aead = AESGCM(key)
    return [aead.encrypt(b"\x00" * 4 + i.to_bytes(8, "big"), c, b"aad") for i, c in enumerate(chunks)]


def raw_decrypt(cts: list[bytes], key: bytes) -> int:
    aead = AESGCM(key)
    n = 0
    for i, c in enumerate(cts):
        n += len(aead.decrypt(b"\x00" * 4 + i.to_bytes(8, "big"), c, b"aad"))
    return n


def raw_decrypt_kept(cts: list[bytes], key: bytes) -> list[bytes]:
    """Raw allocating AES-GCM decryption keeping every plaintext chunk (fresh memory, like a receiver)."""
    aead = AESGCM(key)
    return [aead.decrypt(b"\x00" * 4 + i.to_bytes(8, "big"), c, b"aad") for i, c in enumerate(cts)]


def raw_encrypt_into(chunks: list[memoryview], key: bytes) -> int:
    """Raw AES-GCM into one reused buffer: the cipher's own speed, no allocation."""
    aead = AESGCM(key)
    buf = memoryview(bytearray(DEFAULT_CHUNK_SIZE + 16))
    n = 0
    for i, c in enumerate(chunks):
        n += aead.encrypt_into(b"\x00" * 4 + i.to_bytes(8, "big"), c, b"aad", buf[:c.nbytes + 16])
    return n


def raw_decrypt_into(cts: list[bytes], key: bytes) -> int:
    aead = AESGCM(key)
    buf = memoryview(bytearray(DEFAULT_CHUNK_SIZE))
    n = 0
    for i, c in enumerate(cts):
        n += aead.decrypt_into(b"\x00" * 4 + i.to_bytes(8, "big"), c, b"aad", buf[:len(c) - 16])
    return n


def raw_encrypt_to_file(chunks: list[memoryview], key: bytes, path: Path) -> None:
    """Raw AES-GCM with the ciphertext written to a file (the I/O a sealed bundle also pays)."""
    aead = AESGCM(key)
    with open(path, "wb") as fh:
        for i, c in enumerate(chunks):
            fh.write(aead.encrypt(b"\x00" * 4 + i.to_bytes(8, "big"), c, b"aad"))
        fh.flush()
        os.fsync(fh.fileno())


def raw_decrypt_from_file(path: Path, key: bytes, nchunks: int, chunk: int) -> int:
    aead = AESGCM(key)
    n = 0
    with open(path, "rb") as fh:
        for i in range(nchunks):
            n += len(aead.decrypt(b"\x00" * 4 + i.to_bytes(8, "big"), fh.read(chunk + 16), b"aad"))
    return n


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median wall seconds of ``repeat`` calls and the last result."""
    ts, res = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), res


def bench_size(size_mb: float, repeat: int, work: Path, seed: int) -> dict:
    src = generate_identity("C1", work / "keys_C1")
    dst = generate_identity("C2", work / "keys_C2")
    trust = TrustStore.load(work / "keys_C2")
    trust.add(load_public_identity(work / "keys_C1"))
    ps = make_patchset(int(size_mb * MB), seed)
    raw_bytes = ps.images.nbytes
    out = work / f"b{size_mb:g}.hbundle"

    def do_seal():
        out.unlink(missing_ok=True)
        return seal(ps, src, [dst.public], out)

    t_seal, _ = timed(do_seal, repeat)
    bundle_size = out.stat().st_size
    k = 0

    def do_open():
        nonlocal k
        k += 1
        led = Ledger(work / f"ledger{k}.json")  # a fresh ledger: the same bundle is opened again
        return open_bundle(out, dst, trust, led)

    t_open, opened = timed(do_open, repeat)
    assert np.array_equal(opened.patchset.images, ps.images), "round trip changed the pixels"
    del opened
    key = os.urandom(32)
    chunks = raw_chunks(ps)
    t_enc, cts = timed(lambda: raw_encrypt(chunks, key), repeat)
    t_dec, n = timed(lambda: raw_decrypt(cts, key), repeat)
    assert n == raw_bytes
    t_enc_into, _ = timed(lambda: raw_encrypt_into(chunks, key), repeat)
    t_dec_into, n = timed(lambda: raw_decrypt_into(cts, key), repeat)
    assert n == raw_bytes
    t_dec_kept, kept = timed(lambda: raw_decrypt_kept(cts, key), repeat)
    assert sum(len(k) for k in kept) == raw_bytes
    del kept
    del cts
    rawf = work / "raw.bin"
    t_encf, _ = timed(lambda: raw_encrypt_to_file(chunks, key, rawf), repeat)
    t_decf, n = timed(lambda: raw_decrypt_from_file(rawf, key, len(chunks), DEFAULT_CHUNK_SIZE), repeat)
    assert n == raw_bytes
    rawf.unlink()
    del chunks, ps
    out.unlink(missing_ok=True)
    mbs = lambda t: raw_bytes / MB / t  # noqa: E731
    return {"size_mb": raw_bytes / MB, "repeat": repeat, "seal_s": t_seal, "open_s": t_open, "raw_enc_s": t_enc,
            "raw_dec_s": t_dec, "seal_MBps": mbs(t_seal), "open_MBps": mbs(t_open), "raw_enc_MBps": mbs(t_enc),
            "raw_dec_MBps": mbs(t_dec), "raw_enc_file_MBps": mbs(t_encf), "raw_dec_file_MBps": mbs(t_decf),
            "raw_enc_into_MBps": mbs(t_enc_into), "raw_dec_into_MBps": mbs(t_dec_into),
            "seal_vs_raw_into": t_enc_into / t_seal, "open_vs_raw_into": t_dec_into / t_open,
            "raw_dec_kept_MBps": mbs(t_dec_kept), "open_vs_raw_dec_kept": t_dec_kept / t_open,
            "seal_vs_raw_file": t_encf / t_seal, "open_vs_raw_file": t_decf / t_open, "seal_vs_raw": t_enc / t_seal, "open_vs_raw": t_dec / t_open,
            "bundle_bytes": bundle_size, "raw_patch_bytes": raw_bytes, "bundle_over_raw": bundle_size / raw_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,100,1000", help="payload sizes in MB (10^6 bytes), comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats for sizes <= 100 MB (median); 1 above")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-pin-malloc", action="store_true",
                    help="leave glibc's dynamic malloc thresholds alone (baselines then depend on history)")
    args = ap.parse_args(argv)
    pinned = False if args.no_pin_malloc else pin_malloc()
    from histodd_fed.logging_setup import configure_logging

    configure_logging(quiet=True)  # no progress bars inside the timed calls
    rows = []
    for s in (float(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench_bundle.") as d:
            rows.append(bench_size(s, args.repeat if s <= 100 else 1, Path(d), args.seed))
        r = rows[-1]
        r["malloc_pinned"] = pinned
        r["loadavg_1min"] = os.getloadavg()[0]
        print(f"{r['size_mb']:8.1f} MB  seal {r['seal_MBps']:7.1f} MB/s  open {r['open_MBps']:7.1f} MB/s  "
              f"raw enc {r['raw_enc_MBps']:7.1f}  raw dec {r['raw_dec_MBps']:7.1f}  "
              f"seal/raw {r['seal_vs_raw']:.2f}x  open/raw {r['open_vs_raw']:.2f}x  "
              f"bundle/raw bytes {r['bundle_over_raw']:.4f}", flush=True)
        print(f"{'':11} raw enc+write file {r['raw_enc_file_MBps']:7.1f} MB/s  raw read+dec file "
              f"{r['raw_dec_file_MBps']:7.1f} MB/s  seal/raw-file {r['seal_vs_raw_file']:.2f}x  "
              f"open/raw-file {r['open_vs_raw_file']:.2f}x", flush=True)
        print(f"{'':11} raw enc_into {r['raw_enc_into_MBps']:7.1f} MB/s  raw dec_into "
              f"{r['raw_dec_into_MBps']:7.1f} MB/s  seal/raw-into {r['seal_vs_raw_into']:.2f}x  "
              f"open/raw-into {r['open_vs_raw_into']:.2f}x", flush=True)
        print(f"{'':11} raw dec kept {r['raw_dec_kept_MBps']:7.1f} MB/s  open/raw-dec-kept "
              f"{r['open_vs_raw_dec_kept']:.2f}x", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
