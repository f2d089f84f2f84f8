// Command benchpeers measures msbtap side by side with the kernel path
// (veth plus routing), slirp4netns, pasta and gvproxy (gvisor-tap-vsock),
// in one run on this machine: TCP throughput both ways (iperf3), 1-byte
// request/response rate with its median and 99th percentile latency,
// connection rate, at MTU 1500 and 65520, plus msbtap's memory and CPU
// cost. It prints a table of each figure and msbtap's ratios, and writes
// the same as JSON and a PNG chart. Run by `make bench-peers` as root.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const (
	hostAddr  = "198.51.100.1"
	inetAddr  = "198.51.100.2"
	serverIP  = "198.51.100.10"
	echoPort  = "7003"
	holdPort  = "7001"
	kernelNet = "10.99.0"
)

// Cell is one measured figure.
type Cell struct {
	Metric  string             `json:"metric"` // upload, download, rr, crr
	MTU     int                `json:"mtu"`
	Unit    string             `json:"unit"`
	Values  map[string]float64 `json:"values"` // backend → value
	Ratios  map[string]float64 `json:"msbtap_ratio"`
	Target  string             `json:"target"`
	Meets   *bool              `json:"meets_target,omitempty"`
	comment string
}

// Report is everything one run measured.
type Report struct {
	Time     string             `json:"time"`
	Machine  string             `json:"machine"`
	Versions map[string]string  `json:"versions"`
	Cells    []*Cell            `json:"cells"`
	Msbtap   map[string]float64 `json:"msbtap_resources"`
}

var (
	msbtapBin, testhostBin     string
	gvproxyBin, gvforwarderBin string
	seconds                    int
	backends                   = []string{"kernel", "slirp4netns", "pasta", "gvproxy", "msbtap"}
	// peers are the backends msbtap is judged against.
	peers = []string{"slirp4netns", "pasta", "gvproxy"}
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("bench-peers: ")
	flag.StringVar(&msbtapBin, "msbtap", "bin/msbtap", "msbtap binary")
	flag.StringVar(&testhostBin, "testhost", "bin/testhost", "testhost binary")
	flag.StringVar(&gvproxyBin, "gvproxy", "bin/peers/gvproxy", "gvproxy binary (gvisor-tap-vsock)")
	flag.StringVar(&gvforwarderBin, "gvforwarder", "bin/peers/vm", "gvisor-tap-vsock's guest-side forwarder (cmd/vm)")
	flag.IntVar(&seconds, "seconds", 4, "seconds per throughput, rr and crr run")
	out := flag.String("out", "results", "folder for the JSON and PNG results")
	only := flag.String("only", "", "comma-separated backends to run (default all)")
	flag.StringVar(&profileDir, "profile", "", "folder for CPU profiles of msbtap during rr and crr (default none)")
	flag.Parse()
	if os.Geteuid() != 0 {
		log.Fatal("run as root (or with sudo): make bench-peers")
	}
	if *only != "" {
		backends = strings.Split(*only, ",")
	}
	for _, b := range []*string{&msbtapBin, &testhostBin, &gvproxyBin, &gvforwarderBin} {
		p, err := filepath.Abs(*b)
		if err != nil {
			log.Fatal(err)
		}
		*b = p
	}
	rep := &Report{Time: time.Now().UTC().Format(time.RFC3339), Versions: versions(), Msbtap: map[string]float64{}}
	rep.Machine = strings.TrimSpace(run("nproc")) + " cores, kernel " + strings.TrimSpace(run("uname", "-r"))

	cells := map[string]*Cell{}
	cell := func(metric string, mtu int, unit string) *Cell {
		k := fmt.Sprintf("%s/%d", metric, mtu)
		if c, ok := cells[k]; ok {
			return c
		}
		c := &Cell{Metric: metric, MTU: mtu, Unit: unit, Values: map[string]float64{}, Ratios: map[string]float64{}}
		cells[k] = c
		rep.Cells = append(rep.Cells, c)
		return c
	}
	for _, mtu := range []int{1500, 65520} {
		for _, b := range backends {
			log.Printf("%s at MTU %d", b, mtu)
			r, err := measure(b, mtu, mtu == 1500 && b == "msbtap")
			if err != nil {
				log.Printf("  %s at MTU %d failed: %v", b, mtu, err)
				continue
			}
			cell("upload", mtu, "Gbit/s").Values[b] = r.upload
			cell("download", mtu, "Gbit/s").Values[b] = r.download
			cell("rr", mtu, "transactions/s").Values[b] = r.rr
			cell("rr p50", mtu, "µs").Values[b] = r.p50
			cell("rr p99", mtu, "µs").Values[b] = r.p99
			cell("crr", mtu, "connections/s").Values[b] = r.crr
			for k, v := range r.resources {
				rep.Msbtap[k] = v
			}
			if b == "msbtap" {
				rep.Msbtap[fmt.Sprintf("cpu_seconds_per_gb_mtu%d", mtu)] = r.cpuPerGB
			}
		}
	}
	for _, c := range rep.Cells {
		judge(c)
	}
	printTable(rep)
	if err := os.MkdirAll(*out, 0o755); err != nil {
		log.Fatal(err)
	}
	stamp := time.Now().UTC().Format("20060102-150405")
	js, _ := json.MarshalIndent(rep, "", "  ")
	for _, name := range []string{"bench-peers-" + stamp + ".json", "bench-peers.json"} {
		os.WriteFile(filepath.Join(*out, name), js, 0o644)
	}
	if err := writeChart(rep, filepath.Join(*out, "bench-peers.png")); err != nil {
		log.Printf("chart: %v", err)
	}
	log.Printf("wrote %s/bench-peers.json and %s/bench-peers.png", *out, *out)
}

