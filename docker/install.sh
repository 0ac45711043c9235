#!/bin/sh
# The image's install steps, in one place: the Dockerfile runs them, and
# tests/deploy/test_manifests.py::test_image_install_steps replays the same calls in a fresh
# virtualenv (HALLDYLL_TEST_IMAGE_INSTALL=1).
#
#   install.sh deps VARIANT   third-party dependencies from pyproject.toml (cpu or gpu);
#                             needs only pyproject.toml and docker/, not the source
#   install.sh app            the package itself, from the source tree, without dependencies
#   install.sh ldconfig       (root) register pip's CUDA/cuDNN libraries with the dynamic linker;
#                             a no-op when none are installed (the cpu variant)
#   install.sh check VARIANT  import the app, load the packaged model, check the ONNX Runtime build
#
# Run from the directory that holds pyproject.toml. PYTHON picks the interpreter (default: python).
set -eu
PYTHON="${PYTHON:-python}"
PIP="$PYTHON -m pip --no-cache-dir --disable-pip-version-check"

step="${1:?usage: install.sh deps VARIANT | app | check VARIANT}"
case "$step" in
deps)
    variant="${2:?usage: install.sh deps cpu|gpu}"
    reqs="$(mktemp)"
    "$PYTHON" docker/requirements.py "$variant" >"$reqs"
    $PIP install --requirement "$reqs"
    rm -f "$reqs"
    ;;
app)
    # Dependencies are already in place (deps); --no-deps keeps this layer to our own code and
    # keeps pip from pulling the CPU onnxruntime back into the gpu image.
    $PIP install --no-deps .
    ;;
ldconfig)
    # onnxruntime-gpu[cuda,cudnn] brings CUDA and cuDNN as pip wheels under site-packages/nvidia;
    # the CUDA provider finds them only if the dynamic linker knows those folders.
    nvidia="$("$PYTHON" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)"
    if [ -n "$nvidia" ]; then
        find "$nvidia" -name 'lib*.so*' -exec dirname {} \; | sort -u >/etc/ld.so.conf.d/zz-pip-nvidia.conf
        ldconfig
    fi
    ;;
check)
    variant="${2:?usage: install.sh check cpu|gpu}"
    "$PYTHON" - "$variant" <<'PY'
import sys

import onnxruntime as ort

import halldyll_ray.serve.app  # noqa: F401  (the Serve import path resolves)
from halldyll_ray.storage.migrate import load_migrations
from halldyll_ray.embedding import OnnxEncoder

variant = sys.argv[1]
providers = ort.get_available_providers()
if variant == "gpu" and "CUDAExecutionProvider" not in providers:
    sys.exit(f"gpu image without the CUDA build of onnxruntime: {providers}")
encoder = OnnxEncoder.load(None, dimension=384, provider="cpu")  # the packaged default model
assert encoder.encode(["image build check"]).shape == (1, 384)
print(f"ok: {len(load_migrations())} migrations, model {encoder.model_id}, providers {providers}")
PY
    ;;
*)
    echo "unknown step: $step" >&2
    exit 2
    ;;
esac
