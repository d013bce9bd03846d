package guardian

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Client talks to a guardian's replicas. It tries them in turn, starting
// with the last that answered; a replica that cannot be reached, times out,
// or answers 5xx is skipped. A refusal (4xx) is the guardian's answer and is
// returned as an *Error at once. When every replica failed, it waits
// (growing from MinBackoff to MaxBackoff) and tries again until ctx ends.
type Client struct {
	// URLs are the replicas' base URLs, such as https://g1.example:8443.
	URLs []string
	// HTTP is the client to use; its TLS config holds the guardian CA.
	HTTP *http.Client
	// AttemptTimeout bounds one request to one replica (default 5 s).
	AttemptTimeout time.Duration
	// MinBackoff and MaxBackoff bound the pause between rounds (defaults
	// 100 ms and 2 s).
	MinBackoff, MaxBackoff time.Duration
	// Token, if set, is sent as a bearer token: the admin tools' token.
	Token string

	mu        sync.Mutex
	preferred int
}

// UnreachableError says that no replica answered before the deadline, and
// what each attempt met.
type UnreachableError struct {
	Op       string
	Attempts []Attempt
}

// Attempt is one failed request to one replica.
type Attempt struct {
	URL string
	Err error
}

func (e *UnreachableError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "guardian unreachable for %s: tried", e.Op)
	// The last error per URL is enough to name what is wrong.
	last := map[string]error{}
	var order []string
	for _, a := range e.Attempts {
		if _, ok := last[a.URL]; !ok {
			order = append(order, a.URL)
		}
		last[a.URL] = a.Err
	}
	for i, u := range order {
		if i > 0 {
			b.WriteString(";")
		}
		fmt.Fprintf(&b, " %s (%v)", u, last[u])
	}
	if len(order) == 0 {
		b.WriteString(" no URL")
	}
	return b.String()
}

// Nonce asks for a fresh nonce for host.
func (c *Client) Nonce(ctx context.Context, host string) (*NonceResponse, error) {
	var resp NonceResponse
	return &resp, c.call(ctx, http.MethodPost, PathNonce, &NonceRequest{Host: host}, &resp)
}

// Attest sends evidence and returns the health certificate.
func (c *Client) Attest(ctx context.Context, req *AttestRequest) (*AttestResponse, error) {
	var resp AttestResponse
	return &resp, c.call(ctx, http.MethodPost, PathAttest, req, &resp)
}

// Release asks for a VM's state key.
func (c *Client) Release(ctx context.Context, req *ReleaseRequest) (*ReleaseResponse, error) {
	var resp ReleaseResponse
	return &resp, c.call(ctx, http.MethodPost, PathRelease, req, &resp)
}

// Keys fetches the guardian's name and public encryption key.
func (c *Client) Keys(ctx context.Context) (*KeysResponse, error) {
	var resp KeysResponse
	return &resp, c.call(ctx, http.MethodGet, PathKeys, nil, &resp)
}

// Call sends one request (nil for none) to path with failover and decodes
// the answer into resp. The admin tools use it for their endpoints.
func (c *Client) Call(ctx context.Context, method, path string, req, resp any) error {
	return c.call(ctx, method, path, req, resp)
}

func (c *Client) call(ctx context.Context, method, path string, req, resp any) error {
	var body []byte
	if req != nil {
		var err error
		if body, err = marshal(req); err != nil {
			return err
		}
	}
	unreachable := &UnreachableError{Op: method + " " + path}
	if len(c.URLs) == 0 {
		return unreachable
	}
	backoff := orDefault(c.MinBackoff, 100*time.Millisecond)
	for {
		c.mu.Lock()
		start := c.preferred
		c.mu.Unlock()
		for i := range c.URLs {
			n := (start + i) % len(c.URLs)
			err := c.attempt(ctx, c.URLs[n], method, path, body, resp)
			var refusal *Error
			if err == nil || errors.As(err, &refusal) && refusal.Code != CodeUnavailable {
				c.mu.Lock()
				c.preferred = n
				c.mu.Unlock()
				return err
			}
			unreachable.Attempts = append(unreachable.Attempts, Attempt{URL: c.URLs[n], Err: err})
			if ctx.Err() != nil {
				return unreachable
			}
		}
		select {
		case <-ctx.Done():
			return unreachable
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, orDefault(c.MaxBackoff, 2*time.Second))
	}
}

// maxResponseSize bounds what a replica may answer.
const maxResponseSize = 1 << 20

func (c *Client) attempt(ctx context.Context, base, method, path string, body []byte, resp any) error {
	ctx, cancel := context.WithTimeout(ctx, orDefault(c.AttemptTimeout, 5*time.Second))
	defer cancel()
	var reqBody io.Reader
	if body != nil {
		reqBody = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(base, "/")+path, reqBody)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	httpClient := c.HTTP
	if httpClient == nil {
		httpClient = http.DefaultClient
	}
	r, err := httpClient.Do(req)
	if err != nil {
		return err
	}
	defer r.Body.Close()
	data, err := io.ReadAll(io.LimitReader(r.Body, maxResponseSize))
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	if r.StatusCode/100 != 2 {
		var refusal Error
		if json.Unmarshal(data, &refusal) == nil && refusal.Code != "" {
			if r.StatusCode >= 500 && refusal.Code != CodeUnavailable {
				return fmt.Errorf("HTTP %d: %v", r.StatusCode, &refusal) // a failing replica: try another
			}
			return &refusal
		}
		return fmt.Errorf("HTTP %d", r.StatusCode)
	}
	if err := json.Unmarshal(data, resp); err != nil {
		return fmt.Errorf("decode answer: %w", err)
	}
	return nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
