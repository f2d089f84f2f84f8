#!/usr/bin/env bash
# msbtap demo: what msbtap does for a sandbox, in under a minute, against a
# self-contained test "internet".
#
#   host namespace  ── veth ──  internet namespace (198.51.100.0/24, 2001:db8::/32)
#     msbtap                      HTTP on 198.51.100.10, HTTPS on .11, DNS on .53
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
  [ -x "$b" ] || { echo "demo: $b not built (run: make build; go build -o bin/testhost ./internal/testkit/testhost)" >&2; exit 1; }
done
MSBTAP=$(realpath "$MSBTAP")
TESTHOST=$(realpath "$TESTHOST")

id=$$
HOST=msbdemo-host-$id
INET=msbdemo-inet-$id
GUEST=msbdemo-guest-$id
work=$(mktemp -d)
chmod 755 "$work"
agent_pid=""
server_pid=""
dl_pid=""

cleanup() {
  set +e
  [ -n "$dl_pid" ] && kill "$dl_pid" 2>/dev/null && wait "$dl_pid" 2>/dev/null
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

n=0
step() { n=$((n + 1)); printf '\n\033[1m== %d. %s\033[0m\n' "$n" "$*"; }
proves() { printf '\033[32m-> %s\033[0m\n' "$*"; }
fail() { printf '\033[31mdemo failed: %s\033[0m\n' "$*" >&2; exit 1; }
# sandbox runs a shell command line inside the sandbox, printing it first.
sandbox() { printf '[sandbox]$ %s\n' "$1"; ip netns exec "$GUEST" env $(cat "$work/secrets.env") sh -c "$1" 2>&1; }
# onhost runs a command on the host, printing it first.
onhost() { printf '[host]$ %s\n' "$*"; "$@"; }
# auditline prints the last decision-log line that has all the words.
auditline() {
  local l
  l=$(grep -F "$1" "$work/audit.log" | grep -F "${2:-}" | tail -1)
  [ -n "$l" ] || fail "no audit line with $1 $2"
  printf '[audit] %s\n' "$l"
}
s() { sed "s#$work#\$DEMO#g"; } # the work directory, shortened in what is shown

start=$(date +%s)

# --- the test internet -------------------------------------------------
for ns in $HOST $INET $GUEST; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add "mdh$id" type veth peer name "mdi$id"
ip link set "mdh$id" netns "$HOST" name up0
ip link set "mdi$id" netns "$INET" name eth0
ip -n "$HOST" addr add 198.51.100.1/24 dev up0
ip -n "$HOST" addr add 2001:db8::1/64 dev up0 nodad
ip -n "$INET" addr add 198.51.100.2/24 dev eth0
for a in 198.51.100.10/24 198.51.100.11/24 198.51.100.53/24; do ip -n "$INET" addr add $a dev eth0; done
ip -n "$INET" addr add 2001:db8::10/64 dev eth0 nodad
ip -n "$HOST" link set up0 up
ip -n "$INET" link set eth0 up
ip netns exec "$INET" "$TESTHOST" serve \
  --http 198.51.100.10:80 --http '[2001:db8::10]:80' --https 198.51.100.11:443 --dns 198.51.100.53:53 \
  --tls-names www.example.test,api.example.test --tls-ca-out "$work/internet-ca.pem" \
  --record www.example.test=198.51.100.10 --record www.example.test=2001:db8::10 \
  --record api.example.test=198.51.100.11 --record blocked.example.test=198.51.100.10 \
  --request-log "$work/server.log" --request-log-header Authorization \
  --ready "$work/ready" >"$work/testhost.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do [ -f "$work/ready" ] && break; sleep 0.05; done
[ -f "$work/ready" ] || fail "the test internet did not start: $(cat "$work/testhost.log")"

# --- msbtap --------------------------------------------------------------
cat >"$work/policy.json" <<'EOF'
{"default_action": "deny",
 "rules": [
   {"destination": {"domain": "www.example.test"}, "protocols": ["tcp"], "ports": [{"start": 80}], "action": "allow"},
   {"destination": {"domain": "blocked.example.test"}, "action": "deny"},
   {"destination": {"domain": "api.example.test"}, "protocols": ["tcp"], "ports": [{"start": 443}],
    "http": {"methods": ["GET"]}, "action": "allow"}
 ]}
EOF
token="sk-demo-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
mkdir -p "/etc/netns/$GUEST"
echo "nameserver 100.96.0.1" >"/etc/netns/$GUEST/resolv.conf"
: >"$work/secrets.env"
exec 3>"$work/ready-fd"
DEMO_TOKEN=$token ip netns exec "$HOST" "$MSBTAP" run --netns "$GUEST" --dns-upstream 198.51.100.53 \
  --policy "$work/policy.json" --audit-log "$work/audit.log" --control "$work/ctl.sock" \
  --secret DEMO_TOKEN@api.example.test --secrets-env-out "$work/secrets.env" \
  --tls-upstream-ca "$work/internet-ca.pem" --tls-ca-out "$work/msbtap-ca.pem" \
  --ready-fd 3 --log-level warn 2>"$work/msbtap.log" &
agent_pid=$!
exec 3>&-
for _ in $(seq 200); do grep -q ready "$work/ready-fd" 2>/dev/null && break; sleep 0.05; done
grep -q ready "$work/ready-fd" || fail "msbtap did not start: $(cat "$work/msbtap.log")"
echo "A sandbox (network namespace $GUEST) whose only network is msbtap, with this policy:"
"$MSBTAP" policy show "$work/policy.json" | sed -n '/^rules/,/^always/p' | grep -v '^always'
CA="--cacert $work/msbtap-ca.pem"

# --- the story -----------------------------------------------------------
step "A curl by name that works"
sandbox "curl -sS --max-time 10 http://www.example.test/" | tee "$work/get.out"
grep -q "hello from testhost www.example.test" "$work/get.out" || fail "curl by name did not work"
proves "the sandbox resolved the name through msbtap, rules[0] allowed it, and the flow left as msbtap's own socket"

step "One the policy refuses, and the audit line that says which rule"
if sandbox "curl -sS --max-time 5 http://blocked.example.test/"; then fail "blocked.example.test was reachable"; fi
auditline '"domain":"blocked.example.test"' '"action":"deny"' | s
proves "the name never resolved (NXDOMAIN), so no packet left; the decision log names the rule: rules[1]"

step "A secret: the sandbox holds a placeholder, the server gets the real value"
sandbox 'echo "DEMO_TOKEN in the sandbox: $DEMO_TOKEN"'
ph=$(cut -d= -f2- "$work/secrets.env")
[ -n "$ph" ] && [ "$ph" != "$token" ] || fail "no placeholder"
sandbox "curl -sS --max-time 10 $CA -H \"Authorization: Bearer \$DEMO_TOKEN\" https://api.example.test/" | s
got=$(grep -F "GET api.example.test / Authorization:" "$work/server.log" | tail -1)
printf '[server] received: %s\n' "$got"
[[ "$got" == *"Bearer $token" ]] || fail "the server did not receive the real value"
proves "msbtap swapped the real value in on the wire, for api.example.test only; the sandbox never had it"

step "An HTTP rule: GET is allowed, POST is refused"
sandbox "curl -sS --max-time 10 $CA -o /dev/null -w 'GET  -> %{http_code}\n' https://api.example.test/" | s
sandbox "curl -sS --max-time 10 $CA -o /dev/null -w 'POST -> %{http_code}\n' -X POST -d hi https://api.example.test/" | s | tee "$work/post.out"
grep -q "POST -> 403" "$work/post.out" || fail "the POST was not refused"
auditline '"method":"POST"' '"action":"deny"' | s
proves "rules[2] allows api.example.test for GET only: msbtap decides each request inside TLS; the POST fell through to default_action deny (403), logged"

step "A live view of the open flows"
ip netns exec "$GUEST" curl -s -o /dev/null --max-time 20 "http://www.example.test/drip?n=30000000" &
dl_pid=$!
for _ in $(seq 40); do "$MSBTAP" ctl --control "$work/ctl.sock" flows 2>/dev/null | grep -q ':80 ' && break; sleep 0.1; done
sleep 1
onhost "$MSBTAP" ctl --control "$work/ctl.sock" flows | s
"$MSBTAP" ctl --control "$work/ctl.sock" flows | grep -q "198.51.100.10:80" || fail "the download is not listed"
proves "every open flow, with its rule and bytes each way, from the control socket (msbtap ctl top for a live view, x to close one)"
kill "$dl_pid" 2>/dev/null; wait "$dl_pid" 2>/dev/null || true; dl_pid=""

step "How fast"
chart=${BENCH_CHART:-results/bench-peers.png}
if [ -f "$chart" ]; then
  echo "msbtap against the kernel path, slirp4netns, pasta and gvproxy: $(realpath "$chart")"
  proves "the chart of the last make bench-peers run (the numbers beside it, in bench-peers.json)"
else
  echo "no results/bench-peers.png yet: make bench-peers measures msbtap against the kernel path, slirp4netns, pasta and gvproxy and draws it"
fi

printf '\n\033[1mDone in %ss: every flow above left the host as msbtap'"'"'s own socket; cleaning up.\033[0m\n' "$(($(date +%s) - start))"
