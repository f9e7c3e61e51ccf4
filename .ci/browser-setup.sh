#!/usr/bin/env bash
# A headless Chromium and its driver for the console's browser tests (tests/browser): Debian's chromium and
# chromium-driver, installed only when missing, so running it again is cheap. The tests drive them with
# Selenium through that driver binary alone: nothing is downloaded at test time.
#
# Prints the variables the tests read as `export` lines on stdout (everything else goes to stderr):
#   eval "$(.ci/browser-setup.sh)"
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

say() { echo "browser-setup: $*" >&2; }

missing=()
[[ -x $CHROMIUM ]] || missing+=(chromium)
[[ -x $CHROMEDRIVER ]] || missing+=(chromium-driver)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The two must be one release, or the driver refuses the browser.
say "$("$CHROMIUM" --version 2>/dev/null | head -n 1); $("$CHROMEDRIVER" --version | head -n 1)"

echo "export TAKEOFF_TEST_CHROMIUM=$CHROMIUM TAKEOFF_TEST_CHROMEDRIVER=$CHROMEDRIVER"
