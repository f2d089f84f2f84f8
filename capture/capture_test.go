package capture

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/gopacket/gopacket/pcapgo"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestCaptureWritesAndRotates(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.pcap")
	c, err := Start(path, 4096)
	if err != nil {
		t.Fatal(err)
	}
	frame := make([]byte, 1000)
	for i := 0; i < 10; i++ {
		frame[0] = byte(i)
		c.Frame(frame)
	}
	c.Close()
	c.Frame(frame) // after Close: ignored, no panic
	if w, d := c.Stats(); w != 10 || d != 0 {
		t.Fatalf("written %d dropped %d", w, d)
	}
	total := 0
	for _, p := range []string{path, path + ".1"} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		st, _ := f.Stat()
		if st.Size() > 4096 {
			t.Errorf("%s: %d bytes, bound 4096", p, st.Size())
		}
		r, err := pcapgo.NewReader(f)
		if err != nil {
			t.Fatalf("%s: not a pcap file: %v", p, err)
		}
		for {
			data, _, err := r.ReadPacketData()
			if err != nil {
				break
			}
			if len(data) != 1000 {
				t.Errorf("packet of %d bytes", len(data))
			}
			total++
		}
		f.Close()
	}
	if total < 4 {
		t.Errorf("%d packets in the two files", total)
	}
}

func TestStartFileStopsAtTheCap(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handed.pcap")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	c, err := StartFile(f, path, 4096)
	if err != nil {
		t.Fatal(err)
	}
	frame := make([]byte, 1000)
	for i := 0; i < 10; i++ {
		c.Frame(frame)
	}
	c.Close()
	if w, d := c.Stats(); w != 4 || d != 6 {
		t.Fatalf("written %d dropped %d, want 4 and 6", w, d)
	}
	if _, err := os.Stat(path + ".1"); err == nil {
		t.Fatal("a handed-over file rotated")
	}
	r, _ := os.Open(path)
	defer r.Close()
	pr, err := pcapgo.NewReader(r)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for {
		if _, _, err := pr.ReadPacketData(); err != nil {
			break
		}
		n++
	}
	if n != 4 {
		t.Fatalf("%d packets in the file, want 4", n)
	}
}

func TestStartFileRefusesWhatItCannotWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ro.pcap")
	os.WriteFile(path, nil, 0o600)
	ro, _ := os.Open(path)
	if _, err := StartFile(ro, path, 0); err == nil {
		t.Fatal("a file open read-only was accepted")
	}
	d, _ := os.Open(dir)
	if _, err := StartFile(d, dir, 0); err == nil {
		t.Fatal("a directory was accepted")
	}
}
