package dnsproxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func TestParseUpstream(t *testing.T) {
	for in, want := range map[string]string{
		"198.51.100.53":        "198.51.100.53:53",
		"198.51.100.53:5353":   "198.51.100.53:5353",
		"2001:db8::53":         "[2001:db8::53]:53",
		"[2001:db8::53]:5300":  "[2001:db8::53]:5300",
		"::ffff:198.51.100.53": "198.51.100.53:53",
	} {
		got, err := ParseUpstream(in)
		if err != nil || got != want {
			t.Errorf("ParseUpstream(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "resolver.example", "1.2.3.4:99999"} {
		if _, err := ParseUpstream(bad); err == nil {
			t.Errorf("ParseUpstream(%q): no error", bad)
		}
	}
}

func TestHostUpstreams(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o644)
	if got := HostUpstreams(empty); len(got) != 0 {
		t.Errorf("empty resolv.conf: %v", got)
	}
	if got := HostUpstreams(filepath.Join(dir, "missing")); len(got) != 0 {
		t.Errorf("missing resolv.conf: %v", got)
	}
	rc := filepath.Join(dir, "resolv.conf")
	os.WriteFile(rc, []byte("# c\nnameserver 198.51.100.53\nnameserver 2001:db8::53\nsearch x\n"), 0o644)
	got := HostUpstreams(rc)
	if len(got) != 2 || got[0] != "198.51.100.53:53" || got[1] != "[2001:db8::53]:53" {
		t.Errorf("got %v", got)
	}
}

// dnsServer answers every A query with addr on a loopback UDP port.
func dnsServer(t *testing.T, addr string, rcode int) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetRcode(q, rcode)
		if rcode == dns.RcodeSuccess {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.ParseIP(addr)})
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

// deadUpstream is a UDP port nobody answers on.
func deadUpstream(t *testing.T) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc.LocalAddr().String()
}

func query(name string) *dns.Msg {
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	return q
}