func versions() map[string]string {
	v := map[string]string{}
	v["msbtap"] = strings.TrimSpace(run(msbtapBin, "version"))
	v["slirp4netns"] = firstLine(run("slirp4netns", "--version"))
	v["pasta"] = "passt " + strings.TrimSpace(run("dpkg-query", "-W", "-f=${Version}", "passt"))
	v["iperf3"] = firstLine(run("iperf3", "--version"))
	v["gvproxy"] = firstLine(run(gvproxyBin, "-version"))
	v["kernel"] = strings.TrimSpace(run("uname", "-r"))
	return v
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

func run(name string, args ...string) string {
	out, _ := exec.Command(name, args...).CombinedOutput()
	return string(out)
}

// judge computes msbtap's ratios and checks the targets.
func judge(c *Cell) {
	m, ok := c.Values["msbtap"]
	if !ok {
		return
	}
	for b, v := range c.Values {
		if b != "msbtap" && v > 0 {
			c.Ratios[b] = m / v
		}
	}
	bestPeer := 0.0
	for _, p := range peers {
		if v, ok := c.Values[p]; ok && (bestPeer == 0 || (c.Unit == "µs") == (v < bestPeer)) {
			bestPeer = v
		}
	}
	var ok2 bool
	switch c.Metric {
	case "upload", "download":
		c.Target = "≥1.5× best peer"
		ok2 = bestPeer > 0 && m >= 1.5*bestPeer
		if c.MTU == 65520 {
			c.Target += ", ≥0.5× kernel"
			ok2 = ok2 && c.Values["kernel"] > 0 && m >= 0.5*c.Values["kernel"]
		}
	case "rr":
		c.Target = "≥ best peer"
		ok2 = bestPeer > 0 && m >= bestPeer
	case "rr p50", "rr p99":
		c.Target = "≤ best peer"
		ok2 = bestPeer > 0 && m <= bestPeer
	case "crr":
		c.Target = "≥ best peer"
		ok2 = bestPeer > 0 && m >= bestPeer
	}
	c.Meets = &ok2
}

func printTable(rep *Report) {
	fmt.Printf("\nmsbtap bench-peers, %s, %s\n", rep.Time, rep.Machine)
	for _, k := range []string{"msbtap", "slirp4netns", "pasta", "gvproxy", "iperf3"} {
		fmt.Printf("  %s: %s\n", k, rep.Versions[k])
	}
	fmt.Printf("\n| figure | MTU | kernel | slirp4netns | pasta | gvproxy | msbtap | ×kernel | ×slirp4netns | ×pasta | ×gvproxy | target | met |\n")
	fmt.Printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, c := range rep.Cells {
		f := func(b string) string {
			v, ok := c.Values[b]
			if !ok {
				return "—"
			}
			switch c.Unit {
			case "Gbit/s":
				return strconv.FormatFloat(v, 'f', 2, 64)
			case "µs":
				return strconv.FormatFloat(v, 'f', 1, 64)
			}
			return strconv.FormatFloat(v, 'f', 0, 64)
		}
		r := func(b string) string {
			if v, ok := c.Ratios[b]; ok {
				return strconv.FormatFloat(v, 'f', 2, 64)
			}
			return "—"
		}
		met := "—"
		if c.Meets != nil {
			met = map[bool]string{true: "yes", false: "NO"}[*c.Meets]
		}
		fmt.Printf("| %s (%s) | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", c.Metric, c.Unit, c.MTU,
			f("kernel"), f("slirp4netns"), f("pasta"), f("gvproxy"), f("msbtap"), r("kernel"), r("slirp4netns"), r("pasta"), r("gvproxy"), c.Target, met)
	}
	fmt.Println()
	for _, k := range []string{"rss_idle_kib", "rss_1000_idle_conns_kib", "rss_per_idle_conn_kib", "cpu_seconds_per_gb_mtu1500", "cpu_seconds_per_gb_mtu65520"} {
		if v, ok := rep.Msbtap[k]; ok {
			fmt.Printf("msbtap %s: %.2f\n", k, v)
		}
	}
}
