//! A line figure: one panel per measure side by side, one line per series (lifelong editing's
//! reliability, generalization and locality against the number of edits), drawn as plain SVG.

use std::fmt::Write;

use super::esc;
use super::scatter::COLOURS;

const PANEL_W: f64 = 300.0;
const PANEL_H: f64 = 220.0;
const MARGIN: f64 = 56.0;
const GAP: f64 = 64.0;
const TOP: f64 = 70.0;

/// One panel: its title and axis labels, the y range, and each series' points `(x, y)`.
pub struct LinePanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub y_range: (f64, f64),
    /// `lines[s]` belongs to series `s`; a series may have no points in a panel.
    pub lines: Vec<Vec<(f64, f64)>>,
}

/// The figure, with the x axis logarithmic (edit counts span decades) and a legend of `series`.
pub fn lines_svg(title: &str, series: &[String], panels: &[LinePanel]) -> String {
    let width = MARGIN + panels.len() as f64 * (PANEL_W + GAP);
    let height = TOP + PANEL_H + MARGIN + 8.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{MARGIN}" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let mut x = MARGIN;
    for (s, name) in series.iter().enumerate() {
        let colour = COLOURS[s % COLOURS.len()];
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="40" x2="{:.1}" y2="40" stroke="{colour}" stroke-width="2.5"/><text x="{:.1}" y="44">{}</text>"#,
            x + 18.0,
            x + 24.0,
            esc(name)
        );
        x += 36.0 + 7.0 * name.chars().count() as f64;
    }
    let xs: Vec<f64> = panels
        .iter()
        .flat_map(|p| p.lines.iter().flatten().map(|&(x, _)| x))
        .filter(|x| *x > 0.0)
        .collect();
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = xs.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    let (log_lo, log_hi) = (lo.log10().floor(), hi.log10().ceil());
    for (p, panel) in panels.iter().enumerate() {
        let x0 = MARGIN + p as f64 * (PANEL_W + GAP);
        let y0 = TOP;
        let (y_lo, y_hi) = panel.y_range;
        let px = |x: f64| x0 + (x.max(lo).log10() - log_lo) / (log_hi - log_lo) * PANEL_W;
        let py = |y: f64| y0 + PANEL_H - (y.clamp(y_lo, y_hi) - y_lo) / (y_hi - y_lo) * PANEL_H;
        let _ = writeln!(
            out,
            r##"<rect x="{x0:.1}" y="{y0:.1}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#444"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"##,
            x0 + PANEL_W / 2.0,
            y0 - 8.0,
            esc(&panel.title)
        );
        let mut decade = log_lo;
        while decade <= log_hi {
            let tx = px(10f64.powf(decade));
            let _ = writeln!(
                out,
                r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                y0,
                y0 + PANEL_H,
                y0 + PANEL_H + 16.0,
                10f64.powf(decade)
            );
            decade += 1.0;
        }
        for k in 0..=4 {
            let y = y_lo + (y_hi - y_lo) * f64::from(k) / 4.0;
            let ty = py(y);
            let _ = writeln!(
                out,
                r##"<line x1="{x0:.1}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{y:.0}</text>"##,
                x0 + PANEL_W,
                x0 - 6.0,
                ty + 4.0
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            x0 + PANEL_W / 2.0,
            y0 + PANEL_H + 34.0,
            esc(&panel.x_label),
            x0 - 36.0,
            y0 + PANEL_H / 2.0,
            esc(&panel.y_label)
        );
        for (s, line) in panel.lines.iter().enumerate() {
            let colour = COLOURS[s % COLOURS.len()];
            let points: Vec<String> = line
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            if points.len() > 1 {
                let _ = writeln!(
                    out,
                    r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                    points.join(" ")
                );
            }
            for &(x, y) in line {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                    px(x),
                    py(y)
                );
            }
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points land where the axes say: x = 10 on the first decade line, y = 50 halfway up.
    #[test]
    fn points_are_placed_on_a_log_x_axis_and_a_linear_y_axis() {
        let panel = LinePanel {
            title: "reliability".into(),
            x_label: "edits".into(),
            y_label: "%".into(),
            y_range: (0.0, 100.0),
            lines: vec![vec![(1.0, 0.0), (10.0, 50.0), (100.0, 100.0)]],
        };
        let svg = lines_svg("t", &["GRACE".into()], &[panel]);
        // log10 1..100 over 300 px from x0 = 56: 10 sits at 206; y = 50 at 70 + 110 = 180.
        assert!(svg.contains(r#"<circle cx="206.0" cy="180.0""#), "{svg}");
        assert!(svg.contains(r#"<circle cx="56.0" cy="290.0""#));
        assert!(svg.contains(r#"<circle cx="356.0" cy="70.0""#));
        assert!(svg.contains("GRACE"));
    }
}
