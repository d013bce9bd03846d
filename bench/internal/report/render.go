package report

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Text writes the report as aligned tables for a terminal.
func (r *Report) Text(w io.Writer) error {
	var b strings.Builder
	for _, l := range r.machineLines() {
		fmt.Fprintln(&b, l)
	}
	fmt.Fprintln(&b, r.settingsLine())
	for _, t := range r.tables() {
		fmt.Fprintf(&b, "\n== %s\n", t.title)
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, strings.Join(t.header, "\t"))
		for _, row := range t.rows {
			fmt.Fprintln(tw, strings.Join(row, "\t"))
		}
		tw.Flush()
		for _, n := range t.notes {
			fmt.Fprintf(&b, "  %s\n", n)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "\nNote: %s\n", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Markdown writes the report as a markdown document; chart, if not empty,
// is the SVG's file name, linked under the headline.
func (r *Report) Markdown(w io.Writer, chart string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# vtpmd benchmark, %s\n\n", r.Started.Format("2006-01-02 15:04 MST"))
	for _, l := range r.machineLines() {
		fmt.Fprintf(&b, "- %s\n", l)
	}
	fmt.Fprintf(&b, "- %s\n", r.settingsLine())
	if chart != "" {
		fmt.Fprintf(&b, "\n![Throughput against the number of VMs](%s)\n", chart)
	}
	for _, t := range r.tables() {
		fmt.Fprintf(&b, "\n### %s\n\n", t.title)
		b.WriteString(markdownTable(t))
		if len(t.notes) > 0 {
			b.WriteString("\n")
		}
		for _, n := range t.notes {
			fmt.Fprintf(&b, "%s\n", n)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "\nNote: %s\n", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// MarkdownTables writes only the tables, for pasting into a document.
func (r *Report) MarkdownTables(w io.Writer) error {
	var b strings.Builder
	for _, t := range r.tables() {
		fmt.Fprintf(&b, "\n#### %s\n\n", t.title)
		b.WriteString(markdownTable(t))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func markdownTable(t table) string {
	var b strings.Builder
	esc := func(s string) string { return strings.ReplaceAll(s, "|", "\\|") }
	row := func(cells []string) {
		b.WriteString("|")
		for _, c := range cells {
			b.WriteString(" " + esc(c) + " |")
		}
		b.WriteString("\n")
	}
	row(t.header)
	b.WriteString("|")
	for i := range t.header {
		if i == 0 {
			b.WriteString("---|")
		} else {
			b.WriteString("---:|")
		}
	}
	b.WriteString("\n")
	for _, r := range t.rows {
		row(r)
	}
	return b.String()
}

// JSON writes every result.
func (r *Report) JSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}
