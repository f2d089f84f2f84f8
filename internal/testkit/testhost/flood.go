package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// The floods below are what a hostile sandbox sends; the stress tests run
// them inside the sandbox, toward the test namespaces only. Each prints
// how many packets it sent.

// synflood --src A --dst A|CIDR --port P [--port-step 1] --seconds S:
// raw TCP SYNs from the guest's address, ports counting up or addresses
// random within the CIDR.
func synflood(args []string) {
	fs := flag.NewFlagSet("synflood", flag.ExitOnError)
	src := fs.String("src", "100.96.0.2", "source address (the guest's own)")
	dst := fs.String("dst", "", "destination address or CIDR (random addresses in it)")
	port := fs.Int("port", 1, "first destination port")
	step := fs.Int("port-step", 0, "add this to the port for every SYN")
	secs := fs.Float64("seconds", 5, "how long")
	fs.Parse(args)
	pfx, err := netip.ParsePrefix(*dst)
	if err != nil {
		a := netip.MustParseAddr(*dst)
		pfx = netip.PrefixFrom(a, 32)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
	if err != nil {
		log.Fatal(err)
	}
	s := netip.MustParseAddr(*src)
	pkt := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
	end := time.Now().Add(time.Duration(*secs * float64(time.Second)))
	n, p := 0, *port
	for time.Now().Before(end) {
		d := pfx.Addr()
		if pfx.Bits() < 32 {
			b := d.As4()
			host := rand.Uint32() & (1<<(32-pfx.Bits()) - 1)
			binary.BigEndian.PutUint32(b[:], binary.BigEndian.Uint32(b[:])|host)
			d = netip.AddrFrom4(b)
		}
		dp := uint16(p%65535 + 1)
		p += *step
		ip := header.IPv4(pkt)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(pkt)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
			SrcAddr: tcpip.AddrFrom4(s.As4()), DstAddr: tcpip.AddrFrom4(d.As4()), ID: uint16(n)})
		ip.SetChecksum(^ip.CalculateChecksum())
		t := header.TCP(pkt[header.IPv4MinimumSize:])
		t.Encode(&header.TCPFields{SrcPort: uint16(10000 + rand.IntN(50000)), DstPort: dp, SeqNum: rand.Uint32(),
			DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn, WindowSize: 65535})
		xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpip.AddrFrom4(s.As4()), tcpip.AddrFrom4(d.As4()), header.TCPMinimumSize)
		t.SetChecksum(^t.CalculateChecksum(xsum))
		sa := &unix.SockaddrInet4{Addr: d.As4()}
		if err := unix.Sendto(fd, pkt, 0, sa); err == nil {
			n++
		}
	}
	fmt.Printf("sent=%d\n", n)
}

// udpflood --dst A --ports LO-HI --seconds S: one datagram per port, round
// and round.
func udpflood(args []string) {
	fs := flag.NewFlagSet("udpflood", flag.ExitOnError)
	dst := fs.String("dst", "", "destination address")
	lo := fs.Int("lo", 10000, "first port")
	hi := fs.Int("hi", 60000, "last port")
	secs := fs.Float64("seconds", 5, "how long")
	fs.Parse(args)
	c, err := net.ListenUDP("udp", nil)
	if err != nil {
		log.Fatal(err)
	}
	a := netip.MustParseAddr(*dst)
	end := time.Now().Add(time.Duration(*secs * float64(time.Second)))
	n, p := 0, *lo
	msg := []byte("flood")
	for time.Now().Before(end) {
		if _, err := c.WriteToUDPAddrPort(msg, netip.AddrPortFrom(a, uint16(p))); err == nil {
			n++
		}
		if p++; p > *hi {
			p = *lo
		}
	}
	fmt.Printf("sent=%d\n", n)
}

// dnsflood --server A --seconds S: queries for random names, not waiting
// for answers.
func dnsflood(args []string) {
	fs := flag.NewFlagSet("dnsflood", flag.ExitOnError)
	server := fs.String("server", "100.96.0.1:53", "DNS server")
	secs := fs.Float64("seconds", 5, "how long")
	fs.Parse(args)
	c, err := net.Dial("udp", *server)
	if err != nil {
		log.Fatal(err)
	}
	go func() { // drain answers so the socket never fills
		b := make([]byte, 4096)
		for {
			if _, err := c.Read(b); err != nil {
				return
			}
		}
	}()
	end := time.Now().Add(time.Duration(*secs * float64(time.Second)))
	n := 0
	q := new(dns.Msg)
	for time.Now().Before(end) {
		q.SetQuestion(fmt.Sprintf("r%x.flood.example.test.", rand.Uint64()), dns.TypeA)
		b, _ := q.Pack()
		if _, err := c.Write(b); err == nil {
			n++
		}
	}
	fmt.Printf("sent=%d\n", n)
}

