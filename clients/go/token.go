package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"
)

// tokenFile sends the caller's Kubernetes projected service-account token on every call, unary or a
// stream, as `authorization: Bearer <token>` (docs/authentication-clients.md): a
// credentials.PerRPCCredentials, given to the connection with grpc.WithPerRPCCredentials.
//
// The kubelet rotates the token by replacing the file, well before the old one expires. So every
// call stats the file, and reads it again only when its modification time or size changed: a stat
// per call is cheap, and the first call after a rotation already carries the new token.
type tokenFile struct {
	path string

	mu       sync.Mutex // guards the fields below: calls run concurrently
	token    string
	modified time.Time
	size     int64
}

func newTokenFile(path string) *tokenFile { return &tokenFile{path: path} }

// GetRequestMetadata is the metadata grpc-go adds to each call. An error fails the call with
// UNAUTHENTICATED, before anything is sent.
func (t *tokenFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	token, err := t.current()
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

// RequireTransportSecurity is false only so that this example also runs in plaintext, as CI runs
// it. Whoever reads a bearer token can use it until it expires: in production dial with TLS (-ca),
// and return true here so that grpc-go refuses to send the token over plaintext.
func (t *tokenFile) RequireTransportSecurity() bool { return false }

// current is the file's token, read again when the file changed since the last read.
func (t *tokenFile) current() (string, error) {
	info, err := os.Stat(t.path) // follows the kubelet's symlinks to the current file
	if err != nil {
		return "", err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.token != "" && info.ModTime().Equal(t.modified) && info.Size() == t.size {
		return t.token, nil
	}
	data, err := os.ReadFile(t.path)
	if err != nil {
		return "", err
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("the token file %s is empty", t.path)
	}
	// Replaced between the stat and the read? Then the next call sees another time and reads again.
	t.token, t.modified, t.size = token, info.ModTime(), info.Size()
	return token, nil
}
