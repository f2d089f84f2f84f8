package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"
)

// The shell completions ask msbtap itself for the words that fit
// (urfave/cli's --generate-bash-completion), so they follow the flags.
const bashCompletion = `# bash completion for msbtap; install as
# /usr/share/bash-completion/completions/msbtap, or source it.
_msbtap() {
  local cur=${COMP_WORDS[COMP_CWORD]}
  local args=("${COMP_WORDS[@]:0:COMP_CWORD}")
  [[ $cur == -* ]] && args+=("$cur")
  COMPREPLY=($(compgen -W "$("${args[@]}" --generate-bash-completion 2>/dev/null)" -- "$cur"))
}
complete -o default -F _msbtap msbtap
`

const zshCompletion = `#compdef msbtap
# zsh completion for msbtap; install as _msbtap in a directory of $fpath.
_msbtap() {
  local cur=${words[CURRENT]}
  local -a args opts
  args=("${(@)words[1,CURRENT-1]}")
  [[ $cur == -* ]] && args+=("$cur")
  opts=("${(@f)$("${args[@]}" --generate-bash-completion 2>/dev/null)}")
  if [[ -n ${opts[1]} ]]; then _describe 'values' opts; else _files; fi
}
compdef _msbtap msbtap
`

func completionCommand() *cli.Command {
	return &cli.Command{
		Name:      "completion",
		Usage:     "print a shell completion script: bash, zsh or fish",
		ArgsUsage: "bash|zsh|fish",
		Action: func(c *cli.Context) error {
			var script string
			switch c.Args().First() {
			case "bash":
				script = bashCompletion
			case "zsh":
				script = zshCompletion
			case "fish":
				s, err := c.App.ToFishCompletion()
				if err != nil {
					return err
				}
				script = s
			default:
				return withStatus(2, errors.New("completion: want bash, zsh or fish"))
			}
			fmt.Fprint(c.App.Writer, script)
			return nil
		},
	}
}

// manCommand prints the man page, generated from the same flag definitions
// as --help; `make man` keeps docs/msbtap.1 current and a test checks it.
func manCommand() *cli.Command {
	return &cli.Command{
		Name:   "man",
		Usage:  "print the man page (roff)",
		Hidden: true,
		Action: func(c *cli.Context) error {
			s, err := c.App.ToManWithSection(1)
			if err != nil {
				return err
			}
			fmt.Fprint(c.App.Writer, s)
			return nil
		},
	}
}
