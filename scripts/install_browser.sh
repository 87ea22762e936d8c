#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver for the browser test (tests/test_serve_browser.py), when missing.
# The test skips with a message pointing here where they are not installed.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
