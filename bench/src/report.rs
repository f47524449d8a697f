//! Results: the samples per row and metric, rendered as a markdown table (medians and ratios
//! against `direct`) and as a hand-written SVG bar chart.

use std::collections::HashMap;
use std::fmt::Write;

use crate::figures::Metric;
use crate::stats::{median, spread};
use crate::variants::Kind;

pub enum Status {
    Ok,
    /// The variant cannot run here (missing feature); every cell says `n/a (reason)`.
    NotAvailable(String),
    /// Setup failed; every cell says `failed`, the error goes in the notes.
    Failed(String),
}

pub struct Row {
    pub label: String,
    pub kind: Kind,
    pub status: Status,
    pub samples: HashMap<Metric, Vec<f64>>,
    /// Failed measurements: metric title and error.
    pub errors: Vec<(String, String)>,
}

impl Row {
    pub fn new(label: String, kind: Kind, status: Status) -> Row {
        Row { label, kind, status, samples: HashMap::new(), errors: Vec::new() }
    }

    pub fn median(&self, m: Metric) -> Option<f64> {
        median(self.samples.get(&m)?)
    }
}

pub struct Report<'a> {
    pub command: String,
    pub header: Vec<String>,
    pub metrics: Vec<Metric>,
    pub rows: &'a [Row],
    pub notes: Vec<String>,
}

impl Report<'_> {
    fn direct(&self, m: Metric) -> Option<f64> {
        self.rows.iter().find(|r| r.kind == Kind::Direct).and_then(|r| r.median(m))
    }

    fn cell(&self, row: &Row, m: Metric) -> String {
        match &row.status {
            Status::NotAvailable(why) => return format!("n/a ({why})"),
            Status::Failed(_) => return "failed".into(),
            Status::Ok => {}
        }
        let Some(v) = row.median(m) else {
            return if row.errors.iter().any(|(t, _)| t == m.title()) { "error".into() } else { "–".into() };
        };
        let mut s = m.fmt(v);
        if row.kind != Kind::Direct
            && let Some(d) = self.direct(m).filter(|d| *d > 0.0)
        {
            let _ = write!(s, " ({:.2}×)", v / d);
        }
        if row.samples[&m].len() >= 3 && spread(&row.samples[&m]).is_some_and(|sp| sp > 0.25) {
            s.push_str(" ~");
        }
        s
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# netpath benchmarks\n");
        let _ = writeln!(s, "Produced by: {}\n", self.command);
        for h in &self.header {
            let _ = writeln!(s, "- {h}");
        }
        let _ = writeln!(s);
        s.push_str("| variant |");
        for m in &self.metrics {
            let _ = write!(s, " {} ({}) {} |", m.title(), m.unit(), if m.higher_is_better() { "↑" } else { "↓" });
        }
        s.push_str("\n| --- |");
        for _ in &self.metrics {
            s.push_str(" ---: |");
        }
        s.push('\n');
        for row in self.rows {
            let _ = write!(s, "| {} |", row.label);
            for m in &self.metrics {
                let _ = write!(s, " {} |", self.cell(row, *m));
            }
            s.push('\n');
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Cells are medians over the repetitions; `(r×)` is the ratio to `direct` (↑: higher is better, \
             ↓: lower is better); `~` marks a spread (max−min)/median above 25%."
        );
        let mut notes = self.notes.clone();
        for row in self.rows {
            if let Status::Failed(e) = &row.status {
                notes.push(format!("{}: setup failed: {e}", row.label));
            }
            for (m, e) in &row.errors {
                notes.push(format!("{}: {m}: {e}", row.label));
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(s, "\nNotes:\n");
            for n in notes {
                let _ = writeln!(s, "- {}", n.replace('\n', " "));
            }
        }
        s
    }

    /// One panel per metric, one horizontal bar per row, the value (and ratio) at its end.
    pub fn svg(&self) -> String {
        const W: f64 = 960.0;
        const LABEL_W: f64 = 170.0;
        const BAR_W: f64 = 600.0;
        const ROW_H: f64 = 18.0;
        const HEAD_H: f64 = 30.0;
        const GAP: f64 = 18.0;
        let panel_h = HEAD_H + ROW_H * self.rows.len() as f64;
        let height = 50.0 + (panel_h + GAP) * self.metrics.len() as f64;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(s, r#"<text x="10" y="22" font-size="16" font-weight="bold">netpath benchmarks</text>"#);
        let _ = writeln!(s, r##"<text x="10" y="40" fill="#555">{}</text>"##, esc(&self.command.replace('`', "")));
        let mut y = 50.0;
        for m in &self.metrics {
            let max = self.rows.iter().filter_map(|r| r.median(*m)).fold(0.0f64, f64::max);
            let _ = writeln!(
                s,
                r#"<text x="10" y="{:.0}" font-weight="bold">{} ({}, {} is better)</text>"#,
                y + 20.0,
                esc(m.title()),
                esc(m.unit()),
                if m.higher_is_better() { "higher" } else { "lower" }
            );
            for (i, row) in self.rows.iter().enumerate() {
                let ry = y + HEAD_H + ROW_H * i as f64;
                let _ = writeln!(
                    s,
                    r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{}</text>"#,
                    LABEL_W - 8.0,
                    ry + 13.0,
                    esc(&row.label)
                );
                let text = self.cell(row, *m);
                let w = match row.median(*m) {
                    Some(v) if max > 0.0 && matches!(row.status, Status::Ok) => (v / max * BAR_W).max(1.0),
                    _ => 0.0,
                };
                if w > 0.0 {
                    let _ = writeln!(
                        s,
                        r#"<rect x="{LABEL_W}" y="{:.0}" width="{w:.1}" height="{:.0}" fill="{}"/>"#,
                        ry + 2.0,
                        ROW_H - 4.0,
                        color(row.kind)
                    );
                }
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.0}" fill="#333">{}</text>"##,
                    LABEL_W + w + 6.0,
                    ry + 13.0,
                    esc(&text)
                );
            }
            y += panel_h + GAP;
        }
        s.push_str("</svg>\n");
        s
    }
}

