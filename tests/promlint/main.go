// promlint reads a Prometheus text exposition on stdin and checks it the way
// `promtool check metrics` does: Prometheus's own text parser (expfmt), then the
// linter promtool runs (client_golang's testutil/promlint: counter suffixes, base
// units, help text, duplicate series, histogram names...). It prints one JSON
// object on stdout:
//
//	{"library": "<module>@<version>", "families": N, "problems": ["<metric>: <text>", ...]}
//
// and exits 1 when the exposition does not parse (the error on stderr). Built by the
// test suite from the Go module proxy; never shipped.
//
// Metric and label names are parsed under the legacy scheme: what every Prometheus accepts.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func main() {
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Legacy names ([a-zA-Z_:][a-zA-Z0-9_:]*): what every Prometheus server accepts.
	parser := expfmt.NewTextParser(model.LegacyValidation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(input))
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(1)
	}
	problems, err := promlint.New(bytes.NewReader(input)).Lint()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lint:", err)
		os.Exit(1)
	}
	report := map[string]any{"families": len(families), "problems": []string{}}
	found := []string{}
	for _, p := range problems {
		found = append(found, p.Metric+": "+p.Text)
	}
	report["problems"] = found
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "github.com/prometheus/client_golang" {
				report["library"] = dep.Path + "@" + dep.Version
			}
		}
	}
	out, _ := json.Marshal(report)
	fmt.Println(string(out))
}
