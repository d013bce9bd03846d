package report

import "strconv"

// serveDaemon is the daemon that serves its VMs from the workers of one
// supervisor (its Memory has a supervisor share), "" if none was measured.
func (r *Report) serveDaemon() string {
	for _, m := range r.Memory {
		if m.SupervisorPSSKiB > 0 {
			return m.Daemon
		}
	}
	return ""
}

// serveTables put vtpmd serve's memory per idle VM and its start-up beside
// one swtpm process per VM.
func (r *Report) serveTables() []table {
	sd := r.serveDaemon()
	if sd == "" {
		return nil
	}
	mem := table{title: sd + ": memory per idle VM (worker processes, and the supervisor's share), against one " + Baseline + " process per VM",
		header: []string{"VMs", "worker RSS", "worker PSS", "supervisor PSS / VMs", "PSS per VM", Baseline + " PSS", "PSS ratio"}}
	mem.notes = append(mem.notes, "worker RSS is the median worker's; worker PSS is the workers' PSS (the idle spare worker's included) summed and divided by the VMs; PSS per VM adds the supervisor's PSS divided by the VMs.")
	for _, n := range r.Settings.VMs {
		m, ok := r.MemoryOf(sd, n)
		if !ok {
			continue
		}
		total := m.PSSPerVMKiB()
		row := []string{strconv.Itoa(n), fmtMiB(m.RSSKiB), fmtMiB(m.PSSKiB), fmtMiB(m.SupervisorPSSKiB), fmtMiB(total), "–", "–"}
		if b, ok := r.MemoryOf(Baseline, n); ok {
			row[5], row[6] = fmtMiB(b.PSSKiB), fmtRatio(ratio(float64(total), float64(b.PSSKiB)))
		}
		mem.rows = append(mem.rows, row)
	}
	start := table{title: sd + ": the admin API's start request to the first answered command, against " + Baseline + "'s process start to its first answer (median)",
		header: []string{"state", sd, Baseline, "ratio"}}
	for _, st := range []string{"new", "existing"} {
		s, ok := r.StartupOf(sd, st)
		if !ok {
			continue
		}
		row := []string{st, fmtDur(s.Median), "–", "–"}
		if b, ok := r.StartupOf(Baseline, st); ok {
			row[2], row[3] = fmtDur(b.Median), fmtRatio(durRatio(s.Median, b.Median))
		}
		start.rows = append(start.rows, row)
	}
	return []table{mem, start}
}
