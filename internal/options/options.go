// Package options parses swtpm's sub-option strings, such as
// "type=unixio,path=/run/x.sock,mode=0600,terminate": comma-separated
// name=value pairs or bare names, each name known in advance.
package options

import (
	"fmt"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
)

// Values are the parsed sub-options of one command-line option.
type Values struct {
	option string
	values map[string]string
}

// Parse parses s, the value of the command-line option named option, which
// takes the sub-options in allowed. Unknown, repeated or empty names fail.
func Parse(option, s string, allowed ...string) (Values, error) {
	v := Values{option: option, values: map[string]string{}}
	if s == "" {
		return v, fmt.Errorf("%s: empty value", option)
	}
	for _, part := range strings.Split(s, ",") {
		name, value, hasValue := strings.Cut(part, "=")
		switch {
		case name == "":
			return v, fmt.Errorf("%s: empty sub-option in %q", option, s)
		case !slices.Contains(allowed, name):
			return v, fmt.Errorf("%s: unknown sub-option %q (known: %s)", option, part, strings.Join(allowed, ", "))
		}
		if _, dup := v.values[name]; dup {
			return v, fmt.Errorf("%s: sub-option %q given twice", option, name)
		}
		if !hasValue {
			value = "true"
		}
		v.values[name] = value
	}
	return v, nil
}

// Has reports whether name was given.
func (v Values) Has(name string) bool {
	_, ok := v.values[name]
	return ok
}

// String returns the value of name, or "" if it was not given.
func (v Values) String(name string) string { return v.values[name] }

// Bool returns whether name is true: given bare, or as true or 1 (any
// case), as swtpm reads booleans. def applies when name is absent.
func (v Values) Bool(name string, def bool) bool {
	s, ok := v.values[name]
	if !ok {
		return def
	}
	return strings.EqualFold(s, "true") || s == "1"
}

// Int returns the decimal integer value of name, or def if absent.
func (v Values) Int(name string, def int) (int, error) {
	s, ok := v.values[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%s: %s=%q is not a non-negative number", v.option, name, s)
	}
	return n, nil
}

// Mode returns the octal file mode of name (at most 0777), or def if absent.
func (v Values) Mode(name string, def os.FileMode) (os.FileMode, error) {
	s, ok := v.values[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.ParseUint(s, 8, 32)
	if err != nil || n > 0o777 {
		return 0, fmt.Errorf("%s: %s=%q is not an octal mode of at most 0777", v.option, name, s)
	}
	return os.FileMode(n), nil
}

// UID returns the user id that name gives as a number or a user name, or
// -1 if absent.
func (v Values) UID(name string) (int, error) {
	return v.id(name, func(s string) (string, error) {
		u, err := user.Lookup(s)
		if err != nil {
			return "", err
		}
		return u.Uid, nil
	})
}

// GID returns the group id that name gives as a number or a group name, or
// -1 if absent.
func (v Values) GID(name string) (int, error) {
	return v.id(name, func(s string) (string, error) {
		g, err := user.LookupGroup(s)
		if err != nil {
			return "", err
		}
		return g.Gid, nil
	})
}

func (v Values) id(name string, lookup func(string) (string, error)) (int, error) {
	s, ok := v.values[name]
	if !ok {
		return -1, nil
	}
	if n, err := strconv.Atoi(s); err == nil && n >= 0 {
		return n, nil
	}
	idStr, err := lookup(s)
	if err != nil {
		return 0, fmt.Errorf("%s: %s=%q: %w", v.option, name, s, err)
	}
	return strconv.Atoi(idStr)
}

// OneOf returns the value of name, which must be one of choices, or def if
// absent.
func (v Values) OneOf(name, def string, choices ...string) (string, error) {
	s, ok := v.values[name]
	if !ok {
		return def, nil
	}
	if !slices.Contains(choices, s) {
		return "", fmt.Errorf("%s: %s=%q is not one of %s", v.option, name, s, strings.Join(choices, ", "))
	}
	return s, nil
}
