#!/usr/bin/env bash
# Install Debian's chromium for the headless-browser test of `zeropoint analyze --html`
# (tests/analysis/test_report_browser.py). Idempotent: returns at once when it is installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