fn color(k: Kind) -> &'static str {
    match k {
        Kind::Direct => "#7f7f7f",
        Kind::NetpathDirect => "#2ca02c",
        Kind::NetpathMacvlan => "#17becf",
        Kind::Iptables => "#d62728",
        Kind::Netavark => "#9467bd",
        Kind::Cni => "#ff7f0e",
        Kind::Netpath => "#1f77b4",
        Kind::NetpathXdp | Kind::NetpathXdpGeneric => "#0b3d91",
        Kind::NetpathCni => "#17becf",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        let mut d = Row::new("direct".into(), Kind::Direct, Status::Ok);
        d.samples.insert(Metric::Tcp1, vec![10.0, 12.0, 11.0]);
        let mut i = Row::new("iptables @1".into(), Kind::Iptables, Status::Ok);
        i.samples.insert(Metric::Tcp1, vec![5.5]);
        i.errors.push((Metric::RttP50.title().into(), "sockperf failed".into()));
        let n = Row::new("netpath @1".into(), Kind::Netpath, Status::NotAvailable("no -p yet".into()));
        vec![d, i, n]
    }

    #[test]
    fn table_has_medians_ratios_and_na() {
        let rows = rows();
        let r = Report {
            command: "`netpath-bench --quick`".into(),
            header: vec![],
            metrics: vec![Metric::Tcp1, Metric::RttP50],
            rows: &rows,
            notes: vec![],
        };
        let md = r.markdown();
        assert!(md.contains("| direct | 11.0 | – |"), "{md}");
        assert!(md.contains("| iptables @1 | 5.50 (0.50×) | error |"), "{md}");
        assert!(md.contains("| netpath @1 | n/a (no -p yet) | n/a (no -p yet) |"), "{md}");
        assert!(md.contains("iptables @1: TCP RTT p50: sockperf failed"), "{md}");
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 1 + 2, "background + two bars");
    }
}
