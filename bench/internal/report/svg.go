package report

import (
	"fmt"
	"html"
	"io"
	"math"
	"strconv"
	"strings"
)

// Colours of the daemons' lines, the one under test first.
var palette = []string{"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"}

// Chart geometry.
const (
	panelW, panelH = 320, 220
	columns        = 3
	plotLeft       = 58
	plotRight      = 14
	plotTop        = 40
	plotBottom     = 36
	chartTop       = 64
)

// SVG writes a chart of throughput against the number of VMs: one panel per
// operation, one line per daemon. The x axis is evenly spaced over the VM
// counts measured (a log scale for the usual 1, 4, 16, ... series).
func (r *Report) SVG(w io.Writer) error {
	rows := (len(r.Ops) + columns - 1) / columns
	width := columns * panelW
	height := chartTop + rows*panelH + 10
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold" text-anchor="middle">%s</text>`+"\n",
		width/2, html.EscapeString("Throughput (operations/s, all VMs together) against the number of VMs"))
	// Legend.
	x := 20
	for i, d := range r.Daemons {
		c := palette[i%len(palette)]
		fmt.Fprintf(&b, `<line x1="%d" y1="44" x2="%d" y2="44" stroke="%s" stroke-width="2.5"/><circle cx="%d" cy="44" r="3" fill="%s"/>`, x, x+24, c, x+12, c)
		fmt.Fprintf(&b, `<text x="%d" y="48">%s</text>`+"\n", x+30, html.EscapeString(d))
		x += 40 + 8*len(d)
	}
	fmt.Fprintf(&b, `<text x="%d" y="48" fill="#555">%s</text>`+"\n", x+10,
		html.EscapeString(fmt.Sprintf("%d CPUs, %s; %v per point", r.Machine.NProc, r.Machine.CPU, r.Settings.Duration)))
	for i, op := range r.Ops {
		r.panel(&b, op, (i%columns)*panelW, chartTop+(i/columns)*panelH)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func (r *Report) panel(b *strings.Builder, op Op, ox, oy int) {
	vms := r.Settings.VMs
	pw := float64(panelW - plotLeft - plotRight)
	ph := float64(panelH - plotTop - plotBottom)
	px0 := float64(ox + plotLeft)
	py0 := float64(oy + plotTop)
	maxV := 0.0
	for _, d := range r.Daemons {
		for _, n := range vms {
			if c, ok := r.Cell(d, op.Name, n); ok {
				maxV = math.Max(maxV, c.OpsPerSec)
			}
		}
	}
	top, step := niceScale(maxV)
	xAt := func(i int) float64 {
		if len(vms) == 1 {
			return px0 + pw/2
		}
		return px0 + pw*float64(i)/float64(len(vms)-1)
	}
	yAt := func(v float64) float64 { return py0 + ph - ph*v/top }

	fmt.Fprintf(b, `<g>`+"\n")
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="12" font-weight="bold">%s</text>`+"\n", ox+plotLeft, oy+plotTop-22, html.EscapeString(op.Name))
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="10" fill="#555">%s</text>`+"\n", ox+plotLeft, oy+plotTop-8, html.EscapeString(op.Title))
	// Grid and y labels.
	for v := 0.0; v <= top*1.0001; v += step {
		y := yAt(v)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`, px0, y, px0+pw, y)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="end" fill="#444">%s</text>`+"\n", px0-4, y+4, axisLabel(v))
	}
	// X labels.
	for i, n := range vms {
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="#444">%d</text>`, xAt(i), py0+ph+14, n)
	}
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="#444">VMs</text>`+"\n", px0+pw/2, py0+ph+28)
	fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#888"/>`+"\n", px0, py0, pw, ph)
	// Lines.
	for di, d := range r.Daemons {
		c := palette[di%len(palette)]
		var pts []string
		for i, n := range vms {
			if cell, ok := r.Cell(d, op.Name, n); ok && cell.Ops > 0 {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", xAt(i), yAt(cell.OpsPerSec)))
			}
		}
		if len(pts) == 0 {
			continue
		}
		fmt.Fprintf(b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", strings.Join(pts, " "), c)
		for i, n := range vms {
			if cell, ok := r.Cell(d, op.Name, n); ok && cell.Ops > 0 {
				fmt.Fprintf(b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"><title>%s, %d VMs: %s ops/s</title></circle>`,
					xAt(i), yAt(cell.OpsPerSec), c, html.EscapeString(d), n, fmtRate(cell.OpsPerSec))
			}
		}
		b.WriteString("\n")
	}
	b.WriteString("</g>\n")
}

// niceScale returns an axis top at or above max and a round tick step.
func niceScale(max float64) (top, step float64) {
	if max <= 0 {
		return 1, 0.25
	}
	raw := max / 4
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if step = m * mag; step >= raw {
			break
		}
	}
	return math.Ceil(max/step) * step, step
}

func axisLabel(v float64) string {
	switch {
	case v >= 1e6:
		return strconv.FormatFloat(v/1e6, 'g', 4, 64) + "M"
	case v >= 1e3:
		return strconv.FormatFloat(v/1e3, 'g', 4, 64) + "k"
	}
	return strconv.FormatFloat(v, 'g', 4, 64)
}
