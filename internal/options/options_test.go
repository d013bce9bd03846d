package options

import (
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseLibvirtCtrl(t *testing.T) {
	v, err := Parse("--ctrl", "type=unixio,path=/run/libvirt/qemu/swtpm/1-vm-swtpm.sock,mode=0600,terminate", "type", "path", "mode", "terminate")
	require.NoError(t, err)
	assert.Equal(t, "unixio", v.String("type"))
	assert.Equal(t, "/run/libvirt/qemu/swtpm/1-vm-swtpm.sock", v.String("path"))
	mode, err := v.Mode("mode", 0o770)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), mode)
	assert.True(t, v.Bool("terminate", false))
	assert.False(t, v.Bool("missing", false))
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"type=unixio,foo=1", `--ctrl: unknown sub-option "foo=1"`},
		{"", "--ctrl: empty value"},
		{"type=unixio,,path=x", "--ctrl: empty sub-option"},
		{"type=unixio,type=tcp", `--ctrl: sub-option "type" given twice`},
		{"typ=unixio", `--ctrl: unknown sub-option "typ=unixio"`},
	} {
		_, err := Parse("--ctrl", tc.in, "type", "path")
		require.Error(t, err, tc.in)
		assert.Contains(t, err.Error(), tc.want)
	}
	v, err := Parse("--ctrl", "mode=0999,port=x", "mode", "port")
	require.NoError(t, err)
	_, err = v.Mode("mode", 0)
	assert.EqualError(t, err, `--ctrl: mode="0999" is not an octal mode of at most 0777`)
	_, err = v.Int("port", 0)
	assert.EqualError(t, err, `--ctrl: port="x" is not a non-negative number`)
}

func TestBooleans(t *testing.T) {
	v, err := Parse("--tpmstate", "lock=TRUE,backup=0,fsync=1", "lock", "backup", "fsync")
	require.NoError(t, err)
	assert.True(t, v.Bool("lock", false))
	assert.False(t, v.Bool("backup", true))
	assert.True(t, v.Bool("fsync", false))
}

func TestIDs(t *testing.T) {
	v, err := Parse("--ctrl", "uid=0,gid=root", "uid", "gid")
	require.NoError(t, err)
	uid, err := v.UID("uid")
	require.NoError(t, err)
	assert.Equal(t, 0, uid)
	gid, err := v.GID("gid")
	require.NoError(t, err)
	assert.Equal(t, 0, gid)
	none, err := v.UID("absent")
	require.NoError(t, err)
	assert.Equal(t, -1, none)
}
