// Package classify is a small client library for classifyd's classifier.v1.Classifier service.
//
// It keeps to the grpc-go API that both Debian 12 (grpc-go 1.33) and Debian 13 (grpc-go 1.64) ship: grpc.Dial and
// grpc.WithInsecure, not grpc.NewClient and credentials/insecure, which grpc-go 1.33 lacks. The classifier.v1 stubs
// are generated at build time (see ../build.sh) into classifyd.example/client/go/gen/classifier/v1.
package classify

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	classifierv1 "classifyd.example/client/go/gen/classifier/v1"
)

// Config says how to reach the daemon.
type Config struct {
	// Target is host:port, or dns:///name:port for every replica behind a name.
	Target string
	// ServiceConfigFile is a gRPC service config (JSON) to balance and retry with, e.g.
	// deploy/client-service-config.json; empty for none.
	ServiceConfigFile string
	// CAFile is the PEM certificate authority of a daemon started with --tls-cert; empty for plaintext.
	CAFile string
	// Token is sent as "authorization: Bearer <token>" on every call (a daemon with --auth-token-file).
	Token string
}

// Options are the per-request fields of a ClassifyRequest.
type Options struct {
	Model     string // empty: the default model
	Version   int64  // 0: the serving version
	TopK      int32  // 0: the model's default
	Lang      string // labels.<lang>.txt; empty: labels.txt
	RequestID string // empty: the daemon makes one up
	// Traceparent is a W3C trace context ("00-<trace id>-<span id>-01") sent as gRPC metadata, so that a daemon
	// with tracing on continues the caller's trace; empty for none.
	Traceparent string
}

// Client is a connection to one daemon (or to the replicas behind a dns:/// target). Safe for concurrent use.
type Client struct {
	conn  *grpc.ClientConn
	stub  classifierv1.ClassifierClient
	token string
}

// Dial connects lazily: it returns at once, and the first call waits for the connection within its deadline.
// It fails only for a bad configuration (an unreadable service config or CA file).
func Dial(config Config) (*Client, error) {
	options := []grpc.DialOption{grpc.WithInsecure()}
	if config.CAFile != "" {
		creds, err := credentials.NewClientTLSFromFile(config.CAFile, "")
		if err != nil {
			return nil, fmt.Errorf("CA file: %w", err)
		}
		options = []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	}
	if config.ServiceConfigFile != "" {
		serviceConfig, err := os.ReadFile(config.ServiceConfigFile)
		if err != nil {
			return nil, fmt.Errorf("service config: %w", err)
		}
		options = append(options, grpc.WithDefaultServiceConfig(string(serviceConfig)))
	}
	conn, err := grpc.Dial(config.Target, options...)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", config.Target, err)
	}
	return &Client{conn: conn, stub: classifierv1.NewClassifierClient(conn), token: config.Token}, nil
}

// Close releases the connection.
func (c *Client) Close() error {
	return c.conn.Close()
}

// Classify sends one encoded image (PNG, JPEG, ...) and returns the daemon's answer. The error is a gRPC status
// error: Describe prints it.
func (c *Client) Classify(ctx context.Context, image []byte, options Options) (*classifierv1.ClassifyResponse, error) {
	request := &classifierv1.ClassifyRequest{
		Model:     options.Model,
		Version:   options.Version,
		TopK:      options.TopK,
		Lang:      options.Lang,
		RequestId: options.RequestID,
		Input:     &classifierv1.ClassifyRequest_Image{Image: image},
	}
	ctx = c.outgoing(ctx)
	if options.Traceparent != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", options.Traceparent)
	}
	return c.stub.Classify(ctx, request)
}

// Models lists the daemon's models with their versions and states.
func (c *Client) Models(ctx context.Context) ([]*classifierv1.ModelInfo, error) {
	response, err := c.stub.ListModels(c.outgoing(ctx), &classifierv1.ListModelsRequest{})
	if err != nil {
		return nil, err
	}
	return response.GetModels(), nil
}

func (c *Client) outgoing(ctx context.Context) context.Context {
	if c.token == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
}

// Describe is an error as "Code: message" (the daemon's codes are listed in docs/api.md).
func Describe(err error) string {
	failure := status.Convert(err)
	return fmt.Sprintf("%s: %s", failure.Code(), failure.Message())
}

// WithTimeout is context.WithTimeout from the background context, or the background context itself for 0.
func WithTimeout(timeout time.Duration) (context.Context, context.CancelFunc) {
	if timeout <= 0 {
		return context.WithCancel(context.Background())
	}
	return context.WithTimeout(context.Background(), timeout)
}
