package settings

import (
	"github.com/msbtap/msbtap/sandbox"
)

// The rules some settings share.

// onOff is the choice of a switch setting.
var onOff = map[string]bool{"on": true, "off": false}

// inheritedFD reports whether fd can be a descriptor msbtap inherits for
// it to write to (not stdin, stdout or stderr), or -1 for none.
func inheritedFD(fd int) bool { return fd == -1 || fd > 2 }

const wantRate = "want a rate like 100mbit, 20MB (bytes a second) or off"

// needCommand refuses a setting of the command msbtap starts without one.
func needCommand(b *build, v []string) error {
	if len(v) > 0 && len(b.Command) == 0 {
		return bad(v[0], "only with a command to run")
	}
	return nil
}

// addBinds checks --bind's or --bind-ro's paths and shares them.
func addBinds(b *build, v []string, readOnly bool) error {
	if err := needCommand(b, v); err != nil {
		return err
	}
	for _, path := range v {
		p, err := sandbox.CheckBind(path)
		if err != nil {
			return bad(path, "%w", err)
		}
		b.CommandBinds = append(b.CommandBinds, sandbox.Bind{Path: p, ReadOnly: readOnly})
	}
	return nil
}

// notInVM refuses binds in VM mode.
func notInVM(b *build, readOnly bool) error {
	for _, bd := range b.CommandBinds {
		if b.VM && bd.ReadOnly == readOnly {
			return bad(bd.Path, "not in VM mode: the VMM shares the host's file system")
		}
	}
	return nil
}

// needUpstream refuses an upstream proxy's setting without the proxy
// (its value, a path or the name of a variable, is not shown).
func needUpstream(b *build, given bool) error {
	if given && !b.Upstream.Enabled() {
		return bad("…", "only with an upstream proxy")
	}
	return nil
}
