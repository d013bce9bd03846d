package fleet

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of the times in /proc/<pid>/stat: USER_HZ, 100 on
// every Linux architecture the benchmark runs on.
const userHZ = 100

// CPUTime returns the user plus system CPU time of process pid, all its
// threads, from /proc/<pid>/stat.
func CPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: fields are counted
	// after its closing parenthesis. utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// allPids returns the processes serving the instances, each once.
func allPids(ins []*Instance) []int {
	seen := map[int]bool{}
	var out []int
	for _, in := range ins {
		for _, pid := range in.pids() {
			if !seen[pid] {
				seen[pid] = true
				out = append(out, pid)
			}
		}
	}
	return out
}

// TotalCPU sums CPUTime over the instances' processes.
func TotalCPU(ins []*Instance) (time.Duration, error) {
	var sum time.Duration
	for _, pid := range allPids(ins) {
		t, err := CPUTime(pid)
		if err != nil {
			return 0, err
		}
		sum += t
	}
	return sum, nil
}

// children returns the child processes of pid, from
// /proc/<pid>/task/*/children.
func children(pid int) []int {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// Memory is a process's resident and proportional set sizes in KiB.
type Memory struct {
	RSS, PSS int64
}

// MemoryOf reads /proc/<pid>/smaps_rollup.
func MemoryOf(pid int) (Memory, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return Memory{}, err
	}
	defer f.Close()
	var m Memory
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 2 {
			continue
		}
		var dst *int64
		switch fields[0] {
		case "Rss:":
			dst = &m.RSS
		case "Pss:":
			dst = &m.PSS
		default:
			continue
		}
		if *dst, err = strconv.ParseInt(fields[1], 10, 64); err != nil {
			return Memory{}, fmt.Errorf("smaps_rollup of %d: %w", pid, err)
		}
	}
	if err := s.Err(); err != nil {
		return Memory{}, err
	}
	if m.RSS == 0 {
		return Memory{}, fmt.Errorf("smaps_rollup of %d: no Rss line", pid)
	}
	return m, nil
}

// ContextSwitches returns the voluntary plus involuntary context switches
// of every thread of process pid, from /proc/<pid>/task/*/status. Threads
// that ended are not counted.
func ContextSwitches(pid int) (int64, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		if err != nil {
			continue // the thread ended
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok || (k != "voluntary_ctxt_switches" && k != "nonvoluntary_ctxt_switches") {
				continue
			}
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/%d/task/%s/status: %w", pid, t.Name(), err)
			}
			sum += n
		}
	}
	return sum, nil
}

// TotalContextSwitches sums ContextSwitches over the instances' processes.
func TotalContextSwitches(ins []*Instance) (int64, error) {
	var sum int64
	for _, pid := range allPids(ins) {
		n, err := ContextSwitches(pid)
		if err != nil {
			return 0, err
		}
		sum += n
	}
	return sum, nil
}
