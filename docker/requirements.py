"""Print the third-party requirements of pyproject.toml, one per line, for an image variant.

The Dockerfile installs these before it copies the source, so the dependency layer is rebuilt
only when pyproject.toml changes; pyproject.toml stays the one place dependencies are declared.

    python docker/requirements.py cpu   # [project] dependencies
    python docker/requirements.py gpu   # the same with onnxruntime replaced by the gpu extra

Why replace rather than add: onnxruntime and onnxruntime-gpu install the same ``onnxruntime``
module, and with both installed the CPU wheel can overwrite the CUDA build's files. The gpu
variant also asks for onnxruntime-gpu's ``cuda`` and ``cudnn`` extras, so the CUDA runtime and
cuDNN it was built against come from pip and do not depend on the base image's CUDA toolkit.

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

VARIANTS = ("cpu", "gpu")
GPU_EXTRAS = "cuda,cudnn"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def requirements(pyproject: Path, variant: str) -> list[str]:
    """The requirement lines for ``variant`` (``cpu`` or ``gpu``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    deps: list[str] = list(project["dependencies"])
    if variant == "cpu":
        return deps
    gpu: list[str] = list(project["optional-dependencies"]["gpu"])
    replaced = {_name(r) for r in gpu} | {"onnxruntime"}
    out = [r for r in deps if _name(r) not in replaced]
    for requirement in gpu:
        match = _NAME.match(requirement)
        assert match is not None
        if _name(requirement) == "onnxruntime-gpu" and not match[2]:
            requirement = f"{match[1]}[{GPU_EXTRAS}]{match[3]}"
        out.append(requirement)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in VARIANTS:
        print(f"usage: requirements.py {{{'|'.join(VARIANTS)}}}", file=sys.stderr)
        return 2
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(requirements(pyproject, argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
