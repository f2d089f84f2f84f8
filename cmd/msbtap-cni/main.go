// Command msbtap-cni is msbtap's CNI plugin (network configuration
// "type": "msbtap-cni"): ADD starts an msbtap agent for the container's
// namespace, DEL stops it, CHECK verifies it. See package cni.
//
// Two modes run it by hand rather than as a runtime's plugin:
// `msbtap-cni install` copies the plugin, the agent and the network
// configuration into a node's CNI directories (a DaemonSet's init step),
// and `msbtap-cni supervise` is the process ADD leaves behind to restart
// an agent that dies.
package main

import (
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/msbtap/msbtap/cni"
)

func main() {
	// A runtime runs a plugin with no arguments (CNI_COMMAND says what to do).
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "supervise":
			os.Exit(cni.Supervise(os.Args[2:], os.Stderr))
		case "install":
			os.Exit(cni.InstallMain(os.Args[2:], os.Stdout, os.Stderr))
		}
	}
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cni.Add, Del: cni.Del, Check: cni.Check, Status: cni.Status},
		version.All, "msbtap-cni: policed userspace networking for one container per msbtap agent")
}
