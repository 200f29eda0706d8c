#!/usr/bin/env bash
# Installs everything the local testbed needs, once, and caches slow builds under
# $BLOCKSMITH_CACHE (default ~/.cache/blocksmith). Safe to run repeatedly: each step is
# skipped when its result is already present.
set -euo pipefail

CACHE="${BLOCKSMITH_CACHE:-$HOME/.cache/blocksmith}"
# shellcheck source=e2e/scripts/versions.sh
source "$(dirname "${BASH_SOURCE[0]}")/versions.sh"
K8S_BIN="$CACHE/kubernetes-$K8S_VERSION"
K8S_BINARIES="kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet"
mkdir -p "$CACHE/bin"

log() { echo "[install] $*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# The Debian mirror this machine already uses for bookworm (a user behind a local mirror has
# only that one), from deb822 .sources files or one-line sources.list entries.
debian_mirror() {
  local m
  m=$(python3 - <<'PY'
import glob, re
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        f = dict(re.findall(r"^(\S+):\s*(.*)$", stanza, re.M))
        if "deb" in f.get("Types", "").split() and "bookworm" in f.get("Suites", "").split() \
                and "security" not in f.get("URIs", ""):
            print(f["URIs"].split()[0]); raise SystemExit
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try: lines = open(path).read().splitlines()
    except OSError: continue
    for line in lines:
        w = re.sub(r"\[[^]]*\]", "", line).split()
        if len(w) >= 3 and w[0] == "deb" and w[2] == "bookworm":
            print(w[1]); raise SystemExit
PY
)
  echo "${m:-http://deb.debian.org/debian}"
}

apt_packages() {
  local missing=()
  # containerd, runc, CNI plugins: the testbed's node; buildah: images without a Docker engine;
  # iptables: the node's forward guard; libc6-dev: the static pause binary.
  for p in etcd-server golang-1.15-go rsync cmake openssl iproute2 python3-venv curl libcurl4-openssl-dev libssl-dev pkg-config gettext-base \
           containerd runc containernetworking-plugins buildah iptables libc6-dev conntrack; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ ! -f /etc/apt/sources.list.d/blocksmith-testbed.sources ]; then
    local mirror; mirror=$(debian_mirror)
    log "adding apt sources from $mirror: bookworm deb-src, bullseye deb (pinned low)"
    $SUDO tee /etc/apt/sources.list.d/blocksmith-testbed.sources >/dev/null <<SRC
Types: deb-src
URIs: $mirror
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $mirror
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
  local b have=1
  for b in $K8S_BINARIES pause; do [ -x "$K8S_BIN/$b" ] || have=0; done
  [ "$have" = 1 ] && return 0
  log "building $K8S_BINARIES and pause $K8S_VERSION from Debian source (~10-15 min)"
  local work; work=$(mktemp -d "$CACHE/k8s-build.XXXXXX")
  (
    cd "$work"
    apt-get source --download-only kubernetes="$K8S_VERSION" >/dev/null 2>&1 \
      || apt-get source --download-only kubernetes >/dev/null
    tar xzf kubernetes_*.orig.tar.gz
    cd "$(find . -maxdepth 1 -mindepth 1 -type d | head -n1)"
    env -u GOPATH -u GO111MODULE -u GOFLAGS -u GOROOT PATH="/usr/lib/go-1.15/bin:$PATH" \
      make WHAT="$(for b in $K8S_BINARIES; do printf 'cmd/%s ' "$b"; done)" KUBE_BUILD_PLATFORMS=linux/amd64 >build.log 2>&1 \
      || { tail -n 50 build.log >&2; exit 1; }
    rm -rf "$K8S_BIN.tmp"; mkdir -p "$K8S_BIN.tmp"
    for b in $K8S_BINARIES; do cp "_output/bin/$b" "$K8S_BIN.tmp/"; done
    # The pod sandbox ("pause") image's one binary, static, from the same source tree.
    gcc -Os -static -DVERSION=v3.4.1-blocksmith -o "$K8S_BIN.tmp/pause" build/pause/linux/pause.c
    strip "$K8S_BIN.tmp/pause"
  )
  rm -rf "$K8S_BIN"
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

promtool() {
  # The chart test checks and unit-tests the PrometheusRule's alerts with promtool, taken out
  # of Debian's prometheus package without installing it (nor starting its daemon).
  [ -x "$CACHE/bin/promtool" ] && return 0
  log "extracting promtool from Debian's prometheus package"
  local work; work=$(mktemp -d "$CACHE/promtool.XXXXXX")
  (
    cd "$work"
    apt-get download prometheus >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-get download prometheus >/dev/null; }
    dpkg-deb -x prometheus_*.deb root
    cp root/usr/bin/promtool "$CACHE/bin/promtool.tmp"
  )
  mv "$CACHE/bin/promtool.tmp" "$CACHE/bin/promtool"
  rm -rf "$work"
}

python_venv() {
  # pyarrow: an independent Parquet reader for the exactly-once audit.
  # helm-sdkpy: Helm v4's library, for chart lint/install (no helm binary in Debian).
  # prometheus-client: the Prometheus project's strict OpenMetrics parser, for the scrapes.
  local venv="$CACHE/venv"
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import pyarrow, helm_sdkpy, prometheus_client' 2>/dev/null && return 0
  log "creating python venv with pyarrow, helm-sdkpy and prometheus-client"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check pyarrow prometheus-client==0.21.1
  # Its metadata asks for Python 3.12; it works on Debian 12's 3.11 (README.md, "Known limits
  # of the local testbed").
  "$venv/bin/pip" install -q --disable-pip-version-check --ignore-requires-python helm-sdkpy==0.1.32
}

apt_packages
python_venv
s3s_fs
promtool
kubernetes_binaries
log "done; binaries in $K8S_BIN and $CACHE/bin"
