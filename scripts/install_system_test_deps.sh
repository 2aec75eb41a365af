#!/usr/bin/env bash
# Debian packages the test suite drives for real: chromium (the web front end's browser tests,
# through Playwright with the system browser: no browser download), nginx (the documented load
# balancer, behind TLS with a test certificate made by openssl) and Mesa's EGL (slice views rendered offscreen by VTK without X). Installs only what is
# missing; needs root (or sudo) the first time.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
# VTK's EGL window loads libEGL.so.1 (glvnd), which loads Mesa's vendor library and its software
# renderer (llvmpipe in swrast_dri.so): Testing/slice_view.py renders slice views with them
LDCONFIG=$(command -v ldconfig || echo /sbin/ldconfig)  # not on a user's PATH on Debian
libs=$("$LDCONFIG" -p 2>/dev/null || true)
grep -q "libEGL\.so\.1 " <<<"$libs" || need+=(libegl1)
grep -q "libEGL_mesa\.so\.0 " <<<"$libs" || need+=(libegl-mesa0)
command -v openssl >/dev/null || need+=(openssl)  # the nginx test's TLS certificate
compgen -G "/usr/lib/*/dri/swrast_dri.so" >/dev/null || need+=(libgl1-mesa-dri)
[ ${#need[@]} = 0 ] && exit 0
echo "Installing Debian packages for the tests: ${need[*]}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
if ! command -v apt-get >/dev/null; then
  echo "apt-get is not available: install ${need[*]} with this system's package manager, then run again." >&2
  exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
