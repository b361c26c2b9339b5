// kubelet-dra-manager, Kubernetes 1.37 edition: the same as ../pluginmanager/main.go against the
// code kubelet v1.37.2 runs (k8s.io/kubernetes/pkg/kubelet/cm/dra/plugin), whose API changed: the
// manager's calls take a context, and its stream handler gets the dra-health v1 client (a plugin
// serving v1alpha1 is wrapped). Since 1.37 the manager opens the DRAResourceHealth stream only
// to a plugin that lists the service ("v1.DRAResourceHealth" or "v1alpha1.DRAResourceHealth")
// among the supported versions of its registration. Each response the manager's stream
// handler receives is printed as one JSON line; a stream error as {"error": "..."} (kubelet logs
// it and retries every 5 s). kubelet's own log lines go to stderr (-v 4). Built by the test suite;
// never shipped.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
	drahealth "k8s.io/kubelet/pkg/apis/dra-health/v1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	draplugin "k8s.io/kubernetes/pkg/kubelet/cm/dra/plugin"
)

type printer struct{ mu sync.Mutex }

func (p *printer) line(v any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	_ = json.NewEncoder(os.Stdout).Encode(v)
}

// HandleWatchResourcesStream implements kubelet's draplugin.StreamHandler.
func (p *printer) HandleWatchResourcesStream(ctx context.Context, stream drahealth.DRAResourceHealth_NodeWatchResourcesClient, driver string) error {
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() == nil {
				p.line(map[string]string{"error": err.Error()})
			}
			return err
		}
		devices := []map[string]any{}
		for _, d := range resp.GetDevices() {
			devices = append(devices, map[string]any{
				"pool":    d.GetDevice().GetPoolName(),
				"device":  d.GetDevice().GetDeviceName(),
				"health":  d.GetHealth().String(),
				"message": d.GetMessage(),
			})
		}
		p.line(map[string]any{"driver": driver, "devices": devices})
	}
}

func main() {
	klog.InitFlags(nil)
	registration := flag.String("registration", "", "the plugin's registration socket")
	duration := flag.Duration("duration", 30*time.Second, "how long to run")
	flag.Parse()

	conn, err := grpc.NewClient("unix://"+*registration, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintf(os.Stderr, "dial: %v\n", err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *duration)
	defer cancel()
	info, err := registerapi.NewRegistrationClient(conn).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "GetInfo: %v\n", err)
		os.Exit(1)
	}
	getNode := func(context.Context) (*v1.Node, error) { return &v1.Node{}, nil }
	manager := draplugin.NewDRAPluginManager(ctx, nil, getNode, &printer{}, 0)
	if err := manager.ValidatePlugin(ctx, info.Name, info.Endpoint, info.SupportedVersions); err != nil {
		fmt.Fprintf(os.Stderr, "ValidatePlugin: %v\n", err)
		os.Exit(1)
	}
	if err := manager.RegisterPlugin(ctx, info.Name, info.Endpoint, info.SupportedVersions, nil); err != nil {
		fmt.Fprintf(os.Stderr, "RegisterPlugin: %v\n", err)
		os.Exit(1)
	}
	<-ctx.Done()
	manager.Stop()
	klog.Flush()
}
