# Build, run, test and lint vtpmd. CI (.ci/run) installs the packages and
# runs `make test`.

GO ?= go
STATICCHECK ?= $(shell command -v staticcheck 2>/dev/null || ls "$$($(GO) env GOPATH)/bin/staticcheck" 2>/dev/null)

# Debian packages. Keep TEST_PACKAGES in step with .ci/run.
BUILD_PACKAGES = gcc libssl-dev
TEST_PACKAGES = $(BUILD_PACKAGES) qemu-system-x86 seabios ovmf \
	swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0 \
	busybox-static cpio socat xz-utils \
	libvirt-daemon-system libvirt-clients etcd-server

.PHONY: build run deps build-deps test lint bench fuzz install uninstall

# make install puts vtpmd in $(BINDIR) with the names libvirt looks for on
# PATH (swtpm, swtpm_setup, swtpm_ioctl) linked to it: a multi-call binary.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SWTPM_NAMES = swtpm swtpm_setup swtpm_ioctl

# apt_ensure installs the packages in $(1) that are not installed yet (as
# root; others are told what is missing).
define apt_ensure
	@missing=""; \
	for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "not installed:$$missing (install them as root)"; exit 0; fi; \
	echo "apt-get install$$missing"; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing
endef

build-deps:
	$(call apt_ensure,$(BUILD_PACKAGES))

deps:
	$(call apt_ensure,$(TEST_PACKAGES))

build:
	$(GO) build -o bin/vtpmd ./cmd/vtpmd
	$(GO) build -o bin/vtpmd-guardian ./cmd/vtpmd-guardian

install: build
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 bin/vtpmd $(DESTDIR)$(BINDIR)/vtpmd
	install -m 0755 bin/vtpmd-guardian $(DESTDIR)$(BINDIR)/vtpmd-guardian
	for name in $(SWTPM_NAMES); do ln -sf vtpmd $(DESTDIR)$(BINDIR)/$$name; done

uninstall:
	for name in vtpmd vtpmd-guardian $(SWTPM_NAMES); do rm -f $(DESTDIR)$(BINDIR)/$$name; done

# Serve one TPM for QEMU and print the QEMU arguments to use it.
run: build-deps build
	./bin/vtpmd qemu

# The end-to-end tests include QEMU guest boots (cmd/vtpmd/qemu_test.go),
# about two minutes on two cores under TCG.
test: deps
	$(GO) test -count=1 -timeout 25m ./...
	$(GO) test -count=1 -race ./transport/... ./vtpm/... ./state/... ./sealing/...

lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then echo "gofmt -l reports:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	@if [ -n "$(STATICCHECK)" ]; then echo "$(STATICCHECK) ./..."; "$(STATICCHECK)" ./...; \
	else echo "staticcheck not installed (go install honnef.co/go/tools/cmd/staticcheck@latest); skipped"; fi

# Benchmarks, without pass/fail on speed: the Go benchmarks of the in-process
# paths (control codec, data framing, engine round trip, provisioning), then
# a short run of bench/ (vtpmbench: vtpmd, vtpmd serve and swtpm side by
# side, with the echo and engine floors, the provisioning time of vtpmd
# setup against swtpm_setup, and the guardian's share of a VM's start with
# one replica and with three on etcd), one to two and a half minutes in all
# on two cores, depending on other load. Results (markdown, SVG, JSON) go to ./results. `make
# bench-full` is the full run (1 to 256 VMs, every operation, 8 to 13
# minutes); bench/RESULTS.md holds one.
BENCH_FLAGS ?= -vms 1,4,16 -duration 1s -warmup 200ms -starts 3 -engine-duration 200ms -setup-runs 5 -guardian-runs 5 -serve \
	-ops getrandom,pcrextend,nvwrite,nvincrement,signecc
# Only the packages that have benchmarks, so the end-to-end test binaries are
# not built for nothing.
BENCH_PKGS = $(sort $(dir $(shell grep -rl --include='*_test.go' '^func Benchmark' .)))
bench: build
	$(GO) test -run '^$$' -bench . -benchtime 200ms $(BENCH_PKGS)
	$(GO) build -o bin/vtpmbench ./bench/cmd/vtpmbench
	./bin/vtpmbench -vtpmd bin/vtpmd $(BENCH_FLAGS)

.PHONY: bench-full
bench-full: build
	$(GO) build -o bin/vtpmbench ./bench/cmd/vtpmbench
	./bin/vtpmbench -vtpmd bin/vtpmd -vms 1,4,16,64,256 -ops all -duration 2s -rounds 2 -starts 15 -setup-runs 20 -guardian-runs 20 -serve

# Every fuzz target in fuzz/, one at a time (go test takes one -fuzz target
# per run), FUZZTIME each, or FUZZBUDGET seconds shared among them so that
# the run stays within about three minutes as targets are added. Plain
# `go test ./...` runs their seed corpora. A failure leaves its input in
# fuzz/testdata/fuzz/<target>/. Minimizing a new input is cut short: with
# the default of a minute, the 16 KiB state images and large blobs would
# keep the workers from fuzzing at all. Go 1.26's coordinator may report
# "context deadline exceeded" at the end of -fuzztime without a failing
# input (go.dev/issue/75804): that is not counted as a failure.
FUZZTIME ?=
FUZZBUDGET ?= 140
FUZZMINIMIZETIME ?= 2s
fuzz:
	@targets="$$($(GO) test -list '^Fuzz' ./fuzz | grep '^Fuzz')" || exit 1; \
	n=$$(echo "$$targets" | wc -l); \
	fuzztime="$(FUZZTIME)"; [ -n "$$fuzztime" ] || fuzztime="$$(( $(FUZZBUDGET) / n > 5 ? $(FUZZBUDGET) / n : 5 ))s"; \
	log=$$(mktemp); status=$$(mktemp); trap 'rm -f "$$log" "$$status"' EXIT; \
	for target in $$targets; do \
		echo "$(GO) test ./fuzz -run '^$$' -fuzz '^$$target\$$' -fuzztime $$fuzztime -fuzzminimizetime $(FUZZMINIMIZETIME)"; \
		{ $(GO) test ./fuzz -run '^$$' -fuzz "^$$target\$$" -fuzztime $$fuzztime -fuzzminimizetime $(FUZZMINIMIZETIME) 2>&1; \
		  echo $$? >"$$status"; } | tee "$$log"; \
		[ "$$(cat "$$status")" = 0 ] && continue; \
		if grep -q 'context deadline exceeded' "$$log" && ! grep -q 'Failing input written' "$$log"; then \
			echo "$$target: coordinator deadline race (go.dev/issue/75804), no failing input: not a failure"; \
		else \
			exit 1; \
		fi; \
	done
