// Command testhost is the test "internet" of the integration tests and the
// demo: HTTP, DNS, UDP echo and TCP servers for a test namespace, plus a few
// clients that curl and dig do not cover. It is not part of msbtap.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/msbtap/msbtap/internal/testkit/pattern"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(s string) error { *l = append(*l, s); return nil }

func main() {
	log.SetFlags(0)
	log.SetPrefix("testhost: ")
	if len(os.Args) < 2 {
		log.Fatal("usage: testhost serve|halfclose|conc|hold|udp ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "serve":
		serve(args)
	case "halfclose":
		halfcloseClient(args)
	case "conc":
		concClient(args)
	case "hold":
		holdClient(args)
	case "udp":
		udpClient(args)
	case "dial":
		dialClient(args)
	case "rr":
		rrClient(args)
	case "crr":
		crrClient(args)
	case "synflood":
		synflood(args)
	case "udpflood":
		udpflood(args)
	case "dnsflood":
		dnsflood(args)
	case "garbage":
		garbage(args)
	case "churn":
		churn(args)
	case "resolve":
		resolveClient(args)
	case "banner":
		bannerClient(args)
	case "tlsdial":
		tlsDial(args)
	case "send":
		sendClient(args)
	case "grpc":
		grpcClient(args)
	case "pause":
		pause()
	default:
		log.Fatalf("unknown command %q", os.Args[1])
	}
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	var httpAddrs, dnsAddrs, records, udpAddrs, tcpAddrs, echoAddrs list
	fs.Var(&httpAddrs, "http", "serve HTTP on ADDR (repeatable)")
	fs.Var(&dnsAddrs, "dns", "serve DNS on ADDR, UDP and TCP (repeatable)")
	fs.Var(&records, "record", "DNS record NAME=IP (repeatable)")
	fs.Var(&udpAddrs, "udp-echo", "echo UDP datagrams on ADDR (repeatable)")
	fs.Var(&echoAddrs, "echo", "echo TCP on ADDR (repeatable)")
	var sizeAddrs list
	fs.Var(&sizeAddrs, "udp-size", "answer each UDP datagram on ADDR with its length (repeatable)")
	fs.Var(&tcpAddrs, "halfclose", "on ADDR, read to EOF, then answer with the byte count and SHA-256 (repeatable)")
	var httpsAddrs, untrustedAddrs, bannerAddrs list
	fs.Var(&httpsAddrs, "https", "serve HTTPS (h2, http/1.1; /echo too) on ADDR, with a certificate of a CA made now (repeatable)")
	fs.Var(&untrustedAddrs, "https-untrusted", "serve HTTPS on ADDR with a certificate of a CA nobody trusts (repeatable)")
	fs.Var(&bannerAddrs, "banner", "on ADDR, speak first (an SSH-like banner), then echo the client's line (repeatable)")
	tlsNames := fs.String("tls-names", "localhost", "the names (comma-separated) the HTTPS certificates are for")
	reqLog := fs.String("request-log", "", "append \"METHOD HOST PATH\" for every HTTP(S) request to FILE")
	logHeader := fs.String("request-log-header", "", "with --request-log, also log this request header's value (the demo shows what a server received)")
	caOut := fs.String("tls-ca-out", "", "write the CA certificate of --https to FILE")
	ready := fs.String("ready", "", "create this file once every server listens")
	fs.Parse(args)
	if *reqLog != "" {
		f, err := os.OpenFile(*reqLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			log.Fatal(err)
		}
		requestLog = f
		requestLogHeader = *logHeader
	}
	setupTLS(httpsAddrs, untrustedAddrs, *tlsNames, *caOut)
	for _, a := range bannerAddrs {
		serveTCP(a, bannerServer)
	}

	for _, a := range httpAddrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			log.Fatal(err)
		}
		// Cleartext HTTP/2 too (prior knowledge or upgrade), for gRPC.
		go http.Serve(ln, h2c.NewHandler(httpHandler(), &http2.Server{}))
	}
	zone := map[string][]netip.Addr{}
	for _, r := range records {
		name, ip, ok := strings.Cut(r, "=")
		a, err := netip.ParseAddr(ip)
		if !ok || err != nil {
			log.Fatalf("--record %q: want NAME=IP", r)
		}
		zone[dns.Fqdn(strings.ToLower(name))] = append(zone[dns.Fqdn(strings.ToLower(name))], a)
	}
	for _, a := range dnsAddrs {
		h := dnsHandler(zone)
		pc, err := net.ListenPacket("udp", a)
		if err != nil {
			log.Fatal(err)
		}
		ln, err := net.Listen("tcp", a)
		if err != nil {
			log.Fatal(err)
		}
		go (&dns.Server{PacketConn: pc, Handler: h}).ActivateAndServe()
		go (&dns.Server{Listener: ln, Handler: h}).ActivateAndServe()
	}
	for _, a := range udpAddrs {
		pc, err := net.ListenPacket("udp", a)
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			buf := make([]byte, 65536)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], from)
			}
		}()
	}
	for _, a := range sizeAddrs {
		pc, err := net.ListenPacket("udp", a)
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			buf := make([]byte, 65536)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo([]byte(strconv.Itoa(n)), from)
			}
		}()
	}
	for _, a := range tcpAddrs {
		serveTCP(a, func(c net.Conn) {
			h := sha256.New()
			n, err := io.Copy(h, c)
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%d %s\n", n, hex.EncodeToString(h.Sum(nil)))
		})
	}
	for _, a := range echoAddrs {
		serveTCP(a, func(c net.Conn) {
			c.(*net.TCPConn).SetNoDelay(true)
			io.Copy(c, c)
		})
	}
	if *ready != "" {
		os.WriteFile(*ready, []byte("ok\n"), 0o644)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

// serveTCP accepts on addr and runs handle for each connection in its own
// goroutine, closing the connection afterwards.
func serveTCP(addr string, handle func(net.Conn)) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}

