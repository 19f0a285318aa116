#!/usr/bin/env bash
# Create bench/.venvs/cryptofeed (Python 3.13) and install cryptofeed into it.
#
# cryptofeed 3.x needs Python >= 3.13 while LedgerFlux runs on 3.12, so the
# baseline lives in its own venv. Idempotent: does nothing when the venv already
# imports the wanted cryptofeed. Never downloads a Python build (UV_PYTHON_DOWNLOADS=never).
#
# Environment overrides:
#   CRYPTOFEED_PY    interpreter for the venv (default /root/.pyenv/versions/3.13.0/bin/python)
#   CRYPTOFEED_SPEC  requirement to install   (default cryptofeed==3.0.1; "cryptofeed" for latest)
#   UV_HOST_PYTHON   python that has uv as a module (default: python, from the repo root)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../.." && pwd)"
venv="${root}/bench/.venvs/cryptofeed"
py313="${CRYPTOFEED_PY:-/root/.pyenv/versions/3.13.0/bin/python}"
spec="${CRYPTOFEED_SPEC:-cryptofeed==3.0.1}"
host_python="${UV_HOST_PYTHON:-python}"

export UV_PYTHON_DOWNLOADS=never

die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

if [[ ! -x "${py313}" ]]; then
    die "Python 3.13 not found at ${py313}. cryptofeed 3.x requires Python >= 3.13; install it (e.g. 'pyenv install 3.13.0') or point CRYPTOFEED_PY at a 3.13+ interpreter."
fi
if ! "${py313}" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 13) else 1)'; then
    die "${py313} is $("${py313}" -c 'import platform; print(platform.python_version())'), but cryptofeed 3.x requires Python >= 3.13."
fi

# The version pinned by the spec, if any ("cryptofeed==3.0.1" -> "3.0.1").
wanted=""
if [[ "${spec}" == *"=="* ]]; then
    wanted="${spec##*==}"
fi

installed_version() {
    "${venv}/bin/python" -c 'import importlib.metadata as m, cryptofeed; print(m.version("cryptofeed"))' 2>/dev/null
}

if [[ -x "${venv}/bin/python" ]]; then
    if have="$(installed_version)"; then
        if [[ -z "${wanted}" || "${have}" == "${wanted}" ]]; then
            echo "cryptofeed ${have} already importable in ${venv}; nothing to do."
            exit 0
        fi
        echo "cryptofeed ${have} installed, ${wanted} wanted; reinstalling."
    fi
fi

cd "${root}"
# under `uv run` (make bench) `python` is the project venv's, which has no uv module: fall
# back to the uv on PATH
if "${host_python}" -m uv --version >/dev/null 2>&1; then
    uv_cmd=("${host_python}" -m uv)
elif command -v uv >/dev/null 2>&1; then
    uv_cmd=(uv)
else
    die "neither '${host_python} -m uv' nor 'uv' works from ${root}; install uv (python -m pip install uv) or set UV_HOST_PYTHON."
fi

if [[ ! -x "${venv}/bin/python" ]]; then
    "${uv_cmd[@]}" venv --no-project --python "${py313}" "${venv}"
fi
"${uv_cmd[@]}" pip install --python "${venv}/bin/python" "${spec}"

if ! have="$(installed_version)"; then
    die "cryptofeed is still not importable in ${venv} after install."
fi
echo "cryptofeed ${have} ready in ${venv} ($("${venv}/bin/python" -c 'import platform; print(platform.python_version())'))."
