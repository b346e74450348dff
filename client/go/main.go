// Command classify sends images to classifyd (classifier.v1.Classifier) and prints the predictions.
//
// Untested in this repository's CI (no Go toolchain there); see README.md for how to generate the
// stubs and run it.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	classifierv1 "classifyd.example/client/go/gen/classifier/v1"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "host:port, or dns:///name:port for every replica")
	model := flag.String("model", "", "model name (empty: the default model)")
	topK := flag.Int("top-k", 3, "predictions per image")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of each call")
	serviceConfig := flag.String("service-config", "",
		"service config JSON to balance and retry with (deploy/client-service-config.json)")
	flag.Parse()

	options := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if *serviceConfig != "" {
		config, err := os.ReadFile(*serviceConfig)
		if err != nil {
			log.Fatalf("service config: %v", err)
		}
		options = append(options, grpc.WithDefaultServiceConfig(string(config)))
	}
	conn, err := grpc.NewClient(*target, options...)
	if err != nil {
		log.Fatalf("connect %s: %v", *target, err)
	}
	defer conn.Close()
	client := classifierv1.NewClassifierClient(conn)

	for _, path := range flag.Args() {
		image, err := os.ReadFile(path)
		if err != nil {
			log.Fatalf("%s: %v", path, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		response, err := client.Classify(ctx, &classifierv1.ClassifyRequest{
			Model: *model,
			TopK:  int32(*topK),
			Input: &classifierv1.ClassifyRequest_Image{Image: image},
		})
		cancel()
		if err != nil {
			failure := status.Convert(err)
			log.Fatalf("%s: %s: %s", path, failure.Code(), failure.Message())
		}
		fmt.Printf("%s: %s v%d (batch %d)\n", path, response.GetModel(), response.GetVersion(), response.GetBatchSize())
		for _, p := range response.GetPredictions() {
			fmt.Printf("  %8.4f %6d  %s\n", p.GetScore(), p.GetIndex(), p.GetLabel())
		}
	}
}