// garbage --iface I --seconds S: malformed frames from inside the sandbox,
// random bytes behind plausible Ethernet and IP headers (a packet socket).
func garbage(args []string) {
	fs := flag.NewFlagSet("garbage", flag.ExitOnError)
	iface := fs.String("iface", "eth0", "interface")
	secs := fs.Float64("seconds", 5, "how long")
	fs.Parse(args)
	ifi, err := net.InterfaceByName(*iface)
	if err != nil {
		log.Fatal(err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	if err != nil {
		log.Fatal(err)
	}
	sa := &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6}
	end := time.Now().Add(time.Duration(*secs * float64(time.Second)))
	n := 0
	b := make([]byte, 1514)
	for time.Now().Before(end) {
		size := 14 + rand.IntN(len(b)-14)
		for i := range b[:size] {
			b[i] = byte(rand.Uint32())
		}
		copy(b[0:6], []byte{0x02, 0x6d, 0x73, 0, 0, 1}) // the gateway
		copy(b[6:12], ifi.HardwareAddr)
		switch rand.IntN(4) {
		case 0:
			b[12], b[13] = 0x08, 0x00
			b[14] = 0x45
		case 1:
			b[12], b[13] = 0x86, 0xdd
			b[14] = 0x60
		case 2:
			b[12], b[13] = 0x08, 0x06
		}
		if unix.Sendto(fd, b[:size], 0, sa) == nil {
			n++
		}
	}
	fmt.Printf("sent=%d\n", n)
}

// churn ADDR N PAR: N TCP connections, PAR at a time, each connect, one
// byte each way (an echo server), close; prints ok=X failed=Y.
func churn(args []string) {
	if len(args) != 3 {
		log.Fatal("usage: testhost churn ADDR N PAR")
	}
	var n, par int
	fmt.Sscan(args[1], &n)
	fmt.Sscan(args[2], &par)
	jobs := make(chan struct{}, n)
	for i := 0; i < n; i++ {
		jobs <- struct{}{}
	}
	close(jobs)
	results := make(chan error, n)
	for w := 0; w < par; w++ {
		go func() {
			b := []byte{'x'}
			for range jobs {
				c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
				if err != nil {
					results <- err
					continue
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				_, err = c.Write(b)
				if err == nil {
					_, err = c.Read(b)
				}
				c.Close()
				results <- err
			}
		}()
	}
	ok, failed := 0, 0
	kinds := map[string]int{} // what failed, without the ports
	for i := 0; i < n; i++ {
		if err := <-results; err != nil {
			failed++
			var op *net.OpError
			if errors.As(err, &op) {
				kinds[op.Op+": "+op.Err.Error()]++
			} else {
				kinds[err.Error()]++
			}
		} else {
			ok++
		}
	}
	fmt.Printf("ok=%d failed=%d", ok, failed)
	for k, v := range kinds {
		fmt.Printf(" [%d× %s]", v, k)
	}
	fmt.Println()
}

// resolve NAME SERVER: look NAME up (A) as a resolver with a fast retry
// would, asking again every 250 ms for at most a second; prints the
// address and how long it took, or fails.
func resolveClient(args []string) {
	if len(args) != 2 {
		log.Fatal("usage: testhost resolve NAME SERVER")
	}
	c := &dns.Client{Net: "udp", Timeout: 250 * time.Millisecond}
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(args[0]), dns.TypeA)
	start := time.Now()
	for time.Since(start) < time.Second {
		a, _, err := c.Exchange(q, args[1])
		if err == nil && len(a.Answer) > 0 {
			if rr, ok := a.Answer[0].(*dns.A); ok {
				fmt.Printf("%s %d\n", rr.A, time.Since(start).Milliseconds())
				return
			}
		}
	}
	fmt.Println("unanswered within 1 s")
	os.Exit(1)
}
