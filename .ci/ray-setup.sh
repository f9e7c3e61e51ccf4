#!/usr/bin/env bash
# A Ray installation for the ray runner's tests, in a virtualenv of its own outside the repository: the
# `ray` package's pins clash with ours and it weighs about 380 MB, and the agent speaks to Ray over the Jobs
# REST API, so Ray is never installed beside Takeoff. The tests start its head themselves (tests/ray).
# Skipped when the virtualenv already has this Ray version, so running it again is cheap.
#
# Prints the variable the tests read as an `export` line on stdout (everything else goes to stderr):
#   eval "$(bash .ci/ray-setup.sh)"
set -euo pipefail

RAY_VERSION=2.60.0  # the version the runner and its tests were written against
VENV=${TAKEOFF_RAY_VENV:-/opt/takeoff-ci/ray-venv}

say() { echo "ray-setup: $*" >&2; }

if [[ "$("$VENV/bin/ray" --version 2>/dev/null)" != *"version $RAY_VERSION"* ]]; then
  say "installing ray[default]==$RAY_VERSION into $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "ray[default]==$RAY_VERSION" >&2
fi
say "$("$VENV/bin/ray" --version)"
echo "export TAKEOFF_TEST_RAY=$VENV/bin/ray"
