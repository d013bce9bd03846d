package serve

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Client talks to a supervisor's admin API: what `vtpmd ctl` uses.
type Client struct {
	http *http.Client
}

// NewClient is a client of the admin socket at path.
func NewClient(path string) *Client {
	return &Client{http: &http.Client{
		Timeout: 60 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
		},
	}}
}

// APIError is an error reply of the admin API.
type APIError struct {
	// Code is the HTTP status.
	Code int
	// Message is the supervisor's explanation.
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("%s (HTTP %d)", e.Message, e.Code) }

// Metrics returns the Prometheus metrics, in the text format.
func (c *Client) Metrics() (string, error) {
	var text string
	err := c.do(http.MethodGet, "/metrics", nil, &text)
	return text, err
}

func (c *Client) do(method, path string, body, out any) error {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://vtpmd"+path, r)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("admin API: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("admin API: %w", err)
	}
	if resp.StatusCode >= 300 {
		var e apiError
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = string(bytes.TrimSpace(b))
		}
		return &APIError{Code: resp.StatusCode, Message: e.Error}
	}
	if text, ok := out.(*string); ok {
		*text = string(b)
		return nil
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("admin API: reply does not decode: %w", err)
		}
	}
	return nil
}

// Create registers a VM.
func (c *Client) Create(req CreateRequest) (Status, error) {
	var st Status
	err := c.do(http.MethodPost, "/v1/vms", req, &st)
	return st, err
}

// List reports every VM.
func (c *Client) List() ([]Status, error) {
	var list []Status
	err := c.do(http.MethodGet, "/v1/vms", nil, &list)
	return list, err
}

// VM reports one VM.
func (c *Client) VM(name string) (Status, error) {
	var st Status
	err := c.do(http.MethodGet, "/v1/vms/"+url.PathEscape(name), nil, &st)
	return st, err
}

// Start starts a VM's worker.
func (c *Client) Start(name string) (Status, error) {
	var st Status
	err := c.do(http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/start", nil, &st)
	return st, err
}

// Stop stops a VM's worker.
func (c *Client) Stop(name string) (Status, error) {
	var st Status
	err := c.do(http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/stop", nil, &st)
	return st, err
}

// Delete deletes a stopped VM.
func (c *Client) Delete(name string) error {
	return c.do(http.MethodDelete, "/v1/vms/"+url.PathEscape(name), nil, nil)
}
