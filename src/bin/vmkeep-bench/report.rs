//! Figures out of measurements: percentiles, and the chart of time to `Starting` against the
//! number of VMs (hand-written SVG).

use std::{fmt::Write as _, time::Duration};

/// Summary of durations, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentiles of `samples`, in seconds (zeros when empty).
pub fn percentiles(samples: impl IntoIterator<Item = Duration>) -> Percentiles {
    percentiles_of(samples.into_iter().map(|d| d.as_secs_f64()))
}

/// Nearest-rank percentiles of `samples`, in their unit (zeros when empty).
pub fn percentiles_of(samples: impl IntoIterator<Item = f64>) -> Percentiles {
    let mut s: Vec<f64> = samples.into_iter().collect();
    if s.is_empty() {
        return Percentiles::default();
    }
    s.sort_by(f64::total_cmp);
    let rank = |p: f64| s[((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    Percentiles {
        p50: rank(50.0),
        p95: rank(95.0),
        p99: rank(99.0),
        max: s[s.len() - 1],
        mean: s.iter().sum::<f64>() / s.len() as f64,
    }
}

/// One point of the chart: N, and time to `Starting` at p50 / p95 / p99 in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub vms: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// One line of the chart: its label, colour, dash pattern and which figure of a point it draws.
type Series = (&'static str, &'static str, &'static str, fn(&Point) -> f64);

/// A round upper bound for an axis and its tick step.
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

fn fmt_secs(s: f64) -> String {
    if s >= 10.0 {
        format!("{s:.0}s")
    } else if s >= 1.0 {
        format!("{s:.1}s")
    } else {
        format!("{:.0}ms", s * 1000.0)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A line chart of p50 / p95 / p99 time to `Starting` against N (log scale).
pub fn svg(points: &[Point], title: &str, subtitle: &str) -> String {
    let mut points = points.to_vec();
    points.sort_by_key(|p| p.vms);
    let (width, height) = (760.0, 440.0);
    let (left, right, top, bottom) = (70.0, 130.0, 62.0, 58.0);
    let (plot_w, plot_h) = (width - left - right, height - top - bottom);
    let logs: Vec<f64> = points.iter().map(|p| (p.vms.max(1) as f64).log10()).collect();
    let (mut lo, mut hi) = (
        logs.iter().copied().fold(f64::INFINITY, f64::min).floor(),
        logs.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil(),
    );
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (1.0, 3.0);
    }
    if hi - lo < 1.0 {
        hi = lo + 1.0;
    }
    let x = |n: usize| left + ((n.max(1) as f64).log10() - lo) / (hi - lo) * plot_w;
    let y_max_data = points.iter().map(|p| p.p99.max(p.p95)).fold(0.0, f64::max);
    let (y_max, y_step) = nice_axis(y_max_data * 1.05);
    let y = |s: f64| top + plot_h - s / y_max * plot_h;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{width}" height="{height}" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{left}" y="24" font-size="16" font-weight="bold">{}</text>"#, escape(title));
    let _ = writeln!(out, r##"<text x="{left}" y="44" fill="#555">{}</text>"##, escape(subtitle));
    // Grid and y axis.
    let mut tick = 0.0;
    while tick <= y_max + y_step / 2.0 {
        let ty = y(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#333">{}</text>"##,
            left + plot_w,
            left - 8.0,
            ty + 4.0,
            fmt_secs(tick)
        );
        tick += y_step;
    }
    // X axis: powers of ten, and every measured N.
    let mut decade = lo as i32;
    while decade <= hi as i32 {
        let n = 10usize.pow(decade.max(0) as u32);
        let tx = x(n);
        let _ = writeln!(
            out,
            r##"<line x1="{tx:.1}" y1="{top}" x2="{tx:.1}" y2="{:.1}" stroke="#f0f0f0"/>"##,
            top + plot_h
        );
        decade += 1;
    }
    for p in &points {
        let tx = x(p.vms);
        let _ = writeln!(
            out,
            r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#333"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
            top + plot_h,
            top + plot_h + 5.0,
            top + plot_h + 20.0,
            p.vms
        );
    }
    let _ =
        writeln!(out, r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##);
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">VirtualMachines created at once (log scale)</text>"##,
        left + plot_w / 2.0,
        height - 14.0
    );
    let _ = writeln!(
        out,
        r##"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle" fill="#333">time from create to phase Starting</text>"##,
        top + plot_h / 2.0
    );
    // Series.
    let series: [Series; 3] =
        [("p99", "#999999", "5 4", |p| p.p99), ("p95", "#d95f02", "", |p| p.p95), ("p50", "#1b6ac9", "", |p| p.p50)];
    for (i, (name, color, dash, value)) in series.iter().enumerate() {
        let path: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", x(p.vms), y(value(p)))).collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            path.join(" ")
        );
        for p in &points {
            let (px, py) = (x(p.vms), y(value(p)));
            let _ = writeln!(out, r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{color}"/>"#);
            if *name != "p99" {
                let _ = writeln!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}" fill="{color}" font-size="11">{}</text>"#,
                    px + 6.0,
                    py - 6.0,
                    fmt_secs(value(p))
                );
            }
        }
        let ly = top + 14.0 + i as f64 * 20.0;
        let lx = left + plot_w + 16.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let p = percentiles((1..=100).map(Duration::from_secs));
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        let one = percentiles([Duration::from_millis(250)]);
        assert_eq!((one.p50, one.p99), (0.25, 0.25));
        assert_eq!(percentiles([]), Percentiles::default());
    }

    #[test]
    fn axis_is_round() {
        assert_eq!(nice_axis(7.3), (8.0, 2.0));
        assert_eq!(nice_axis(0.42), (0.5, 0.1));
    }

    #[test]
    fn chart_has_every_point() {
        let pts = [Point { vms: 20, p50: 0.1, p95: 0.2, p99: 0.3 }, Point { vms: 1000, p50: 1.0, p95: 3.0, p99: 4.0 }];
        let svg = svg(&pts, "t", "s");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 6);
    }
}
