#!/usr/bin/env bash
# Creates (once) and activates .venv with Python >= 3.12, and installs this package with its test
# extra. Sourced by launch/main.sh and launch/test.sh so a fresh machine needs nothing else.
# It sets no shell options: sourced in an interactive shell, a `set -e` would stay behind and end
# that shell's later command chains at their first failing command. Each step checks itself.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_find_python() {
  local c
  for c in python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  # pyenv installs a 3.12 that its shims hide unless selected.
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.12*/bin/python3.12 "$(pyenv root)"/versions/3.13*/bin/python3.13; do
      if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
  fi
  echo "error: Python >= 3.12 not found (jax 0.11 needs it); install python3.12 and re-run" >&2
  return 1
}

_setup_venv() {
  local py stamp
  if [ ! -x "$_repo/.venv/bin/python" ]; then
    py="$(_find_python)" || return 1
    "$py" -m venv "$_repo/.venv" || return 1
  fi
  # shellcheck disable=SC1091
  source "$_repo/.venv/bin/activate" || return 1
  stamp="$_repo/.venv/.installed-$(sha1sum "$_repo/setup.py" | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    python -m pip install -q --upgrade pip || return 1
    python -m pip install -q -e "$_repo[test]" || return 1
    touch "$stamp"
  fi
}
_setup_venv || { echo "error: setting up $_repo/.venv failed (see above)" >&2; return 1 2>/dev/null || exit 1; }
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
