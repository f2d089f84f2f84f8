#!/usr/bin/env bash
# msbtap demo: a self-contained sandbox with a local test "internet".
#
#   host namespace  ── veth ──  internet namespace (198.51.100.0/24, 2001:db8::/32)
#     msbtap                      HTTP on 198.51.100.10, DNS on 198.51.100.53
#       │ TAP
#   sandbox namespace (eth0 100.96.0.2, gateway 100.96.0.1)
#
# The "host" is a namespace of its own so the demo never touches this
# machine's routes. Everything is removed on exit. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (or with sudo): make demo" >&2; exit 1; }
MSBTAP=${MSBTAP:-bin/msbtap}
TESTHOST=${TESTHOST:-bin/testhost}
for b in "$MSBTAP" "$TESTHOST"; do
  [ -x "$b" ] || { echo "demo: $b not built (run: make build; go build -o bin/testhost ./internal/testhost)" >&2; exit 1; }
done

id=$$
HOST=msbdemo-host-$id
INET=msbdemo-inet-$id
GUEST=msbdemo-guest-$id
work=$(mktemp -d)
agent_pid=""
server_pid=""

cleanup() {
  set +e
  [ -n "$agent_pid" ] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  for ns in $GUEST $INET $HOST; do
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "/etc/netns/$GUEST" "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_guest() { printf '$ %s\n' "$*"; ip netns exec "$GUEST" "$@"; }

step "Building a local test internet"
for ns in $HOST $INET $GUEST; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add "mdh$id" type veth peer name "mdi$id"
ip link set "mdh$id" netns "$HOST" name up0
ip link set "mdi$id" netns "$INET" name eth0
ip -n "$HOST" addr add 198.51.100.1/24 dev up0
ip -n "$HOST" addr add 2001:db8::1/64 dev up0 nodad
ip -n "$INET" addr add 198.51.100.2/24 dev eth0
for a in 198.51.100.10/24 198.51.100.53/24; do ip -n "$INET" addr add $a dev eth0; done
ip -n "$INET" addr add 2001:db8::10/64 dev eth0 nodad
ip -n "$HOST" link set up0 up
ip -n "$INET" link set eth0 up
ip netns exec "$INET" "$TESTHOST" serve \
  --http 198.51.100.10:80 --http '[2001:db8::10]:80' --dns 198.51.100.53:53 \
  --record www.example.test=198.51.100.10 --record www.example.test=2001:db8::10 \
  --ready "$work/ready" >"$work/testhost.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do [ -f "$work/ready" ] && break; sleep 0.05; done
echo "internet: HTTP on 198.51.100.10 and [2001:db8::10], DNS on 198.51.100.53 (www.example.test)"

step "Starting msbtap for the sandbox"
mkdir -p "/etc/netns/$GUEST"
echo "nameserver 100.96.0.1" >"/etc/netns/$GUEST/resolv.conf"
exec 3>"$work/ready-fd"
ip netns exec "$HOST" "$MSBTAP" run --netns "$GUEST" --dns-upstream 198.51.100.53 \
  --ready-fd 3 --log-level warn 2>"$work/msbtap.log" &
agent_pid=$!
exec 3>&-
for _ in $(seq 200); do grep -q ready "$work/ready-fd" 2>/dev/null && break; sleep 0.05; done
grep -q ready "$work/ready-fd" || { echo "msbtap did not start:"; cat "$work/msbtap.log"; exit 1; }
in_guest ip -br addr show eth0
in_guest ip route

step "Name resolution (the gateway answers, forwarding to the test DNS server)"
in_guest dig +short www.example.test A
in_guest dig +short www.example.test AAAA

step "HTTP fetch by name, IPv4 and IPv6"
in_guest curl -sS -4 --max-time 10 http://www.example.test/
in_guest curl -sS -6 --max-time 10 http://www.example.test/

step "Ping a test host, IPv4 and IPv6"
in_guest ping -c 2 -i 0.3 198.51.100.10
in_guest ping -6 -c 2 -i 0.3 2001:db8::10

step "The gateway answers its own ping; the default policy (public-only) refuses the host and cloud metadata"
in_guest ping -c 1 -W 1 100.96.0.1
in_guest curl -sS --max-time 3 http://169.254.169.254/latest/meta-data/ || true
in_guest curl -sS --max-time 3 http://100.96.0.1:22/ || true

step "Done: every flow above left the host as msbtap's own socket; cleaning up"
