#!/usr/bin/env bash
# Builds, idempotently, the virtual environments the UI tests need, under ROOT (default: .venv/ui):
#   ROOT/gradio3  A1111 1.10's web stack: gradio 3.41.2, fastapi 0.94.0 (pydantic 1), httpx 0.24.1, httpcore 0.15.0
#   ROOT/gradio4  Forge's web stack: gradio 4.40.0, fastapi 0.104.1, pydantic 2.8.2, huggingface-hub 0.26.2,
#                 httpx 0.24.1, httpcore 0.15.0
#   ROOT/current  current gradio, Playwright's Python package and matplotlib (re-basin charts): the standalone app
#                 and the browser test
# Each gets torch==2.13.0 first (pip must never pick torch itself), then its pins and pytest, then this project
# (editable).  The browser test drives Debian's chromium, installed here with apt-get when missing (as root).
#
# Usage: bash .ci/ui-envs.sh [ROOT]     then, from the repository root (name the files: these venvs lack the
# other tests' dependencies, such as diffusers):
#   UI_TESTS="tests/test_ui_webui.py tests/test_ui_tab.py tests/test_ui_api.py"
#   ROOT/gradio3/bin/python -m pytest $UI_TESTS                          # A1111 flavour (Forge's tests skip)
#   ROOT/gradio4/bin/python -m pytest $UI_TESTS                          # Forge flavour (A1111's tests skip)
#   ROOT/current/bin/python -m pytest $UI_TESTS tests/test_e2e_browser.py # standalone app + headless Chromium
# The webui flavours carry the markers gradio3 / gradio4 and skip under any other gradio; the browser test carries
# `browser` and skips without chromium or playwright.  test_ui_forms.py and test_ui_install.py need no gradio and
# run in the main test environment.  The browser test's screenshots land in artifacts/screenshots/.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${1:-$HERE/.venv/ui}"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
export PIP_DISABLE_PIP_VERSION_CHECK=1 GRADIO_ANALYTICS_ENABLED=False

declare -A PINS=(
  [gradio3]="gradio==3.41.2 fastapi==0.94.0 httpx==0.24.1 httpcore==0.15.0"
  [gradio4]="gradio==4.40.0 fastapi==0.104.1 httpx==0.24.1 httpcore==0.15.0 pydantic==2.8.2 huggingface-hub==0.26.2"
  [current]="gradio playwright matplotlib"
)

# pip, with the local package index's "Location ... is ignored" noise filtered out; keeps pip's exit status
pip_install() {
  local python="$1" log status=0
  shift
  log="$(mktemp)"
  "$python" -m pip install --quiet "$@" >"$log" 2>&1 || status=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return "$status"
}

build() {
  local name="$1" venv="$ROOT/$1"
  local stamp="$venv/.ui-envs-stamp" python="$venv/bin/python" constraints="$venv/torch-constraint.txt"
  local want="torch==2.13.0 ${PINS[$name]} $(sha1sum "$HERE/pyproject.toml" | cut -c1-12) $HERE"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$python" -c "import gradio, torch, lib_rebasin" 2>/dev/null; then
    echo "ui-envs: $name is up to date"
    return
  fi
  echo "ui-envs: building $name in $venv"
  [[ -x "$python" ]] || python3 -m venv "$venv"
  echo "torch==2.13.0" >"$constraints"
  pip_install "$python" "torch==2.13.0"
  # shellcheck disable=SC2086  # the pins are words
  pip_install "$python" -c "$constraints" ${PINS[$name]} pytest
  pip_install "$python" -c "$constraints" -e "$HERE"
  "$python" -c "import gradio, torch; print('ui-envs: $name: gradio', gradio.__version__, 'torch', torch.__version__)"
  echo "$want" >"$stamp"
}

for name in gradio3 gradio4 current; do
  build "$name"
done

if ! command -v chromium >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "ui-envs: installing Debian's chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "ui-envs: chromium is missing (apt-get install chromium): the browser test will be skipped"
  fi
fi
