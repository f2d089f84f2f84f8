# msbtap — see README.md. `sudo make demo` and `sudo make test` install what
# they need on a fresh Debian machine.

GO        ?= go
BIN       := bin/msbtap
UNIT_PKGS  = $(shell $(GO) list ./... | grep -v /tests/)
DEB_PKGS  := iproute2 curl dnsutils iputils-ping iperf3 util-linux procps ca-certificates qemu-system-x86

.PHONY: all build deps test unit integration bench bench-peers lint demo clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/msbtap

# deps installs the Debian packages the tests and the demo drive (when
# missing and when root) and downloads the Go modules.
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then echo "missing Debian packages:$$missing (run as root to install them)"; \
	  else echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi; \
	fi
	$(GO) mod download

test: deps lint unit integration

unit:
	$(GO) test -race -count=1 $(UNIT_PKGS)

integration:
	$(GO) test -count=1 -timeout 20m ./tests/...

bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./rings ./wake ./stack ./proxy ./policy

bench-peers: deps build
	./scripts/bench-peers.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

demo: deps build
	$(GO) build -o bin/testhost ./internal/testhost
	./scripts/demo.sh

clean:
	rm -rf bin results
