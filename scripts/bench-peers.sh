#!/usr/bin/env bash
# make bench-peers: msbtap against the kernel path, slirp4netns and pasta,
# in one run. Installs the peers from Debian's packages when missing, builds
# msbtap and the test servers, and writes results/bench-peers.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-peers: run as root (or with sudo): make bench-peers" >&2; exit 1; }
missing=""
for p in slirp4netns passt iperf3 iproute2; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
CGO_ENABLED=0 go build -o bin/msbtap ./cmd/msbtap
CGO_ENABLED=0 go build -o bin/testhost ./internal/testhost
go run ./internal/benchpeers "$@"
