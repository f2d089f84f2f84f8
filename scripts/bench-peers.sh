#!/usr/bin/env bash
# make bench-peers: msbtap against the kernel path, slirp4netns, pasta and
# gvproxy (gvisor-tap-vsock, built from its Go module), in one run. Installs the peers from Debian's packages when missing, builds
# msbtap and the test servers, and writes results/bench-peers.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-peers: run as root (or with sudo): make bench-peers" >&2; exit 1; }
missing=""
for p in slirp4netns passt iperf3 iproute2 iputils-ping; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
CGO_ENABLED=0 go build -o bin/msbtap ./cmd/msbtap
CGO_ENABLED=0 go build -o bin/testhost ./internal/testkit/testhost
GVTAP=github.com/containers/gvisor-tap-vsock
GVTAP_VERSION=${GVTAP_VERSION:-v0.8.9}
mkdir -p bin/peers
[ -x bin/peers/gvproxy ] && [ -x bin/peers/vm ] || \
  CGO_ENABLED=0 GOBIN="$PWD/bin/peers" go install "$GVTAP/cmd/gvproxy@$GVTAP_VERSION" "$GVTAP/cmd/vm@$GVTAP_VERSION"
go run ./internal/testkit/benchpeers "$@"
