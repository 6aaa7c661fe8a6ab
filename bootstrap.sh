#!/usr/bin/env bash
# Install what wasmforge needs on a Debian 12 (bookworm) machine, then provision the WASI toolchain.
#   - Debian packages: the build drivers and test services below, then what the toolchain's pins and
#     the recipes name (`invoke host-packages`: the LLVM 22 WASI compiler tools, the programs builds
#     run, the libraries of the native reference builds);
#   - a Python virtual environment in .venv with wasmforge and its test tools;
#   - `invoke toolchain --install`: the pinned WASI SDK, or one assembled from Debian packages.
# Safe to run again: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"

# What wasmforge itself uses, whatever the recipes say (they name theirs: `invoke host-packages`).
APT_PACKAGES=(
  make patch pkgconf cmake autoconf automake libtool   # build drivers, autoreconf of git-shaped sources
  autotools-dev                                        # a config.sub that knows wasm32-wasip1
  tcl xz-utils ca-certificates                         # SQLite's amalgamation generator (Debian's source shape), .tar.xz, TLS
  ccache                                               # compile results shared between builds
  python3-venv
  docker-registry skopeo apache2-utils                 # the tests' OCI registry, its client and htpasswd
  chromium chromium-driver                             # the tests' browser: served pages as a user sees them
)

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
updated=
install_missing() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "bootstrap: installing ${missing[*]}"
  [ -n "$updated" ] || { "${SUDO[@]}" apt-get update -q; updated=1; }
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q "${missing[@]}"
  newly+=("${missing[@]}")
}
newly=()
install_missing "${APT_PACKAGES[@]}"
# Node.js and npm run the pinned wasm-opt (Binaryen's npm build); any Node.js >= 18 will do.
command -v node >/dev/null && command -v npm >/dev/null || install_missing nodejs npm

# The tests start their own registries on 127.0.0.1; the service the docker-registry package starts
# (on port 5000 of every interface) is not wanted.
if [[ " ${newly[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null \
    && systemctl is-enabled docker-registry >/dev/null 2>&1; then
  echo "bootstrap: stopping and disabling the docker-registry service (the tests start their own)"
  "${SUDO[@]}" systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
# An editable install that is a plain .pth naming the checkout (setuptools' compat mode): the default one
# installs an import hook that every start of Python pays for (tens of ms of `invoke run`). A setuptools
# that no longer offers compat mode gets the default.
.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat \
  || .venv/bin/pip install -q -e '.[test]'

# The packages the toolchain's pins and the recipes name.
recipe_packages=$(.venv/bin/invoke host-packages)
mapfile -t RECIPE_PACKAGES <<< "$recipe_packages"
[ -z "$recipe_packages" ] || install_missing "${RECIPE_PACKAGES[@]}"

echo "bootstrap: provisioning the WASI toolchain"
.venv/bin/invoke toolchain --install
