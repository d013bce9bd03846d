package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"
)

// daemonEnv marks the re-executed child of --daemon; its value is the
// descriptor on which the child reports that it serves.
const daemonEnv = "VTPMD_DAEMON_READY_FD"

// daemonize re-executes vtpmd in a new session and returns once the child
// serves, or fails with the child's error. The descriptors that options name
// (--ctrl fd=, --log fd=, ...) keep their numbers in the child.
func daemonize(inherited []int) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	defer r.Close()
	var extra []*os.File
	for _, fd := range inherited {
		for len(extra) <= fd-3 {
			extra = append(extra, nil)
		}
		extra[fd-3] = os.NewFile(uintptr(fd), "inherited")
	}
	readyFD := 3 + len(extra)
	extra = append(extra, w)
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), daemonEnv+"="+strconv.Itoa(readyFD))
	cmd.ExtraFiles = extra
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	stderr, err := os.CreateTemp("", "vtpmd-daemon-")
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	defer os.Remove(stderr.Name())
	defer stderr.Close()
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	w.Close()
	ok, _ := io.ReadAll(r)
	if string(ok) == "ready" {
		return nil
	}
	_ = cmd.Wait()
	msg, _ := os.ReadFile(stderr.Name())
	return fmt.Errorf("daemonize: the daemon did not start: %s", msg)
}

// reportDaemonReady tells the parent of --daemon that the child serves, and
// detaches the child's standard streams.
func reportDaemonReady() error {
	fdStr := os.Getenv(daemonEnv)
	if fdStr == "" {
		return nil
	}
	fd, err := strconv.Atoi(fdStr)
	if err != nil {
		return fmt.Errorf("bad %s: %w", daemonEnv, err)
	}
	f := os.NewFile(uintptr(fd), "ready")
	_, err = f.Write([]byte("ready"))
	err = errors.Join(err, f.Close())
	if null, nerr := os.OpenFile(os.DevNull, os.O_RDWR, 0); nerr == nil {
		for _, std := range []int{0, 1, 2} {
			_ = syscall.Dup2(int(null.Fd()), std)
		}
		null.Close()
	}
	return err
}
