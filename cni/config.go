// Package cni makes msbtap a CNI plugin: ADD starts one msbtap agent for a
// container's network namespace (its TAP inside, the addresses of a slot
// allocated on the host), DEL stops it and releases everything, CHECK
// verifies it. The agents outlive the plugin process: each runs in a
// systemd scope of its own where systemd runs, or detached in a session of
// its own, with its state under /run/msbtap/<container-id>.
package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/msbtap/msbtap/internal/portspec"
	"github.com/msbtap/msbtap/policy"
)

// NetConf is the plugin's network configuration. Every field but the
// standard ones is optional; {"type": "msbtap-cni"} runs msbtap with the
// defaults of `msbtap run`.
type NetConf struct {
	types.NetConf
	// Policy is a preset name, a policy file's path, or an inline policy.
	Policy json.RawMessage `json:"policy,omitempty"`
	// PolicyDir holds policies a pod may pick by name (runtime argument
	// MSBTAP_POLICY, or runtimeConfig msbtapPolicy): PolicyDir/NAME.json.
	// A pod never names a path.
	PolicyDir    string   `json:"policyDir,omitempty"`
	DNSUpstreams []string `json:"dnsUpstreams,omitempty"`
	MTU          int      `json:"mtu,omitempty"`
	// AuditLogDir gets one decision log per container, <id>.log.
	AuditLogDir string `json:"auditLogDir,omitempty"`
	// MetricsHost and MetricsPortBase serve each agent's /metrics on
	// MetricsHost:(MetricsPortBase+slot-SlotRange[0]). A slot whose port
	// another process holds is skipped, so a busy port costs a slot, not
	// the pod.
	MetricsHost     string `json:"metricsHost,omitempty"`
	MetricsPortBase int    `json:"metricsPortBase,omitempty"`
	DenyMode        string `json:"denyMode,omitempty"`
	// SlotRange is the slots this plugin hands out (default 1024..65535;
	// msbtap run uses slot 0 unless told).
	SlotRange []int `json:"slotRange,omitempty"`
	// StateDir holds the agents' state (default /run/msbtap).
	StateDir string `json:"stateDir,omitempty"`
	// Msbtap is the agent binary (default: msbtap beside the plugin in
	// CNI_PATH, else on PATH).
	Msbtap string `json:"msbtap,omitempty"`

	RuntimeConfig struct {
		PortMappings []PortMapping `json:"portMappings,omitempty"`
		MsbtapPolicy string        `json:"msbtapPolicy,omitempty"`
		// PodAnnotations is containerd's io.kubernetes.cri.pod-annotations
		// capability: the pod's annotations, of which PolicyAnnotation
		// names the pod's policy in PolicyDir.
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
	} `json:"runtimeConfig,omitempty"`
}

// PolicyAnnotation is the pod annotation that picks a policy of PolicyDir
// by name (containerd passes annotations to plugins that declare the
// io.kubernetes.cri.pod-annotations capability).
const PolicyAnnotation = "msbtap.io/policy"

// PortMapping is the portMappings capability's entry.
type PortMapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
}

// Defaults.
const (
	DefaultStateDir = "/run/msbtap"
	defaultSlotLo   = 1024
	defaultSlotHi   = 65535
)

var (
	idRE         = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$`)
	policyNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$`)
)

// parseBare reads the configuration with its defaults and checks nothing
// else: what DEL needs (the state directory), which must work for a pod
// whose configuration stopped validating after its ADD.
func parseBare(b []byte) (*NetConf, error) {
	var c NetConf
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("network configuration: %v", err)
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	return &c, nil
}

