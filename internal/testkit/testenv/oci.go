package testenv

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// Image describes a container image the engine tests build locally (no
// registry is reachable): files copied from the host, symbolic links, and
// the process it runs.
type Image struct {
	Name       string            // e.g. localhost/msbtap-busybox:test
	Files      map[string]string // path in the image -> file on the host
	Contents   map[string]string // path in the image -> contents
	Symlinks   map[string]string // path in the image -> target
	Entrypoint []string
	Cmd        []string
}

// BusyboxImage is a busybox image (Debian's busybox-static, its applets
// as links in /bin) with testhost as /bin/testhost and a page to serve in
// /www.
func BusyboxImage(t testing.TB, name, testhost string) Image {
	t.Helper()
	bb, err := filepathLook("busybox")
	if err != nil {
		t.Skip("busybox (busybox-static) not installed: `make deps`, as root, installs what the tests need")
	}
	img := Image{Name: name, Files: map[string]string{"bin/busybox": bb, "bin/testhost": testhost},
		Contents: map[string]string{"www/index.html": "hello from a pod\n", "etc/passwd": "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
			"etc/group": "root:x:0:\nnogroup:x:65534:\n"},
		Symlinks: map[string]string{}, Cmd: []string{"/bin/sleep", "3600"}}
	for _, a := range []string{"sh", "sleep", "wget", "nslookup", "cat", "httpd", "ip", "ping", "echo", "ls", "id", "true", "timeout"} {
		img.Symlinks["bin/"+a] = "busybox"
	}
	return img
}

func filepathLook(name string) (string, error) {
	for _, d := range []string{"/bin", "/usr/bin", "/sbin", "/usr/sbin"} {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", os.ErrNotExist
}

// WriteOCIArchive writes img as an OCI image layout in a tar file (what
// `ctr images import` and `podman load` read) and returns its path.
func (img Image) WriteOCIArchive(t testing.TB, dir string) string {
	t.Helper()
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	dirs := map[string]bool{}
	addDirs := func(p string) {
		for d := filepath.Dir(p); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	var paths []string
	for p := range img.Files {
		paths = append(paths, p)
	}
	for p := range img.Contents {
		paths = append(paths, p)
	}
	for p := range img.Symlinks {
		paths = append(paths, p)
	}
	for _, p := range paths {
		addDirs(p)
	}
	for _, d := range []string{"tmp", "proc", "sys", "dev", "etc", "run"} {
		dirs[d] = true
	}
	var ds []string
	for d := range dirs {
		ds = append(ds, d)
	}
	sort.Strings(ds)
	for _, d := range ds {
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755})
	}
	sort.Strings(paths)
	for _, p := range paths {
		switch {
		case img.Files[p] != "":
			b, err := os.ReadFile(img.Files[p])
			if err != nil {
				t.Fatal(err)
			}
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: 0o755, Size: int64(len(b))})
			tw.Write(b)
		case img.Symlinks[p] != "":
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: p, Linkname: img.Symlinks[p], Mode: 0o777})
		default:
			b := []byte(img.Contents[p])
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: 0o644, Size: int64(len(b))})
			tw.Write(b)
		}
	}
	tw.Close()
	blobs := map[string][]byte{}
	put := func(b []byte) (string, int) {
		h := sha256.Sum256(b)
		d := "sha256:" + hex.EncodeToString(h[:])
		blobs[hex.EncodeToString(h[:])] = b
		return d, len(b)
	}
	layerDigest, layerSize := put(layer.Bytes())
	cfg, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"config": map[string]any{"Entrypoint": img.Entrypoint, "Cmd": img.Cmd, "Env": []string{"PATH=/bin"}},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
	})
	cfgDigest, cfgSize := put(cfg)
	man, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfgDigest, "size": cfgSize},
		"layers": []any{map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layerDigest, "size": layerSize}},
	})
	manDigest, manSize := put(man)
	index, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"manifests": []any{map[string]any{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manDigest, "size": manSize,
			"annotations": map[string]string{"io.containerd.image.name": img.Name, "org.opencontainers.image.ref.name": img.Name}}},
	})
	out := filepath.Join(dir, strings.ReplaceAll(filepath.Base(img.Name), ":", "-")+".oci.tar")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ow := tar.NewWriter(f)
	file := func(name string, b []byte) {
		ow.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(b))})
		ow.Write(b)
	}
	ow.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "blobs/", Mode: 0o755})
	ow.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "blobs/sha256/", Mode: 0o755})
	var keys []string
	for k := range blobs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		file("blobs/sha256/"+k, blobs[k])
	}
	file("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`))
	file("index.json", index)
	if err := ow.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}
