// Command benchpeers measures msbtap side by side with the kernel path
// (veth plus routing), slirp4netns, pasta and gvproxy (gvisor-tap-vsock),
// in one run on this machine: TCP throughput both ways (iperf3), 1-byte
// request/response rate with its median and 99th percentile latency,
// connection rate, the backend's CPU per transaction, at MTU 1500 and
// 65520, plus msbtap's memory and CPU cost. msbtap is measured twice: as
// it runs by default, and with the TCP fast path (msbtap-fast).
//
// Each figure is measured over several rounds (-rounds, 3) in which the
// backends take turns in a rotating order, each in namespaces and on server
// ports of its own, so that none is always measured first or last; the
// table gives the median and the spread (min–max). It writes the same as
// JSON and a PNG chart. Run by `make bench-peers` as root.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

const (
	hostAddr  = "198.51.100.1"
	inetAddr  = "198.51.100.2"
	serverIP  = "198.51.100.10"
	kernelNet = "10.99.0"
	// Server ports start here; each measurement takes the next ones.
	firstPort = 7100
)

// Cell is one measured figure.
type Cell struct {
	Metric  string               `json:"metric"` // upload, download, rr, rr p50, rr p99, crr, cpu/rr, cpu/crr
	MTU     int                  `json:"mtu"`
	Unit    string               `json:"unit"`
	Values  map[string]float64   `json:"values"`  // backend → median of the rounds
	Samples map[string][]float64 `json:"samples"` // backend → every round's value
	// Ratios are msbtap's and msbtap-fast's medians over each backend's,
	// keyed "msbtap/pasta" and so on.
	Ratios map[string]float64 `json:"ratios"`
	Target string             `json:"target"`
	// Meets says whether msbtap-fast (or msbtap, where it alone ran)
	// meets the target.
	Meets *bool `json:"meets_target,omitempty"`
	lower bool  // lower is better
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
	compareBin                 string
	seconds, rounds            int
	skipThroughput             bool
	backends                   = []string{"kernel", "slirp4netns", "pasta", "gvproxy", "msbtap", "msbtap-fast"}
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
	flag.IntVar(&rounds, "rounds", 3, "rounds: every backend is measured once per round, in a rotating order")
	flag.StringVar(&compareBin, "compare", "", "a second msbtap binary, measured as the backends msbtap-b and msbtap-fast-b (name them in -only): a before and after in the same rounds")
	flag.BoolVar(&skipThroughput, "latency-only", false, "measure rr and crr only (no iperf3 runs, no memory figures): a quicker loop while working on latency")
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
	for _, b := range []*string{&msbtapBin, &testhostBin, &gvproxyBin, &gvforwarderBin, &compareBin} {
		if *b == "" {
			continue
		}
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
		c := &Cell{Metric: metric, MTU: mtu, Unit: unit, Values: map[string]float64{}, Samples: map[string][]float64{},
			Ratios: map[string]float64{}, lower: unit == "µs"}
		cells[k] = c
		rep.Cells = append(rep.Cells, c)
		return c
	}
	add := func(metric string, mtu int, unit, b string, v float64) {
		if v < 0 {
			return // not measured for this backend
		}
		c := cell(metric, mtu, unit)
		c.Samples[b] = append(c.Samples[b], v)
	}
	port := firstPort
	for round := 0; round < rounds; round++ {
		for _, mtu := range []int{1500, 65520} {
			// Each round starts one backend further on: over the rounds
			// each backend runs early, late and in between.
			for i := range backends {
				b := backends[(i+round)%len(backends)]
				pt := ports{echo: port, hold: port + 1, iperf: port + 2}
				port += 3
				log.Printf("round %d: %s at MTU %d (ports %d-%d)", round+1, b, mtu, pt.echo, pt.iperf)
				withResources := round == 0 && mtu == 1500 && strings.HasPrefix(b, "msbtap") && !skipThroughput
				r, err := measure(b, mtu, pt, withResources)
				if err != nil {
					log.Printf("  %s at MTU %d failed: %v", b, mtu, err)
					continue
				}
				add("upload", mtu, "Gbit/s", b, r.upload)
				add("download", mtu, "Gbit/s", b, r.download)
				add("rr", mtu, "transactions/s", b, r.rr)
				add("rr p50", mtu, "µs", b, r.p50)
				add("rr p99", mtu, "µs", b, r.p99)
				add("crr", mtu, "connections/s", b, r.crr)
				add("cpu/rr", mtu, "µs", b, r.cpuPerRR)
				add("cpu/crr", mtu, "µs", b, r.cpuPerCRR)
				for k, v := range r.resources {
					if b == "msbtap-fast" {
						k = "fast_" + k
					}
					rep.Msbtap[k] = v
				}
				if strings.HasPrefix(b, "msbtap") && r.cpuPerGB >= 0 {
					k := fmt.Sprintf("cpu_seconds_per_gb_mtu%d", mtu)
					if b == "msbtap-fast" {
						k = "fast_" + k
					}
					rep.Msbtap[k] += r.cpuPerGB / float64(rounds)
				}
			}
		}
	}
	for _, c := range rep.Cells {
		for b, vs := range c.Samples {
			c.Values[b] = median(vs)
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

// median is the middle of vs (the mean of the middle two when even).
func median(vs []float64) float64 {
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// judge computes msbtap's and msbtap-fast's ratios and checks the issue's
// targets on msbtap-fast (on msbtap where it alone ran).
func judge(c *Cell) {
	for _, mine := range []string{"msbtap", "msbtap-fast"} {
		m, ok := c.Values[mine]
		if !ok {
			continue
		}
		for b, v := range c.Values {
			if b != mine && v > 0 {
				c.Ratios[mine+"/"+b] = m / v
			}
		}
	}
	m, ok := c.Values["msbtap-fast"]
	if !ok {
		if m, ok = c.Values["msbtap"]; !ok {
			return
		}
	}
	bestPeer := 0.0
	for _, p := range peers {
		if v, ok := c.Values[p]; ok && (bestPeer == 0 || c.lower == (v < bestPeer)) {
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
	case "rr", "crr":
		c.Target = "≥ best peer"
		ok2 = bestPeer > 0 && m >= bestPeer
	case "rr p50", "rr p99", "cpu/rr", "cpu/crr":
		c.Target = "≤ best peer"
		ok2 = bestPeer > 0 && m <= bestPeer
	default:
		return
	}
	c.Meets = &ok2
}

func printTable(rep *Report) {
	fmt.Printf("\nmsbtap bench-peers, %s, %s, %d rounds of %d s runs: median (min–max)\n", rep.Time, rep.Machine, rounds, seconds)
	for _, k := range []string{"msbtap", "slirp4netns", "pasta", "gvproxy", "iperf3"} {
		fmt.Printf("  %s: %s\n", k, rep.Versions[k])
	}
	fmt.Println("  cpu/rr, cpu/crr: the backend's CPU time (user+system, all its processes) per transaction or connection")
	fmt.Printf("\n| figure | MTU |")
	for _, b := range backends {
		fmt.Printf(" %s |", b)
	}
	fmt.Printf(" fast ×msbtap | fast ×pasta | target (fast) | met |\n|---|---|")
	for range backends {
		fmt.Printf("---|")
	}
	fmt.Printf("---|---|---|---|\n")
	for _, c := range rep.Cells {
		num := func(v float64) string {
			switch {
			case c.Unit == "Gbit/s":
				return strconv.FormatFloat(v, 'f', 2, 64)
			case c.Unit == "µs":
				return strconv.FormatFloat(v, 'f', 1, 64)
			}
			return strconv.FormatFloat(v, 'f', 0, 64)
		}
		fmt.Printf("| %s (%s) | %d |", c.Metric, c.Unit, c.MTU)
		for _, b := range backends {
			vs, ok := c.Samples[b]
			if !ok {
				fmt.Printf(" — |")
				continue
			}
			fmt.Printf(" %s (%s–%s) |", num(c.Values[b]), num(slices.Min(vs)), num(slices.Max(vs)))
		}
		r := func(k string) string {
			if v, ok := c.Ratios[k]; ok {
				return strconv.FormatFloat(v, 'f', 2, 64)
			}
			return "—"
		}
		met := "—"
		if c.Meets != nil {
			met = map[bool]string{true: "yes", false: "NO"}[*c.Meets]
		}
		fmt.Printf(" %s | %s | %s | %s |\n", r("msbtap-fast/msbtap"), r("msbtap-fast/pasta"), c.Target, met)
	}
	fmt.Println()
	keys := make([]string, 0, len(rep.Msbtap))
	for k := range rep.Msbtap {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Printf("msbtap %s: %.2f\n", k, rep.Msbtap[k])
	}
}
