// Command msbtap-cni is msbtap's CNI plugin (network configuration
// "type": "msbtap-cni"): ADD starts an msbtap agent for the container's
// namespace, DEL stops it, CHECK verifies it. See package cni.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/msbtap/msbtap/cni"
)

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cni.Add, Del: cni.Del, Check: cni.Check, Status: cni.Status},
		version.All, "msbtap-cni: policed userspace networking for one container per msbtap agent")
}