func TestDNSFailover(t *testing.T) {
	good := dnsServer(t, "198.51.100.7", dns.RcodeSuccess)
	d, err := New(Options{Upstreams: []string{deadUpstream(t), good}, Timeout: 4 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	a := d.Resolve(context.Background(), netip.AddrPort{}, query("www.example.test"))
	if a.Rcode != dns.RcodeSuccess || len(a.Answer) != 1 {
		t.Fatalf("got %v", a)
	}
	// The upstream that answered is tried first from now on: fast.
	start := time.Now()
	a = d.Resolve(context.Background(), netip.AddrPort{}, query("www.example.test"))
	if a.Rcode != dns.RcodeSuccess || time.Since(start) > 500*time.Millisecond {
		t.Fatalf("second query: rcode %d after %s", a.Rcode, time.Since(start))
	}
}

func TestDNSServfailWhenAllFail(t *testing.T) {
	d, _ := New(Options{Upstreams: []string{deadUpstream(t)}, Timeout: 500 * time.Millisecond})
	defer d.Close()
	q := query("www.example.test")
	a := d.Resolve(context.Background(), netip.AddrPort{}, q)
	if a.Rcode != dns.RcodeServerFailure || a.Id != q.Id {
		t.Fatalf("got rcode %d id %d, want SERVFAIL for id %d", a.Rcode, a.Id, q.Id)
	}
	none, _ := New(Options{})
	defer none.Close()
	if a := none.Resolve(context.Background(), netip.AddrPort{}, q); a.Rcode != dns.RcodeServerFailure {
		t.Fatalf("no upstreams: rcode %d", a.Rcode)
	}
}

type captureReplier struct {
	mu   sync.Mutex
	udp  [][]byte
	echo int
	got  chan struct{}
}

func (c *captureReplier) SendUDP(src, dst netip.AddrPort, p []byte) bool {
	c.mu.Lock()
	c.udp = append(c.udp, append([]byte(nil), p...))
	c.mu.Unlock()
	select {
	case c.got <- struct{}{}:
	default:
	}
	return true
}

func TestDNSHandleUDPDropsGarbage(t *testing.T) {
	r := &captureReplier{got: make(chan struct{}, 1)}
	d, _ := New(Options{Replier: r})
	defer d.Close()
	src := netip.MustParseAddrPort("100.96.0.2:5000")
	dst := netip.MustParseAddrPort("100.96.0.1:53")
	for _, b := range [][]byte{nil, {1, 2, 3}} {
		if d.HandleUDP(src, dst, b) {
			t.Errorf("garbage %x accepted", b)
		}
	}
	if dropped := d.Stats().Dropped; dropped != 2 {
		t.Errorf("dropped: got %d, want 2", dropped)
	}
}

// TestDNSQuestionChecks: a message with more questions than one (a peer's
// forwarder checked only the first) or none gets FORMERR, over UDP and
// TCP; a name no host has (a NUL, an escaped dot, a space) gets
// NXDOMAIN; none of them goes upstream.
func TestDNSQuestionChecks(t *testing.T) {
	up := newRecordingUpstream(t)
	r := &captureReplier{got: make(chan struct{}, 8)}
	d, _ := New(Options{Upstreams: []string{up.addr}, Replier: r, Timeout: time.Second})
	defer d.Close()
	src := netip.MustParseAddrPort("100.96.0.2:5000")
	dst := netip.MustParseAddrPort("100.96.0.1:53")
	two := query("allowed.test")
	two.Question = append(two.Question, dns.Question{Name: "evil.test.", Qtype: dns.TypeA, Qclass: dns.ClassINET})
	none := query("allowed.test")
	none.Question = nil
	badNames := []string{`evil\000.test.`, `a\.b.test.`, `ev\032il.test.`}
	var msgs []*dns.Msg
	for _, name := range badNames {
		m := new(dns.Msg)
		m.Id = dns.Id()
		m.RecursionDesired = true
		m.Question = []dns.Question{{Name: name, Qtype: dns.TypeA, Qclass: dns.ClassINET}}
		msgs = append(msgs, m)
	}
	want := func(m *dns.Msg) int {
		if len(m.Question) != 1 {
			return dns.RcodeFormatError
		}
		return dns.RcodeNameError
	}
	for _, q := range append([]*dns.Msg{two, none}, msgs...) {
		b, err := q.Pack()
		if err != nil {
			t.Fatalf("%v: %v", q.Question, err)
		}
		d.HandleUDP(src, dst, b)
		select {
		case <-r.got:
		case <-time.After(2 * time.Second):
			t.Fatalf("%v: no answer over UDP", q.Question)
		}
		r.mu.Lock()
		last := r.udp[len(r.udp)-1]
		r.mu.Unlock()
		a := new(dns.Msg)
		if err := a.Unpack(last); err != nil || a.Id != q.Id || a.Rcode != want(q) {
			t.Errorf("UDP %v: rcode %s id %d (%v), want %s", q.Question, dns.RcodeToString[a.Rcode], a.Id, err, dns.RcodeToString[want(q)])
		}
	}
	guest, agent := net.Pipe()
	defer guest.Close()
	go d.ServeTCP(agent, netip.AddrPort{})
	gc := &dns.Conn{Conn: guest}
	guest.SetDeadline(time.Now().Add(3 * time.Second))
	for _, q := range []*dns.Msg{two, msgs[0]} {
		if err := gc.WriteMsg(q); err != nil {
			t.Fatal(err)
		}
		a, err := gc.ReadMsg()
		if err != nil || a.Rcode != want(q) {
			t.Fatalf("TCP %v: %v %v", q.Question, a, err)
		}
	}
	if got := up.queries(); len(got) != 0 {
		t.Errorf("the upstream saw %d queries", len(got))
	}
}

func TestDNSTruncatesToMTU(t *testing.T) {
	// An upstream with a huge answer (it truncates over UDP to the size
	// asked for, as real servers do, and answers whole over TCP); the
	// guest gets a truncated message that fits, with TC set so it retries
	// over TCP.
	pc, _ := net.ListenPacket("udp", "127.0.0.1:0")
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Compress = true // about 3.2 KB: more than a 1500 MTU
		for i := 0; i < 200; i++ {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(198, 51, 100, byte(i))})
		}
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			size := dns.MinMsgSize
			if opt := q.IsEdns0(); opt != nil {
				size = int(opt.UDPSize())
			}
			m.Truncate(size)
		}
		w.WriteMsg(m)
	})
	srv := &dns.Server{PacketConn: pc, Handler: h}
	tsrv := &dns.Server{Listener: ln, Handler: h}
	go srv.ActivateAndServe()
	go tsrv.ActivateAndServe()
	defer srv.Shutdown()
	defer tsrv.Shutdown()
	r := &captureReplier{got: make(chan struct{}, 1)}
	d, _ := New(Options{Upstreams: []string{pc.LocalAddr().String()}, Replier: r, MaxUDPPayload: 1452})
	defer d.Close()
	q := query("big.example.test")
	q.SetEdns0(4096, false)
	b, _ := q.Pack()
	d.HandleUDP(netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("100.96.0.1:53"), b)
	select {
	case <-r.got:
	case <-time.After(5 * time.Second):
		t.Fatal("no answer")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.udp[0]) > 1452 {
		t.Fatalf("answer of %d bytes does not fit the MTU", len(r.udp[0]))
	}
	a := new(dns.Msg)
	if err := a.Unpack(r.udp[0]); err != nil || !a.Truncated {
		t.Fatalf("want a truncated answer: %v %v", err, a.Truncated)
	}
}

