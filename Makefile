# msbtap — see README.md. `make demo` and `make test`, as root (or with sudo), install what
# they need on a fresh Debian machine.

GO        ?= go
BIN       := bin/msbtap
UNIT_PKGS  = $(shell $(GO) list ./... | grep -v /tests/)
DEB_PKGS  := iproute2 curl dnsutils iputils-ping iperf3 util-linux procps ca-certificates qemu-system-x86 tcpdump python3 \
	containerd runc podman containernetworking-plugins busybox-static microsocks tinyproxy-bin tmux \
	gcc libc6-dev
# crictl drives containerd's CRI plugin in the engine tests as the kubelet
# does; v1.34.0 talks to Debian's containerd 1.6. Built from its Go module.
CRICTL_VERSION := v1.34.0

PREFIX    ?= /usr/local
DESTDIR   ?=

.PHONY: all build deps test unit integration stress stress-short fuzz bench bench-peers lint demo clean man install install-cni

all: build

# CGO_ENABLED=0: a static binary. (A cgo build, which go install makes
# where a C compiler is, drops its privileges on every thread too, through
# libcap's psx.)
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/msbtap
	CGO_ENABLED=0 $(GO) build -o bin/msbtap-cni ./cmd/msbtap-cni

# deps installs the Debian packages the tests and the demo drive (when
# missing and when root) and downloads the Go modules. npm is Debian's
# unless the machine has one (NodeSource's nodejs bundles its own and
# conflicts with Debian's npm).
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then echo "missing Debian packages:$$missing (run as root to install them)"; \
	  else echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi; \
	fi
	$(GO) mod download
	@if [ "$$(id -u)" -eq 0 ] && ! $(GO) version -m /usr/local/bin/crictl 2>/dev/null | grep -q "cri-tools[[:space:]]*$(CRICTL_VERSION)"; then \
	  echo "installing crictl $(CRICTL_VERSION)"; \
	  GOBIN=/usr/local/bin GOFLAGS= $(GO) install sigs.k8s.io/cri-tools/cmd/crictl@$(CRICTL_VERSION); \
	fi

test: deps lint unit fuzz integration stress-short

# The allocation tests skip under -race (its instrumentation allocates):
# they run once more without it.
unit:
	$(GO) test -race -count=1 $(UNIT_PKGS)
	$(GO) test -count=1 -run 'AllocatesNothing' ./stack

integration:
	$(GO) test -count=1 -timeout 20m ./tests/integration

# stress puts a hostile sandbox's floods, churn and faults on the agent
# and reports its memory, goroutines, descriptors and whether legitimate
# traffic survived; stress-short is the version make test runs.
stress: deps
	@mkdir -p results
	MSBTAP_STRESS=full MSBTAP_STRESS_REPORT=$(CURDIR)/results/stress.md $(GO) test -count=1 -timeout 60m -run TestStress ./tests/stress

stress-short:
	@mkdir -p results
	MSBTAP_STRESS=short MSBTAP_STRESS_REPORT=$(CURDIR)/results/stress-short.md $(GO) test -count=1 -timeout 20m -run TestStress ./tests/stress
	@cat results/stress-short.md

# fuzz runs every fuzz target of a parser of guest or user input for
# FUZZTIME each (the seed corpora are in each package's testdata/fuzz).
# The budget is a count of executions, not a duration: Go 1.26's fuzz
# coordinator can report a bare "context deadline exceeded" failure when a
# duration ends while a worker is busy (golang/go#75804, fixed in 1.27), which
# failed CI once on a loaded machine with no failing input. A count has no
# deadline to race; 20000 runs take 1.5-6 s per target here.
FUZZTIME ?= 20000x
FUZZ_TARGETS := ./stack:FuzzHandleFrame ./stack:FuzzDHCP ./wire:FuzzParse ./wire:FuzzReassemble ./tcpfast:FuzzGuestSegments \
	./tap:FuzzVNetHdr ./dnsproxy:FuzzDNSQuery ./policy:FuzzParseFile ./internal/portspec:FuzzParse ./inspect:FuzzClassify ./policy:FuzzNormalizeName
fuzz:
	@log=$$(mktemp); trap 'rm -f $$log' EXIT; \
	for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; name=$${t##*:}; \
	  echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
	  $(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg >$$log 2>&1 || { cat $$log; exit 1; }; \
	done

# bench also measures start-up (as root): the median of 20 starts of
# `msbtap run --netns X --ready-fd 3`, from exec to ready.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./rings ./wake ./stack ./proxy ./policy ./intercept ./secrets
	$(GO) test -run '^$$' -bench Startup -benchtime 20x -count 1 ./tests/startup
	MSBTAP_BENCH=1 $(GO) test -count=1 -v -run '^TestCNIAddTimeVsBridge$$' ./tests/integration | grep -E 'ADD,|^(ok|FAIL|---)'

bench-peers: deps build
	./scripts/bench-peers.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

demo: deps build
	CGO_ENABLED=0 $(GO) build -o bin/testhost ./internal/testkit/testhost
	./scripts/demo.sh

# man regenerates docs/msbtap.1 from the flag definitions (a unit test fails
# when it is stale).
man:
	$(GO) run ./cmd/msbtap man > docs/msbtap.1

# install puts msbtap, its man page and its shell completions under PREFIX.
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/msbtap
	install -D -m 0644 docs/msbtap.1 $(DESTDIR)$(PREFIX)/share/man/man1/msbtap.1
	$(BIN) completion bash | install -D -m 0644 /dev/stdin $(DESTDIR)$(PREFIX)/share/bash-completion/completions/msbtap
	$(BIN) completion zsh | install -D -m 0644 /dev/stdin $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_msbtap
	$(BIN) completion fish | install -D -m 0644 /dev/stdin $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/msbtap.fish

# install-cni puts the plugin and the agent side by side in the CNI
# plugin directory, where containerd and CRI-O look (CNI_BIN_DIR).
CNI_BIN_DIR ?= /opt/cni/bin
install-cni: build
	install -D -m 0755 bin/msbtap-cni $(DESTDIR)$(CNI_BIN_DIR)/msbtap-cni
	install -D -m 0755 $(BIN) $(DESTDIR)$(CNI_BIN_DIR)/msbtap

clean:
	rm -rf bin results