// requestLog, if set, gets a line per HTTP request.
var (
	requestLog       *os.File
	requestLogHeader string
	requestLogMu     sync.Mutex
)

// httpHandler is httpMux, each request logged to --request-log if given.
func httpHandler() http.Handler {
	mux := httpMux()
	if requestLog == nil {
		return mux
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requestLogMu.Lock()
		if v := r.Header.Get(requestLogHeader); requestLogHeader != "" && v != "" {
			fmt.Fprintf(requestLog, "%s %s %s %s: %s\n", r.Method, r.Host, r.URL.Path, requestLogHeader, v)
		} else {
			fmt.Fprintf(requestLog, "%s %s %s\n", r.Method, r.Host, r.URL.Path)
		}
		requestLogMu.Unlock()
		mux.ServeHTTP(w, r)
	})
}

func httpMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from testhost %s\n", r.Host)
	})
	mux.HandleFunc(grpcPath, grpcSay)
	// /echo answers with what it received (see echoRequest).
	mux.HandleFunc("/echo", echoRequest)
	handleNPM(mux) // /npm/: a small npm registry
	// /bytes?n=N sends the deterministic pattern of N bytes.
	mux.HandleFunc("/bytes", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "bad n", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		io.Copy(w, pattern.Reader(n))
	})
	// /sha256 answers with the byte count and SHA-256 of the request body.
	mux.HandleFunc("/sha256", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %s\n", n, hex.EncodeToString(h.Sum(nil)))
	})
	// /drip?n=N sends N pattern bytes slowly, 16 KiB every 10 ms (about
	// 1.6 MB/s): a long download a client reads as it comes.
	mux.HandleFunc("/drip", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "bad n", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		src := pattern.Reader(n)
		fl, _ := w.(http.Flusher)
		for {
			if _, err := io.CopyN(w, src, 16<<10); err != nil {
				return
			}
			if fl != nil {
				fl.Flush()
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	// /slow?ms=N answers after N milliseconds (keeps a connection busy).
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprintln(w, "slow done")
	})
	responseRoutes(mux) // /reflect/, /gz, /bigheader: what msbtap does to responses
	return mux
}

func dnsHandler(zone map[string][]netip.Addr) dns.HandlerFunc {
	return func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Authoritative = true
		name := strings.ToLower(q.Question[0].Name)
		addrs, ok := zone[name]
		if !ok {
			m.Rcode = dns.RcodeNameError
			w.WriteMsg(m)
			return
		}
		for _, a := range addrs {
			hdr := dns.RR_Header{Name: q.Question[0].Name, Class: dns.ClassINET, Ttl: 60}
			switch {
			case a.Is4() && q.Question[0].Qtype == dns.TypeA:
				hdr.Rrtype = dns.TypeA
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: a.AsSlice()})
			case a.Is6() && q.Question[0].Qtype == dns.TypeAAAA:
				hdr.Rrtype = dns.TypeAAAA
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: a.AsSlice()})
			}
		}
		w.WriteMsg(m)
	}
}

