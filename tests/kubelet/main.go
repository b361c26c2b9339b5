// kubelet-driver plays the kubelet's side of the DRA plugin protocol with kubelet's own generated
// gRPC clients (k8s.io/kubelet/pkg/apis/pluginregistration/v1 and .../dra/v1): it reads the
// plugin's registration socket, checks what GetInfo says, acknowledges the registration, dials
// the endpoint it was given and calls NodePrepareResources or NodeUnprepareResources for one
// claim, printing the response as JSON; or (-op watch-health) calls the DRA resource-health
// service's NodeWatchResources with kubelet's own client (.../dra-health/v1alpha1) and prints each
// response as one JSON line, until -duration has passed. Built by the test suite; never shipped.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	drahealth "k8s.io/kubelet/pkg/apis/dra-health/v1alpha1"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kubelet-driver: "+format+"\n", args...)
	os.Exit(1)
}

func dial(path string) *grpc.ClientConn {
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail("dial %s: %v", path, err)
	}
	return conn
}

func main() {
	registration := flag.String("registration", "", "the plugin's registration socket")
	driver := flag.String("driver", "", "the driver name the plugin must announce")
	op := flag.String("op", "prepare", "prepare | unprepare | info | watch-health")
	duration := flag.Duration("duration", 60*time.Second, "how long watch-health watches")
	namespace := flag.String("namespace", "default", "claim namespace")
	name := flag.String("name", "", "claim name")
	uid := flag.String("uid", "", "claim uid")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second) // kubelet's call timeout
	defer cancel()

	regConn := dial(*registration)
	defer regConn.Close()
	reg := registerapi.NewRegistrationClient(regConn)
	info, err := reg.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		fail("GetInfo: %v", err)
	}
	if info.Type != registerapi.DRAPlugin || info.Name != *driver {
		fail("GetInfo says type %q name %q, want %q %q", info.Type, info.Name, registerapi.DRAPlugin, *driver)
	}
	v1 := false
	for _, v := range info.SupportedVersions {
		if v == drapb.DRAPluginService {
			v1 = true
		}
	}
	if !v1 {
		fail("plugin does not offer %s: %v", drapb.DRAPluginService, info.SupportedVersions)
	}
	if _, err := reg.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		fail("NotifyRegistrationStatus: %v", err)
	}
	if *op == "info" {
		_ = json.NewEncoder(os.Stdout).Encode(info)
		return
	}

	draConn := dial(info.Endpoint)
	defer draConn.Close()
	if *op == "watch-health" {
		watchHealth(draConn, *duration)
		return
	}
	dra := drapb.NewDRAPluginClient(draConn)
	claims := []*drapb.Claim{{Namespace: *namespace, Name: *name, Uid: *uid}}
	var out any
	switch *op {
	case "prepare":
		out, err = dra.NodePrepareResources(ctx, &drapb.NodePrepareResourcesRequest{Claims: claims})
	case "unprepare":
		out, err = dra.NodeUnprepareResources(ctx, &drapb.NodeUnprepareResourcesRequest{Claims: claims})
	default:
		fail("unknown -op %q", *op)
	}
	if err != nil {
		fail("%s: %v", *op, err)
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

type deviceHealth struct {
	Pool    string `json:"pool"`
	Device  string `json:"device"`
	Health  string `json:"health"`
	Message string `json:"message"`
	Updated int64  `json:"updated"`
	Timeout int64  `json:"timeout"`
}

// watchHealth prints every NodeWatchResources response as a JSON line, as it arrives.
func watchHealth(conn *grpc.ClientConn, duration time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	stream, err := drahealth.NewDRAResourceHealthClient(conn).NodeWatchResources(ctx, &drahealth.NodeWatchResourcesRequest{})
	if err != nil {
		fail("NodeWatchResources: %v", err)
	}
	out := json.NewEncoder(os.Stdout)
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			fail("NodeWatchResources stream: %v", err)
		}
		devices := []deviceHealth{}
		for _, d := range resp.GetDevices() {
			devices = append(devices, deviceHealth{
				Pool:    d.GetDevice().GetPoolName(),
				Device:  d.GetDevice().GetDeviceName(),
				Health:  d.GetHealth().String(),
				Message: d.GetMessage(),
				Updated: d.GetLastUpdatedTime(),
				Timeout: d.GetHealthCheckTimeoutSeconds(),
			})
		}
		_ = out.Encode(map[string]any{"devices": devices})
	}
}