// FuzzDNSQuery: whatever the guest sends to port 53 is answered or dropped,
// never a crash.
func FuzzDNSQuery(f *testing.F) {
	q, _ := query("www.example.test").Pack()
	f.Add(q)
	f.Add([]byte{0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0})
	r := &captureReplier{got: make(chan struct{}, 1)}
	d, _ := New(Options{Replier: r, Timeout: 50 * time.Millisecond})
	defer d.Close()
	src := netip.MustParseAddrPort("100.96.0.2:5000")
	dst := netip.MustParseAddrPort("100.96.0.1:53")
	f.Fuzz(func(t *testing.T, b []byte) {
		d.HandleUDP(src, dst, b)
	})
}

// recordingUpstream answers every query with one A record and remembers
// what it received.
type recordingUpstream struct {
	mu   sync.Mutex
	got  []*dns.Msg
	addr string
	// mangle, when set, changes the answer before it is sent.
	mangle func(*dns.Msg)
}

func newRecordingUpstream(t *testing.T) *recordingUpstream {
	u := &recordingUpstream{}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		u.mu.Lock()
		u.got = append(u.got, q.Copy())
		mangle := u.mangle
		u.mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(q)
		m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(198, 51, 100, 7)})
		if mangle != nil {
			mangle(m)
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	u.addr = pc.LocalAddr().String()
	return u
}

func (u *recordingUpstream) queries() []*dns.Msg {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]*dns.Msg(nil), u.got...)
}

// TestDNSForwardsAFreshQuery: what reaches the upstream is the agent's own
// message, never the guest's: random ID, opcode QUERY, class IN, a known
// type, a minimal OPT; the guest gets its ID and question back.
func TestDNSForwardsAFreshQuery(t *testing.T) {
	up := newRecordingUpstream(t)
	d, _ := New(Options{Upstreams: []string{up.addr}, Timeout: 2 * time.Second})
	defer d.Close()
	q := query("WwW.Example.TEST")
	q.Id = 4242
	q.SetEdns0(4096, true)
	opt := q.IsEdns0()
	opt.Option = append(opt.Option, &dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: net.IPv4(100, 96, 0, 0).To4()},
		&dns.EDNS0_LOCAL{Code: 65001, Data: []byte("secret-from-the-guest")})
	a := d.Resolve(context.Background(), netip.AddrPort{}, q)
	if a.Rcode != dns.RcodeSuccess || a.Id != 4242 || a.Question[0].Name != "WwW.Example.TEST." || len(a.Answer) != 1 {
		t.Fatalf("guest's answer: id %d question %v rcode %d", a.Id, a.Question, a.Rcode)
	}
	got := up.queries()
	if len(got) != 1 {
		t.Fatalf("upstream saw %d queries", len(got))
	}
	u := got[0]
	if u.Id == 4242 || u.Opcode != dns.OpcodeQuery || u.Question[0].Qclass != dns.ClassINET {
		t.Errorf("upstream query: id %d opcode %d class %d", u.Id, u.Opcode, u.Question[0].Qclass)
	}
	uo := u.IsEdns0()
	if uo == nil || len(uo.Option) != 0 || uo.UDPSize() != upstreamEDNSSize || !uo.Do() {
		t.Errorf("upstream OPT: %v, want size %d, DO, no options", uo, upstreamEDNSSize)
	}

	// Messages that are not plain queries never go upstream.
	for _, tc := range []struct {
		name string
		make func() *dns.Msg
	}{
		{"update", func() *dns.Msg { m := query("example.test"); m.Opcode = dns.OpcodeUpdate; return m }},
		{"notify", func() *dns.Msg { m := query("example.test"); m.Opcode = dns.OpcodeNotify; return m }},
		{"axfr", func() *dns.Msg { m := new(dns.Msg); m.SetAxfr("example.test."); return m }},
		{"any", func() *dns.Msg { m := new(dns.Msg); m.SetQuestion("example.test.", dns.TypeANY); return m }},
		{"chaos", func() *dns.Msg { m := query("version.bind"); m.Question[0].Qclass = dns.ClassCHAOS; return m }},
	} {
		a := d.Resolve(context.Background(), netip.AddrPort{}, tc.make())
		if a.Rcode != dns.RcodeNotImplemented {
			t.Errorf("%s: rcode %s, want NOTIMP", tc.name, dns.RcodeToString[a.Rcode])
		}
	}
	if n := len(up.queries()); n != 1 {
		t.Errorf("upstream saw %d queries, want only the plain one", n)
	}
}

