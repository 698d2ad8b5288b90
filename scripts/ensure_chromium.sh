#!/usr/bin/env bash
# Installs Debian's chromium for the real-browser tests when it is missing and we can.
# Never runs `playwright install` (that downloads a browser build from outside the package registries).
# The browser tests skip with a clear reason when no chromium is found.
set -u
for exe in "${CHROMIUM_PATH:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
  [ -n "$exe" ] && [ -x "$exe" ] && { echo "browser tests will use $exe"; exit 0; }
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the browser tests will be skipped"
else
  echo "no chromium and no root apt-get: the browser tests will be skipped (set CHROMIUM_PATH to use one)"
fi
exit 0