// ParseConf parses and checks the network configuration; cniArgs are the
// runtime's CNI_ARGS (K=V;K=V).
func ParseConf(b []byte, cniArgs string) (*NetConf, error) {
	cp, err := parseBare(b)
	if err != nil {
		return nil, err
	}
	c := *cp
	switch len(c.SlotRange) {
	case 0:
		c.SlotRange = []int{defaultSlotLo, defaultSlotHi}
	case 2:
		if c.SlotRange[0] < 0 || c.SlotRange[1] > defaultSlotHi || c.SlotRange[0] > c.SlotRange[1] {
			return nil, fmt.Errorf("slotRange %v: want [LO, HI] within 0..65535", c.SlotRange)
		}
	default:
		return nil, fmt.Errorf("slotRange %v: want [LO, HI]", c.SlotRange)
	}
	if c.MTU != 0 && (c.MTU < 1280 || c.MTU > 65520) {
		return nil, fmt.Errorf("mtu %d: out of range 1280..65520", c.MTU)
	}
	if c.DenyMode != "" && c.DenyMode != "reject" && c.DenyMode != "drop" {
		return nil, fmt.Errorf("denyMode %q: want reject or drop", c.DenyMode)
	}
	if c.MetricsHost != "" || c.MetricsPortBase != 0 {
		span := c.SlotRange[1] - c.SlotRange[0]
		if c.MetricsHost == "" || c.MetricsPortBase < 1 || c.MetricsPortBase+span > 65535 {
			return nil, fmt.Errorf("metricsHost %q, metricsPortBase %d: give both, with the base plus the slot range's width (%d, slotRange %v) at most 65535", c.MetricsHost, c.MetricsPortBase, span, c.SlotRange)
		}
		if net.ParseIP(c.MetricsHost) == nil {
			return nil, fmt.Errorf("metricsHost %q: not an IP address", c.MetricsHost)
		}
	}
	for _, u := range c.DNSUpstreams {
		if _, _, err := net.SplitHostPort(u); err != nil && net.ParseIP(u) == nil {
			return nil, fmt.Errorf("dnsUpstreams: %q is not an address", u)
		}
	}
	if name := podPolicy(&c, cniArgs); name != "" {
		if c.PolicyDir == "" {
			return nil, fmt.Errorf("policy %q asked for by the pod, but the network configuration has no policyDir", name)
		}
		if !policyNameRE.MatchString(name) {
			return nil, fmt.Errorf("policy %q asked for by the pod: want a name (letters, digits, '.', '_', '-'), not a path", name)
		}
		c.Policy, _ = json.Marshal(filepath.Join(c.PolicyDir, name+".json"))
	}
	if err := c.checkPolicy(); err != nil {
		return nil, err
	}
	for _, pm := range c.RuntimeConfig.PortMappings {
		if _, err := pm.spec(); err != nil {
			return nil, err
		}
	}
	return &c, nil
}

// podPolicy is the policy name the runtime passes for this pod, if any:
// CNI_ARGS MSBTAP_POLICY, runtimeConfig msbtapPolicy, or the pod's
// PolicyAnnotation.
func podPolicy(c *NetConf, cniArgs string) string {
	for _, kv := range strings.Split(cniArgs, ";") {
		if k, v, ok := strings.Cut(kv, "="); ok && k == "MSBTAP_POLICY" {
			return v
		}
	}
	if c.RuntimeConfig.MsbtapPolicy != "" {
		return c.RuntimeConfig.MsbtapPolicy
	}
	return c.RuntimeConfig.PodAnnotations[PolicyAnnotation]
}

// metricsAddr is where slot's agent serves /metrics, if anywhere.
func (c *NetConf) metricsAddr(slot int) string {
	if c.MetricsHost == "" {
		return ""
	}
	return net.JoinHostPort(c.MetricsHost, strconv.Itoa(c.MetricsPortBase+slot-c.SlotRange[0]))
}

// policyArg is the --policy the agent gets: a preset, a file, or the
// inline policy written to path.
func (c *NetConf) policyArg(dir string) (string, error) {
	if len(c.Policy) == 0 {
		return "", nil
	}
	var name string
	if json.Unmarshal(c.Policy, &name) == nil {
		return name, nil
	}
	p := filepath.Join(dir, "policy.json")
	return p, os.WriteFile(p, c.Policy, 0o600)
}

func (c *NetConf) checkPolicy() error {
	if len(c.Policy) == 0 {
		return nil
	}
	var name string
	if json.Unmarshal(c.Policy, &name) == nil {
		if _, err := policy.Load(name); err != nil {
			return fmt.Errorf("policy: %w", err)
		}
		return nil
	}
	if _, err := policy.ParseFile(c.Policy); err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	return nil
}

// spec turns a port mapping into a --publish spec.
func (pm PortMapping) spec() (string, error) {
	proto := strings.ToLower(pm.Protocol)
	if proto == "" {
		proto = "tcp"
	}
	if proto != "tcp" && proto != "udp" {
		return "", fmt.Errorf("portMappings: protocol %q: want tcp or udp", pm.Protocol)
	}
	if pm.HostPort < 1 || pm.HostPort > 65535 || pm.ContainerPort < 1 || pm.ContainerPort > 65535 {
		return "", fmt.Errorf("portMappings: %d:%d: ports must be 1..65535", pm.HostPort, pm.ContainerPort)
	}
	// A hostPort without hostIP listens on every address, as
	// Kubernetes means it.
	hostIP := pm.HostIP
	if hostIP == "" {
		hostIP = "0.0.0.0"
	}
	ip := net.ParseIP(hostIP)
	if ip == nil {
		return "", fmt.Errorf("portMappings: hostIP %q is not an address", pm.HostIP)
	}
	host := hostIP + ":" + strconv.Itoa(pm.HostPort)
	if ip.To4() == nil {
		host = "[" + hostIP + "]:" + strconv.Itoa(pm.HostPort)
	}
	s := host + ":" + strconv.Itoa(pm.ContainerPort) + "/" + proto
	if _, err := portspec.ParseAll([]string{s}); err != nil {
		return "", fmt.Errorf("portMappings: %v", err)
	}
	return s, nil
}

// checkID refuses a container id that could name another path.
func checkID(id string) error {
	if !idRE.MatchString(id) {
		return errors.New("container id: want letters, digits, '.', '_' and '-' only")
	}
	return nil
}
