package main

import (
	"fmt"
	"strings"
)

// flagSpec is one command-line option in swtpm's getopt_long style: a long
// name, an optional short name, and whether it takes a value.
type flagSpec struct {
	long, short string
	takesValue  bool
	set         func(value string) error
}

// parseArgs applies args to specs. Long options take "--name value" or
// "--name=value"; names must match exactly (no prefix matching), and stray
// positional arguments fail.
func parseArgs(cmd string, args []string, specs []flagSpec) error {
	find := func(name string) *flagSpec {
		for i := range specs {
			if "--"+specs[i].long == name || (specs[i].short != "" && "-"+specs[i].short == name) {
				return &specs[i]
			}
		}
		return nil
	}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if !strings.HasPrefix(arg, "-") || arg == "-" || arg == "--" {
			return fmt.Errorf("%s: unexpected argument %q", cmd, arg)
		}
		name, value, hasValue := strings.Cut(arg, "=")
		if !strings.HasPrefix(name, "--") {
			hasValue = false
			name, value = arg, ""
		}
		spec := find(name)
		if spec == nil {
			return fmt.Errorf("%s: unknown option %q", cmd, name)
		}
		switch {
		case spec.takesValue && !hasValue:
			if i+1 >= len(args) {
				return fmt.Errorf("%s: option %s needs a value", cmd, name)
			}
			i++
			value = args[i]
		case !spec.takesValue && hasValue:
			return fmt.Errorf("%s: option %s takes no value", cmd, name)
		}
		if err := spec.set(value); err != nil {
			return fmt.Errorf("%s: %w", cmd, err)
		}
	}
	return nil
}

func setBool(b *bool) func(string) error {
	return func(string) error { *b = true; return nil }
}

func setString(s *string) func(string) error {
	return func(v string) error { *s = v; return nil }
}
