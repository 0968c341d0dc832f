#!/usr/bin/env bash
# Install Debian's Chromium and its driver (for tests/test_monitor_browser.py) unless present.
# CI machines start bare, so .ci/run calls this before the tests. Needs root (or sudo) and apt.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get here: install chromium yourself (the browser test is skipped without it)" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-browser: need root or sudo to install chromium" >&2
        exit 1
    fi
    SUDO=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q chromium chromium-driver
chromium --version
