#!/usr/bin/env bash
# Install Debian's `chromium` package when no Chromium is on the machine, so that the report's
# headless-browser test (tests/test_report.py) runs instead of skipping. Called by `make test`.
# Set DISTILLKIT_NO_CHROMIUM_INSTALL=1 to skip the install (the browser test then skips, or fails under CI=true).
set -euo pipefail
for browser in chromium chromium-browser google-chrome; do
    if command -v "$browser" >/dev/null 2>&1; then exit 0; fi
done
if [ -n "${DISTILLKIT_NO_CHROMIUM_INSTALL:-}" ]; then
    echo "ensure_chromium: no Chromium, and DISTILLKIT_NO_CHROMIUM_INSTALL is set: not installing" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no Chromium and no apt-get: install Chromium by hand for the browser test" >&2
    exit 0
fi
sudo=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "ensure_chromium: not root and no sudo: cannot install chromium (apt-get install chromium)" >&2
        exit 0
    fi
fi
echo "ensure_chromium: installing Debian's chromium package for the report's browser test" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh image has no package lists: update first if the install cannot find the package.
$sudo apt-get -y install --no-install-recommends chromium \
    || { $sudo apt-get update && $sudo apt-get -y install --no-install-recommends chromium; }
