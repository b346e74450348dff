// Command classify sends images to classifyd (classifier.v1.Classifier) and prints the predictions.
//
// Built and run against a real daemon by tests/tools/test_go_client.py; ../../build.sh builds it from Debian's
// Go packages alone (see ../../README.md).
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"classifyd.example/client/go/classify"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is the command: 0 when every image was classified, 1 when one failed, 2 for a bad command line.
func run(args []string, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("classify", flag.ContinueOnError)
	flags.SetOutput(stderr)
	config := classify.Config{}
	options := classify.Options{}
	var topK int
	flags.StringVar(&config.Target, "target", "127.0.0.1:50051", "host:port, or dns:///name:port for every replica")
	flags.StringVar(&config.ServiceConfigFile, "service-config", "",
		"service config JSON to balance and retry with (deploy/client-service-config.json)")
	flags.StringVar(&config.CAFile, "tls-ca", "", "PEM CA of a daemon serving TLS (empty: plaintext)")
	flags.StringVar(&config.Token, "token", os.Getenv("CLASSIFYD_TOKEN"),
		"bearer token (default $CLASSIFYD_TOKEN)")
	flags.StringVar(&options.Model, "model", "", "model name (empty: the default model)")
	flags.Int64Var(&options.Version, "version", 0, "model version (0: the serving one)")
	flags.IntVar(&topK, "top-k", 3, "predictions per image")
	flags.StringVar(&options.Lang, "lang", "", "labels language (labels.<lang>.txt)")
	flags.StringVar(&options.RequestID, "request-id", "", "request id for the daemon's log (empty: one is made)")
	flags.StringVar(&options.Traceparent, "traceparent", "", "W3C trace context to continue (00-<trace>-<span>-01)")
	listModels := flags.Bool("models", false, "list the models instead of classifying")
	timeout := flags.Duration("timeout", 10*time.Second, "deadline of each call")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	options.TopK = int32(topK)
	if !*listModels && flags.NArg() == 0 {
		fmt.Fprintln(stderr, "usage: classify [flags] IMAGE... (or --models)")
		return 2
	}
	client, err := classify.Dial(config)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	defer client.Close()
	if *listModels {
		return printModels(client, *timeout, stdout, stderr)
	}
	for _, path := range flags.Args() {
		if code := classifyOne(client, path, options, *timeout, stdout, stderr); code != 0 {
			return code
		}
	}
	return 0
}

func classifyOne(client *classify.Client, path string, options classify.Options, timeout time.Duration,
	stdout, stderr io.Writer) int {
	image, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", path, err)
		return 1
	}
	ctx, cancel := classify.WithTimeout(timeout)
	defer cancel()
	response, err := client.Classify(ctx, image, options)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %s\n", path, classify.Describe(err))
		return 1
	}
	fmt.Fprintf(stdout, "%s: %s v%d (batch %d, request %s)\n", path, response.GetModel(), response.GetVersion(),
		response.GetBatchSize(), response.GetRequestId())
	for _, p := range response.GetPredictions() {
		fmt.Fprintf(stdout, "  %8.4f %6d  %s\n", p.GetScore(), p.GetIndex(), p.GetLabel())
	}
	return 0
}

func printModels(client *classify.Client, timeout time.Duration, stdout, stderr io.Writer) int {
	ctx, cancel := classify.WithTimeout(timeout)
	defer cancel()
	models, err := client.Models(ctx)
	if err != nil {
		fmt.Fprintln(stderr, classify.Describe(err))
		return 1
	}
	for _, model := range models {
		fmt.Fprintf(stdout, "%s (serving version %d, %d versions)\n", model.GetName(), model.GetServingVersion(),
			len(model.GetVersions()))
	}
	return 0
}