// TestDNSRefusesAnAnswerToAnotherQuestion: an upstream (or a spoofer)
// answering a different question gets SERVFAIL, not the guest's trust.
func TestDNSRefusesAnAnswerToAnotherQuestion(t *testing.T) {
	up := newRecordingUpstream(t)
	up.mu.Lock()
	up.mangle = func(m *dns.Msg) { m.Question[0].Name = "other.example.test." }
	up.mu.Unlock()
	d, _ := New(Options{Upstreams: []string{up.addr}, Timeout: time.Second})
	defer d.Close()
	if a := d.Resolve(context.Background(), netip.AddrPort{}, query("www.example.test")); a.Rcode != dns.RcodeServerFailure {
		t.Errorf("rcode %s, want SERVFAIL", dns.RcodeToString[a.Rcode])
	}
}

// TestDNSOverTCPIsBounded: connections past the cap are refused; one
// connection answers at most MaxTCPQueries and closes when idle.
func TestDNSOverTCPIsBounded(t *testing.T) {
	up := newRecordingUpstream(t)
	d, _ := New(Options{Upstreams: []string{up.addr}, MaxTCPConns: 2, MaxTCPQueries: 3, TCPIdleTimeout: 200 * time.Millisecond})
	defer d.Close()
	r1, ok1 := d.TryTCP()
	r2, ok2 := d.TryTCP()
	if !ok1 || !ok2 {
		t.Fatal("slots under the cap refused")
	}
	if _, ok := d.TryTCP(); ok {
		t.Fatal("a third connection over a cap of 2")
	}
	guest, agent := net.Pipe()
	done := make(chan struct{})
	go func() { d.ServeTCP(agent, netip.AddrPort{}); close(done) }()
	gc := &dns.Conn{Conn: guest}
	answered := 0
	for i := 0; i < 5; i++ {
		if err := gc.WriteMsg(query("www.example.test")); err != nil {
			break
		}
		if _, err := gc.ReadMsg(); err != nil {
			break
		}
		answered++
	}
	<-done
	r1()
	if answered != 3 {
		t.Errorf("answered %d queries on one connection, want 3", answered)
	}
	// An idle connection is closed.
	guest, agent = net.Pipe()
	start := time.Now()
	d.ServeTCP(agent, netip.AddrPort{})
	r2()
	if took := time.Since(start); took > time.Second {
		t.Errorf("idle connection held for %s", took)
	}
	guest.Close()
	if st := d.Stats(); st.TCPConns != 0 || st.TCPOverCap != 1 {
		t.Errorf("stats %+v", st)
	}
}

// TestDNSCloseRacesQueries: queries that arrive while the forwarder closes
// are dropped, never a panic (sync: WaitGroup reused).
func TestDNSCloseRacesQueries(t *testing.T) {
	for round := 0; round < 20; round++ {
		d, _ := New(Options{Replier: &captureReplier{got: make(chan struct{}, 1)}, Timeout: 10 * time.Millisecond})
		b, _ := query("www.example.test").Pack()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
						d.HandleUDP(netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("100.96.0.1:53"), b)
					}
				}
			}()
		}
		time.Sleep(2 * time.Millisecond)
		d.Close()
		close(stop)
		wg.Wait()
	}
}

