#!/usr/bin/env bash
# Installs everything the local testbed needs, once, and caches slow builds under
# $BLOCKSMITH_CACHE (default ~/.cache/blocksmith). Safe to run repeatedly: each step is
# skipped when its result is already present.
set -euo pipefail

CACHE="${BLOCKSMITH_CACHE:-$HOME/.cache/blocksmith}"
K8S_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_BIN="$CACHE/kubernetes-$K8S_VERSION"
S3S_VERSION="0.14.1"
mkdir -p "$CACHE/bin"

log() { echo "[install] $*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

apt_packages() {
  local missing=()
  for p in etcd-server golang-1.15-go rsync cmake openssl iproute2 python3-venv curl libcurl4-openssl-dev libssl-dev pkg-config gettext-base; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ ! -f /etc/apt/sources.list.d/blocksmith-testbed.sources ]; then
    log "adding apt sources: bookworm deb-src, bullseye deb (pinned low)"
    $SUDO tee /etc/apt/sources.list.d/blocksmith-testbed.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    $SUDO tee /etc/apt/preferences.d/blocksmith-bullseye >/dev/null <<'PIN'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
  fi
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

kubernetes_binaries() {
  if [ -x "$K8S_BIN/kube-apiserver" ] && [ -x "$K8S_BIN/kube-controller-manager" ]; then
    return 0
  fi
  log "building kube-apiserver and kube-controller-manager $K8S_VERSION from Debian source (~5-10 min)"
  local work; work=$(mktemp -d "$CACHE/k8s-build.XXXXXX")
  (
    cd "$work"
    apt-get source --download-only kubernetes="$K8S_VERSION" >/dev/null 2>&1 \
      || apt-get source --download-only kubernetes >/dev/null
    tar xzf kubernetes_*.orig.tar.gz
    cd "$(find . -maxdepth 1 -mindepth 1 -type d | head -n1)"
    env -u GOPATH -u GO111MODULE -u GOFLAGS -u GOROOT PATH="/usr/lib/go-1.15/bin:$PATH" \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" KUBE_BUILD_PLATFORMS=linux/amd64 >build.log 2>&1 \
      || { tail -n 50 build.log >&2; exit 1; }
    mkdir -p "$K8S_BIN.tmp"
    cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$K8S_BIN.tmp/"
  )
  mv "$K8S_BIN.tmp" "$K8S_BIN"
  rm -rf "$work"
}

s3s_fs() {
  [ -x "$CACHE/bin/s3s-fs" ] && return 0
  log "cargo install s3s-fs@$S3S_VERSION (~2 min)"
  CARGO_TARGET_DIR="$CACHE/s3s-target" cargo install -q s3s-fs@"$S3S_VERSION" \
    --features binary --locked --root "$CACHE/s3s-root"
  cp "$CACHE/s3s-root/bin/s3s-fs" "$CACHE/bin/s3s-fs"
  rm -rf "$CACHE/s3s-target"
}

python_venv() {
  # pyarrow: an independent Parquet reader for the exactly-once audit.
  # helm-sdkpy: Helm v4's library, for chart lint/install (no helm binary in Debian).
  local venv="$CACHE/venv"
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import pyarrow, helm_sdkpy' 2>/dev/null && return 0
  log "creating python venv with pyarrow and helm-sdkpy"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check pyarrow
  # Its metadata asks for Python 3.12; it works on Debian 12's 3.11 (TESTBED.md, Helm).
  "$venv/bin/pip" install -q --disable-pip-version-check --ignore-requires-python helm-sdkpy==0.1.32
}

apt_packages
python_venv
s3s_fs
kubernetes_binaries
log "done; binaries in $K8S_BIN and $CACHE/bin"
