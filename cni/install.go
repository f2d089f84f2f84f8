package cni

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Install copies the plugin, the agent and a network configuration list
// into a node's CNI directories, each atomically (written beside its
// target, synced, then renamed over it), so a runtime never runs half a
// binary or reads half a configuration. The configuration list is checked
// with the plugin's own parser first.
type Install struct {
	Plugin, Agent, Conflist string // sources
	BinDir, ConfDir         string // targets
}

// InstallMain is `msbtap-cni install [flags]`, a DaemonSet's init step:
// by default it installs the files that sit beside the plugin's binary
// (msbtap and 10-msbtap.conflist) into /host/opt/cni/bin and
// /host/etc/cni/net.d.
func InstallMain(args []string, stdout, stderr io.Writer) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(stderr, "msbtap-cni install:", err)
		return 1
	}
	here := filepath.Dir(self)
	fs := flag.NewFlagSet("msbtap-cni install", flag.ContinueOnError)
	fs.SetOutput(stderr)
	in := Install{Plugin: self}
	fs.StringVar(&in.Agent, "msbtap", filepath.Join(here, "msbtap"), "the agent binary to install")
	fs.StringVar(&in.Conflist, "conflist", filepath.Join(here, "10-msbtap.conflist"), "the network configuration list to install")
	fs.StringVar(&in.BinDir, "bin-dir", "/host/opt/cni/bin", "the node's CNI binary directory")
	fs.StringVar(&in.ConfDir, "conf-dir", "/host/etc/cni/net.d", "the node's CNI configuration directory")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := in.Run(); err != nil {
		fmt.Fprintln(stderr, "msbtap-cni install:", err)
		return 1
	}
	fmt.Fprintf(stdout, "installed msbtap-cni and msbtap in %s, %s in %s\n", in.BinDir, filepath.Base(in.Conflist), in.ConfDir)
	return 0
}

// Run checks the configuration list and installs the three files.
func (in Install) Run() error {
	b, err := os.ReadFile(in.Conflist)
	if err != nil {
		return err
	}
	if err := CheckConflist(b); err != nil {
		return fmt.Errorf("%s: %w", in.Conflist, err)
	}
	for _, f := range []struct {
		src, dir, name string
		mode           os.FileMode
	}{
		{in.Plugin, in.BinDir, "msbtap-cni", 0o755},
		{in.Agent, in.BinDir, "msbtap", 0o755},
		{in.Conflist, in.ConfDir, filepath.Base(in.Conflist), 0o644},
	} {
		if err := copyAtomic(f.src, filepath.Join(f.dir, f.name), f.mode); err != nil {
			return err
		}
	}
	return nil
}

// CheckConflist parses a network configuration list and checks every
// msbtap-cni entry of it as ADD would (without a pod's arguments).
func CheckConflist(b []byte) error {
	var list struct {
		CNIVersion string            `json:"cniVersion"`
		Name       string            `json:"name"`
		Plugins    []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("not a network configuration list: %v", err)
	}
	if list.Name == "" || list.CNIVersion == "" || len(list.Plugins) == 0 {
		return fmt.Errorf("a network configuration list needs cniVersion, name and plugins")
	}
	found := false
	for i, p := range list.Plugins {
		var t struct {
			Type string `json:"type"`
		}
		json.Unmarshal(p, &t)
		if t.Type != "msbtap-cni" {
			continue
		}
		found = true
		if _, err := ParseConf(p, ""); err != nil {
			return fmt.Errorf("plugins[%d]: %w", i, err)
		}
	}
	if !found {
		return fmt.Errorf("no msbtap-cni plugin in the list")
	}
	return nil
}

// copyAtomic copies src to dst through a temporary file in dst's
// directory.
func copyAtomic(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}
