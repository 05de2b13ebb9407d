//! A scatter figure of 2-D points in groups, one panel per method side by side, drawn as plain
//! SVG (InstructEdit's Fig. 4: each task's edits in the plane of the first two principal
//! components of the editor's updates).

use std::fmt::Write;

use super::esc;

/// Okabe–Ito colours, distinguishable with the common colour-vision deficiencies.
pub(crate) const COLOURS: [&str; 6] = [
    "#E69F00", "#0072B2", "#009E73", "#CC79A7", "#D55E00", "#56B4E9",
];
const PANEL: f64 = 320.0;
const MARGIN: f64 = 48.0;
const GAP: f64 = 56.0;
const TOP: f64 = 64.0;

/// One panel: its title, axis labels and points `(x, y, group)`.
pub struct ScatterPanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub points: Vec<(f64, f64, usize)>,
}

/// The figure: panels left to right, each scaled to its own points, with a legend of `groups`.
pub fn scatter_svg(title: &str, groups: &[String], panels: &[ScatterPanel]) -> String {
    let width = MARGIN + panels.len() as f64 * (PANEL + GAP);
    let height = TOP + PANEL + MARGIN + 8.0;
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
    for (g, name) in groups.iter().enumerate() {
        let colour = COLOURS[g % COLOURS.len()];
        let _ = writeln!(
            out,
            r#"<circle cx="{:.1}" cy="38" r="5" fill="{colour}"/><text x="{:.1}" y="42">{}</text>"#,
            x + 5.0,
            x + 14.0,
            esc(name)
        );
        x += 24.0 + 7.0 * name.chars().count() as f64;
    }
    for (p, panel) in panels.iter().enumerate() {
        let x0 = MARGIN + p as f64 * (PANEL + GAP);
        let y0 = TOP;
        let bounds = |pick: fn(&(f64, f64, usize)) -> f64| {
            let (lo, hi) = panel
                .points
                .iter()
                .map(pick)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                });
            if lo.is_finite() && hi > lo {
                let pad = 0.05 * (hi - lo);
                (lo - pad, hi + pad)
            } else {
                (-1.0, 1.0)
            }
        };
        let (xlo, xhi) = bounds(|q| q.0);
        let (ylo, yhi) = bounds(|q| q.1);
        let sx = |v: f64| x0 + (v - xlo) / (xhi - xlo) * PANEL;
        let sy = |v: f64| y0 + PANEL - (v - ylo) / (yhi - ylo) * PANEL;
        let _ = writeln!(
            out,
            r##"<rect x="{x0:.1}" y="{y0:.1}" width="{PANEL}" height="{PANEL}" fill="none" stroke="#444"/>"##
        );
        if xlo < 0.0 && xhi > 0.0 {
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" y1="{y0:.1}" x2="{0:.1}" y2="{1:.1}" stroke="#ccc"/>"##,
                sx(0.0),
                y0 + PANEL
            );
        }
        if ylo < 0.0 && yhi > 0.0 {
            let _ = writeln!(
                out,
                r##"<line x1="{x0:.1}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ccc"/>"##,
                sy(0.0),
                x0 + PANEL
            );
        }
        for &(px, py, g) in &panel.points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.2}" cy="{:.2}" r="3.5" fill="{}" fill-opacity="0.75"/>"#,
                sx(px),
                sy(py),
                COLOURS[g % COLOURS.len()]
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
            x0 + PANEL / 2.0,
            y0 - 8.0,
            esc(&panel.title)
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x0 + PANEL / 2.0,
            y0 + PANEL + 22.0,
            esc(&panel.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            x0 - 12.0,
            y0 + PANEL / 2.0,
            esc(&panel.y_label)
        );
    }
    out.push_str("</svg>\n");
    out
}