// TestDNSCache: a repeated query is answered from the cache (TTLs counted
// down), not upstream; a failure is never cached.
func TestDNSCache(t *testing.T) {
	up := newRecordingUpstream(t)
	d, _ := New(Options{Upstreams: []string{up.addr}, Timeout: time.Second})
	defer d.Close()
	for i := 0; i < 3; i++ {
		a := d.Resolve(context.Background(), netip.AddrPort{}, query("www.example.test"))
		if a.Rcode != dns.RcodeSuccess || len(a.Answer) != 1 || a.Answer[0].Header().Ttl > 60 {
			t.Fatalf("answer %d: %v", i, a)
		}
	}
	if n := len(up.queries()); n != 1 {
		t.Errorf("upstream saw %d queries, want 1", n)
	}
	if st := d.Stats(); st.CacheHits != 2 || st.Cached != 1 {
		t.Errorf("stats %+v", st)
	}
	up.mu.Lock()
	up.mangle = func(m *dns.Msg) { m.Rcode = dns.RcodeServerFailure; m.Answer = nil }
	up.mu.Unlock()
	for i := 0; i < 2; i++ {
		d.Resolve(context.Background(), netip.AddrPort{}, query("fail.example.test"))
	}
	if n := len(up.queries()); n != 3 {
		t.Errorf("upstream saw %d queries, want every SERVFAIL asked again (3)", n)
	}
}

// TestDNSFloodIsBounded: a flood of new names stops at the upstream rate
// and the in-flight cap, the cache stays within its tables, and a name
// already cached is still answered during it.
func TestDNSFloodIsBounded(t *testing.T) {
	up := newRecordingUpstream(t)
	r := &captureReplier{got: make(chan struct{}, 1)}
	d, _ := New(Options{Upstreams: []string{up.addr}, Replier: r, UpstreamRate: 50, MaxInFlight: 4, CacheSize: 8})
	defer d.Close()
	src, dst := netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("100.96.0.1:53")
	known, _ := query("www.example.test").Pack()
	d.HandleUDP(src, dst, known)
	<-r.got
	for i := 0; i < 500; i++ {
		b, _ := query(fmt.Sprintf("r%d.flood.example.test", i)).Pack()
		d.HandleUDP(src, dst, b)
	}
	if !d.HandleUDP(src, dst, known) {
		t.Error("a cached name was not answered during the flood")
	}
	st := d.Stats()
	if st.RateLimited+st.Dropped < 400 || len(up.queries()) > 100 {
		t.Errorf("upstream saw %d queries; rate limited %d, dropped %d", len(up.queries()), st.RateLimited, st.Dropped)
	}
	deadline := time.Now().Add(2 * time.Second)
	for d.Stats().InFlight > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if st := d.Stats(); st.Cached > 8+2 {
		t.Errorf("%d answers cached, tables of 8 and 2", st.Cached)
	}
}

// TestDNSCacheSweepsExpired: answers that expire leave the cache on their
// own, without another query to push them out, and the table's map is made
// anew once it has emptied (a flood of random names otherwise left a full
// table of dead answers pinning the heap it had grown).
func TestDNSCacheSweepsExpired(t *testing.T) {
	defer func(d time.Duration) { sweepEvery = d }(sweepEvery)
	sweepEvery = 50 * time.Millisecond
	c := newDNSCache(64)
	defer c.close()
	for i := 0; i < 100; i++ {
		q := query(fmt.Sprintf("r%d.flood.example.test", i))
		a := new(dns.Msg)
		a.SetRcode(q, dns.RcodeNameError)
		a.Ns = []dns.RR{&dns.SOA{Hdr: dns.RR_Header{Name: "example.test.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 1}, Minttl: 1}}
		c.put(q, a)
	}
	keep := query("www.example.test")
	a := new(dns.Msg)
	a.SetReply(keep)
	a.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: "www.example.test.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(198, 51, 100, 10)}}
	c.put(keep, a)
	if n := c.len(); n != 17 { // 16 negative (a quarter of 64) and 1
		t.Fatalf("%d cached, want 17", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.len() > 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := c.len(); n != 1 || c.get(keep) == nil {
		t.Fatalf("%d cached after the negative answers expired, want the live one only", n)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.neg.peak != 0 || len(c.neg.m) != 0 {
		t.Errorf("negative table: peak %d, %d in map; want a new empty map", c.neg.peak, len(c.neg.m))
	}
	if c.sweep == nil {
		t.Error("no sweep pending while an entry is cached")
	}
}
