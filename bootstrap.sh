#!/usr/bin/env bash
# Install what wasmforge needs on a Debian 12 (bookworm) machine, then provision the WASI toolchain.
#   - Debian packages: the LLVM 22 WASI compiler tools, and the host tools builds use;
#   - a Python virtual environment in .venv with wasmforge and its test tools;
#   - `invoke toolchain --install`: the pinned WASI SDK, or one assembled from Debian packages.
# Safe to run again: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  clang-22 lld-22 llvm-22 libclang-rt-22-dev-wasm32   # the WASI cross compiler, linker and tools
  libc++-22-dev-wasm32 libc++abi-22-dev-wasm32        # C++ for WASI (ICU, PHP's intl)
  make patch pkgconf cmake autoconf automake libtool   # build drivers, autoreconf of git-shaped sources
  autotools-dev                                        # a config.sub that knows wasm32-wasip1
  tcl xz-utils ca-certificates                         # SQLite's amalgamation generator, .tar.xz, TLS
  ccache                                               # compile results shared between builds
  libxml2-dev libsqlite3-dev libonig-dev zlib1g-dev libbz2-dev  # native reference PHP (invoke build php-<v> --native)
  libssl-dev libzip-dev libxslt1-dev libgmp-dev libsodium-dev  # ... and its openssl, zip, xsl, gmp, sodium
  libpng-dev libjpeg-dev libwebp-dev libfreetype-dev   # ... and its gd
  libicu-dev                                           # ... and its intl
  php-cli                                              # runs PHP's VM generator (Zend/zend_vm_gen.php) in PHP builds
  python3-venv
  docker-registry skopeo apache2-utils                 # the tests' OCI registry, its client and htpasswd
)

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js and npm run the pinned wasm-opt (Binaryen's npm build); any Node.js >= 18 will do.
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  "${SUDO[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q "${missing[@]}"
fi

# The tests start their own registries on 127.0.0.1; the service the docker-registry package starts
# (on port 5000 of every interface) is not wanted.
if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null \
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

echo "bootstrap: provisioning the WASI toolchain"
.venv/bin/invoke toolchain --install
