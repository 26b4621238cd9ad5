#!/usr/bin/env bash
# Create (or refresh) the virtual environment that `make test` and `make bench` run in.
#
#   ATTNKIT_VENV    the environment's folder               (default: .venv)
#   ATTNKIT_PYTHON  the interpreter it is created from     (default: python3)
#   ATTNKIT_TORCH   what pip installs when no torch exists (default: torch==2.13.0)
#
# torch is never replaced: when the base interpreter already has one (a CUDA
# build, say) the environment sees it through --system-site-packages; only when
# there is none does pip install ATTNKIT_TORCH (on the project's machines that
# pin resolves to a local CPU wheel, not a multi-GB CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${ATTNKIT_VENV:-.venv}
base=${ATTNKIT_PYTHON:-python3}
py="$venv/bin/python"

if [ ! -x "$py" ]; then
    if "$base" -c "import torch" >/dev/null 2>&1; then
        echo "bootstrap: $base has torch $("$base" -c 'import torch; print(torch.__version__)'); $venv will reuse it" >&2
        "$base" -m venv --system-site-packages "$venv"
    else
        echo "bootstrap: creating $venv from $("$base" --version)" >&2
        "$base" -m venv "$venv"
    fi
fi

# tests/test_viz.py drives Debian's chromium (never a browser download).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing chromium (Debian) for the browser tests" >&2
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "bootstrap: tests/test_viz.py needs Debian's chromium: sudo apt-get install -y chromium" >&2
    fi
fi

# Reinstall only when the package metadata or this script changed.
stamp="$venv/.attnkit-installed"
wanted=$(cat setup.cfg pyproject.toml scripts/bootstrap.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: installing ${ATTNKIT_TORCH:-torch==2.13.0}" >&2
    "$py" -m pip install --quiet --progress-bar off "${ATTNKIT_TORCH:-torch==2.13.0}"
fi
echo "bootstrap: installing attnkit (editable) with its test dependencies" >&2
"$py" -m pip install --quiet --progress-bar off -e ".[test]"
# With a CPU-only torch the Triton tests run on triton's interpreter, which needs
# triton >= 3.9 once numpy >= 2.4. A CUDA torch's own pinned triton is never touched.
case "$(uname -s)-$(uname -m)" in Linux-x86_64 | Linux-aarch64)
    if "$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)" 2>/dev/null &&
        ! "$py" -c "
import sys, numpy, triton
v = lambda s: tuple(int(x) for x in s.split('+')[0].split('.')[:2])
sys.exit(0 if v(triton.__version__) >= (3, 9) or v(numpy.__version__) < (2, 4) else 1)" 2>/dev/null; then
        echo "bootstrap: installing ${ATTNKIT_TRITON:-triton>=3.9} (Triton interpreter for the CPU tests)" >&2
        "$py" -m pip install --quiet --progress-bar off "${ATTNKIT_TRITON:-triton>=3.9}" ||
            echo "bootstrap: triton could not be installed; the Triton tests will be skipped" >&2
    fi
    ;;
esac
echo "$wanted" >"$stamp"
