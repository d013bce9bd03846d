# Build, test and lint vtpmd. CI runs `make test` from .ci/run.

GO ?= go
STATICCHECK ?= $(shell command -v staticcheck 2>/dev/null || ls "$$($(GO) env GOPATH)/bin/staticcheck" 2>/dev/null)

.PHONY: build test lint bench fuzz

build:
	$(GO) build -o bin/vtpmd ./cmd/vtpmd

# The end-to-end tests include QEMU guest boots (cmd/vtpmd/qemu_test.go),
# a few minutes on two cores under TCG.
test:
	$(GO) test -count=1 -timeout 25m ./...

lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then echo "gofmt -l reports:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	@if [ -n "$(STATICCHECK)" ]; then echo "$(STATICCHECK) ./..."; "$(STATICCHECK)" ./...; \
	else echo "staticcheck not installed (go install honnef.co/go/tools/cmd/staticcheck@latest); skipped"; fi

bench:
	$(GO) test -run '^$$' -bench . ./...

fuzz:
	$(GO) test ./fuzz/...
