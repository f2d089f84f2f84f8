package audit

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/msbtap/msbtap/policy"
)

func TestLearnFrom(t *testing.T) {
	log := strings.Join([]string{
		`{"time":"t","direction":"egress","proto":"dns","transport":"udp","src":"100.96.0.2:5000","domain":"api.example.test","rule":-4,"rule_text":"resolve all","action":"allow"}`,
		`{"time":"t","direction":"egress","proto":"dns","transport":"udp","src":"100.96.0.2:5000","domain":"refused.example.test","rule":-1,"rule_text":"default","action":"deny"}`,
		`{"time":"t","direction":"egress","proto":"dns","transport":"udp","src":"100.96.0.2:5000","domain":"blocked.example.test","rule":-2,"rule_text":"dns block list","action":"deny"}`,
		`{"time":"t","direction":"egress","proto":"tcp","src":"100.96.0.2:40000","dst":"198.51.100.7:443","domain":"api.example.test","rule":2,"rule_text":"r","action":"allow","repeats":3}`,
		`{"time":"t","direction":"egress","proto":"tcp","src":"100.96.0.2:40001","dst":"198.51.100.7:443","domain":"api.example.test","rule":-1,"rule_text":"d","action":"deny","mode":"refused","sni":"sni.example.test"}`,
		`{"time":"t","direction":"egress","proto":"tcp","src":"100.96.0.2:40002","dst":"198.51.100.8:80","rule":-1,"rule_text":"d","action":"deny","host":"host.example.test","method":"GET","path":"/"}`,
		`{"time":"t","direction":"egress","proto":"udp","src":"100.96.0.2:40003","dst":"198.51.100.9:7002","rule":-1,"rule_text":"d","action":"deny"}`,
		`{"time":"t","direction":"egress","proto":"tcp","src":"100.96.0.2:40004","dst":"198.51.100.66:22","rule":0,"rule_text":"explicit","action":"deny"}`,
		`{"time":"t","direction":"egress","proto":"tcp","src":"100.96.0.2:40005","dst":"169.254.169.254:80","rule":-1,"rule_text":"d","action":"deny"}`,
		`{"time":"t","direction":"egress","proto":"tcp","src":"100.96.0.2:40006","dst":"100.96.0.1:8080","rule":-1,"rule_text":"d","action":"deny"}`,
		`{"time":"t","direction":"egress","proto":"icmp","src":"100.96.0.2:0","dst":"198.51.100.10:0","rule":-1,"rule_text":"d","action":"deny"}`,
		`{"time":"t","direction":"egress","proto":"udp","src":"100.96.0.2:40007","dst":"198.51.100.7:443","rule":-8,"rule_text":"QUIC","action":"deny"}`,
		`{"time":"t","direction":"ingress","proto":"tcp","src":"127.0.0.1:5555","dst":"100.96.0.2:80","rule":-1,"rule_text":"d","action":"allow"}`,
		`not json`,
		``,
	}, "\n")
	l := policy.NewLearner()
	used, bad, err := LearnFrom(strings.NewReader(log), l)
	if err != nil || used != 7 || bad != 1 {
		t.Fatalf("used %d, bad %d, %v", used, bad, err)
	}
	js, _ := json.Marshal(l.Policy(policy.LearnOptions{}))
	want := `{"default_action":"deny","rules":[` +
		`{"destination":{"domain":"api.example.test"},"protocols":["tcp"],"ports":[{"start":443,"end":443}],"action":"allow"},` +
		`{"destination":{"domain":"host.example.test"},"protocols":["tcp"],"ports":[{"start":80,"end":80}],"action":"allow"},` +
		`{"destination":{"domain":"refused.example.test"},"protocols":["dns"],"action":"allow"},` +
		`{"destination":{"domain":"sni.example.test"},"protocols":["tcp"],"ports":[{"start":443,"end":443}],"action":"allow"},` +
		`{"destination":{"cidr":"198.51.100.9"},"protocols":["udp"],"ports":[{"start":7002,"end":7002}],"action":"allow"},` +
		`{"destination":{"cidr":"198.51.100.10"},"protocols":["icmp"],"action":"allow"}]}`
	if string(js) != want {
		t.Errorf("got  %s\nwant %s", js, want)
	}
	if _, err := policy.ParseFile(js); err != nil {
		t.Errorf("the suggested policy does not parse: %v", err)
	}
}
