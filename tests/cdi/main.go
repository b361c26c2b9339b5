// cdi-check loads a directory of CDI spec files the way container runtimes do (containerd and
// CRI-O use tags.cncf.io/container-device-interface's pkg/cdi cache), and reports what the
// library thinks of them as JSON on stdout:
//
//	{"library": "<module>@<version>",
//	 "accepted": ["<spec file>", ...],              // loaded and validated
//	 "rejected": {"<spec file>": ["<error>", ...]}, // every error the cache recorded for it
//	 "resolved": {"<qualified name>": "<spec file>" | ""},
//	 "required": {"<spec file>": "<lowest cdiVersion its content allows>"}}
//
// The qualified device names to resolve (`vendor/class=name`) come on stdin, one a line; each is
// looked up with Cache.GetDevice, the call a runtime makes for every CDI device a container asks
// for. "required" is specs-go's MinimumRequiredVersion of each file that parses. Built by the test suite from the Go module proxy; never shipped.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"

	"tags.cncf.io/container-device-interface/pkg/cdi"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

const module = "tags.cncf.io/container-device-interface"

type report struct {
	Library  string              `json:"library"`
	Accepted []string            `json:"accepted"`
	Rejected map[string][]string `json:"rejected"`
	Resolved map[string]string   `json:"resolved"`
	Required map[string]string   `json:"required"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cdi-check: "+format+"\n", args...)
	os.Exit(1)
}

func libraryVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return module + "@unknown"
	}
	for _, dep := range info.Deps {
		if dep.Path == module {
			return dep.Path + "@" + dep.Version
		}
	}
	return module + "@unknown"
}

func main() {
	dir := flag.String("dir", "", "the CDI spec directory to load")
	flag.Parse()
	if *dir == "" {
		fail("-dir is required")
	}

	// As a runtime configures it, minus the fsnotify watch: one explicit refresh instead.
	cache, err := cdi.NewCache(cdi.WithSpecDirs(*dir), cdi.WithAutoRefresh(false))
	if err != nil {
		fail("NewCache: %v", err)
	}
	_ = cache.Refresh() // the same errors, per file, come from GetErrors below

	out := report{
		Library:  libraryVersion(),
		Accepted: []string{},
		Rejected: map[string][]string{},
		Resolved: map[string]string{},
		Required: map[string]string{},
	}
	for path, errs := range cache.GetErrors() {
		for _, e := range errs {
			out.Rejected[path] = append(out.Rejected[path], e.Error())
		}
	}
	for dirPath, e := range cache.GetSpecDirErrors() {
		out.Rejected[dirPath] = append(out.Rejected[dirPath], e.Error())
	}
	for _, vendor := range cache.ListVendors() {
		for _, spec := range cache.GetVendorSpecs(vendor) {
			if _, bad := out.Rejected[spec.GetPath()]; !bad {
				out.Accepted = append(out.Accepted, spec.GetPath())
			}
		}
	}
	sort.Strings(out.Accepted)

	files, err := filepath.Glob(filepath.Join(*dir, "*.json"))
	if err != nil {
		fail("glob: %v", err)
	}
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			fail("read %s: %v", path, err)
		}
		raw, err := cdi.ParseSpec(data)
		if err != nil || raw == nil {
			continue // reported under "rejected"
		}
		if v, err := cdispec.MinimumRequiredVersion(raw); err == nil {
			out.Required[filepath.Clean(path)] = v
		}
	}

	lines := bufio.NewScanner(os.Stdin)
	lines.Buffer(make([]byte, 1<<20), 1<<20)
	for lines.Scan() {
		name := strings.TrimSpace(lines.Text())
		if name == "" {
			continue
		}
		if dev := cache.GetDevice(name); dev != nil {
			out.Resolved[name] = filepath.Clean(dev.GetSpec().GetPath())
		} else {
			out.Resolved[name] = ""
		}
	}
	if err := lines.Err(); err != nil {
		fail("reading stdin: %v", err)
	}

	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(out); err != nil {
		fail("encode: %v", err)
	}
}