// halfclose ADDR N: send N pattern bytes, shut the write side, print the
// server's answer, which must arrive after our FIN.
func halfcloseClient(args []string) {
	if len(args) != 2 {
		log.Fatal("usage: testhost halfclose ADDR N")
	}
	n, _ := strconv.ParseInt(args[1], 10, 64)
	c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := io.Copy(c, pattern.Reader(n)); err != nil {
		log.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		log.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		log.Fatalf("read answer after half-close: %v", err)
	}
	fmt.Print(line)
}

// conc URL N: N concurrent HTTP GETs, each on its own connection; prints
// "ok=X failed=Y".
func concClient(args []string) {
	if len(args) != 2 {
		log.Fatal("usage: testhost conc URL N")
	}
	n, _ := strconv.Atoi(args[1])
	var ok, failed atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			<-start
			resp, err := cl.Get(args[0])
			if err != nil {
				failed.Add(1)
				return
			}
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 {
				failed.Add(1)
				return
			}
			ok.Add(1)
		}()
	}
	close(start)
	wg.Wait()
	fmt.Printf("ok=%d failed=%d\n", ok.Load(), failed.Load())
}

// hold ADDR N SECONDS: open N connections and keep them for SECONDS; prints
// "open=X refused=Y" where refused counts connections reset or refused at
// once or within the hold time.
func holdClient(args []string) {
	if len(args) != 3 {
		log.Fatal("usage: testhost hold ADDR N SECONDS")
	}
	n, _ := strconv.Atoi(args[1])
	secs, _ := strconv.Atoi(args[2])
	var open, refused atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
			if err != nil {
				refused.Add(1)
				return
			}
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(time.Duration(secs) * time.Second))
			_, err = c.Read(make([]byte, 1))
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				open.Add(1)
				return
			}
			refused.Add(1)
		}()
	}
	wg.Wait()
	fmt.Printf("open=%d refused=%d\n", open.Load(), refused.Load())
}

// udp ADDR MESSAGE: send one datagram and print the answer.
func udpClient(args []string) {
	if len(args) != 2 {
		log.Fatal("usage: testhost udp ADDR MESSAGE")
	}
	c, err := net.Dial("udp", args[0])
	if err != nil {
		log.Fatal(err)
	}
	buf := make([]byte, 65536)
	var last error
	for try := 0; try < 3; try++ {
		c.Write([]byte(args[1]))
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := c.Read(buf)
		if err == nil {
			fmt.Printf("%s\n", buf[:n])
			return
		}
		last = err
	}
	fmt.Printf("no answer: %v\n", last)
	os.Exit(1)
}

// dial ADDR: connect once and print "connected" or the error.
func dialClient(args []string) {
	if len(args) != 1 {
		log.Fatal("usage: testhost dial ADDR")
	}
	c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	c.Close()
	fmt.Println("connected")
}

// rr ADDR SECONDS: 1-byte request/response on one connection; prints
// transactions per second.
func rrClient(args []string) {
	if len(args) != 2 && (len(args) != 3 || args[2] != "latency") {
		log.Fatal("usage: testhost rr ADDR SECONDS [latency]")
	}
	secs, _ := strconv.ParseFloat(args[1], 64)
	c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	b := []byte{'x'}
	n := 0
	lat := make([]time.Duration, 0, 1<<16)
	start := time.Now()
	end := start.Add(time.Duration(secs * float64(time.Second)))
	for t0 := start; t0.Before(end); {
		if _, err := c.Write(b); err != nil {
			log.Fatal(err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			log.Fatal(err)
		}
		n++
		t1 := time.Now()
		lat = append(lat, t1.Sub(t0))
		t0 = t1
	}
	tps := float64(n) / time.Since(start).Seconds()
	if len(args) == 3 {
		// With "latency": also the median and 99th percentile of one
		// exchange, in microseconds.
		slices.Sort(lat)
		us := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))]) / 1e3 }
		fmt.Printf("%.0f %.1f %.1f\n", tps, us(0.5), us(0.99))
		return
	}
	fmt.Printf("%.0f\n", tps)
}

// crr ADDR SECONDS: connect, 1-byte exchange, close, repeatedly; prints
// connections per second.
func crrClient(args []string) {
	if len(args) != 2 {
		log.Fatal("usage: testhost crr ADDR SECONDS")
	}
	secs, _ := strconv.ParseFloat(args[1], 64)
	b := []byte{'x'}
	n := 0
	start := time.Now()
	end := start.Add(time.Duration(secs * float64(time.Second)))
	for time.Now().Before(end) {
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			log.Fatal(err)
		}
		c.Write(b)
		if _, err := io.ReadFull(c, b); err != nil {
			log.Fatal(err)
		}
		c.Close()
		n++
	}
	fmt.Printf("%.0f\n", float64(n)/time.Since(start).Seconds())
}
