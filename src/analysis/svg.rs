//! The causal-trace figure: three heatmaps (residual stream, MLP, attention), token rows and
//! layer columns, each with its own colour scale, drawn as plain SVG.

use std::fmt::Write;

use super::esc;
use super::trace::Trace;

const CELL_W: f64 = 14.0;
const CELL_H: f64 = 18.0;
const LABEL_W: f64 = 120.0;
const TOP: f64 = 56.0;
const BAR_W: f64 = 12.0;
const PANEL_GAP: f64 = 70.0;

/// `t ∈ [0, 1]` from white to `rgb`.
fn shade(rgb: (u8, u8, u8), t: f64) -> String {
    let t = t.clamp(0.0, 1.0);
    let mix = |c: u8| (255.0 + (f64::from(c) - 255.0) * t).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(rgb.0), mix(rgb.1), mix(rgb.2))
}

struct Panel<'a> {
    title: &'a str,
    xlabel: String,
    table: &'a [Vec<f64>],
    rgb: (u8, u8, u8),
}

fn panel(out: &mut String, x0: f64, trace: &Trace, p: &Panel<'_>) -> f64 {
    let n_layers = p.table.first().map_or(0, Vec::len);
    let n_tokens = p.table.len();
    let lo = p
        .table
        .iter()
        .flatten()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(trace.corrupted);
    let hi = p
        .table
        .iter()
        .flatten()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(1e-12);
    let grid_x = x0 + LABEL_W;
    let width = n_layers as f64 * CELL_W;
    let height = n_tokens as f64 * CELL_H;
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold" text-anchor="middle">{}</text>"#,
        grid_x + width / 2.0,
        TOP - 24.0,
        esc(p.title)
    );
    for (t, row) in p.table.iter().enumerate() {
        let y = TOP + t as f64 * CELL_H;
        let mut label = trace.tokens[t].clone();
        if (trace.subject_tokens.0..=trace.subject_tokens.1).contains(&t) {
            label.push('*');
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" xml:space="preserve">{}</text>"#,
            grid_x - 6.0,
            y + CELL_H * 0.7,
            esc(&label)
        );
        for (l, &v) in row.iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="{CELL_W}" height="{CELL_H}" fill="{}"><title>{} layer {l}: {v:.4}</title></rect>"#,
                grid_x + l as f64 * CELL_W,
                y,
                shade(p.rgb, (v - lo) / span),
                esc(&trace.tokens[t])
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<rect x="{grid_x:.1}" y="{TOP:.1}" width="{width:.1}" height="{height:.1}" fill="none" stroke="#444" stroke-width="0.8"/>"##
    );
    for l in (0..n_layers).step_by(5) {
        let x = grid_x + (l as f64 + 0.5) * CELL_W;
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{l}</text>"##,
            TOP + height,
            TOP + height + 4.0,
            TOP + height + 15.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
        grid_x + width / 2.0,
        TOP + height + 32.0,
        esc(&p.xlabel)
    );
    // Colour bar, with the answer's probability at both ends.
    let bar_x = grid_x + width + 12.0;
    let steps = 24;
    for i in 0..steps {
        let t = 1.0 - i as f64 / (steps - 1) as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{bar_x:.1}" y="{:.2}" width="{BAR_W}" height="{:.2}" fill="{}"/>"#,
            TOP + height * i as f64 / steps as f64,
            height / steps as f64 + 0.5,
            shade(p.rgb, t)
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{bar_x:.1}" y="{TOP:.1}" width="{BAR_W}" height="{height:.1}" fill="none" stroke="#444" stroke-width="0.6"/>"##
    );
    for (v, y) in [(hi, TOP + 8.0), (lo, TOP + height)] {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{y:.1}" font-size="10">{v:.3}</text>"#,
            bar_x + BAR_W + 3.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle" transform="rotate(90 {:.1} {:.1})">p({})</text>"#,
        bar_x + BAR_W + 38.0,
        TOP + height / 2.0,
        bar_x + BAR_W + 38.0,
        TOP + height / 2.0,
        esc(trace.answer.trim())
    );
    LABEL_W + width + 12.0 + BAR_W + 50.0
}

/// The figure as an SVG document.
pub fn trace_svg(trace: &Trace, model_name: &str) -> String {
    let panels = [
        Panel {
            title: "Impact of restoring state after corrupted input",
            xlabel: format!("single restored layer within {model_name}"),
            table: &trace.residual,
            rgb: (84, 39, 143),
        },
        Panel {
            title: "Impact of restoring MLP after corrupted input",
            xlabel: format!("center of interval of {} restored MLP layers", trace.window),
            table: &trace.mlp,
            rgb: (0, 109, 44),
        },
        Panel {
            title: "Impact of restoring attention after corrupted input",
            xlabel: format!(
                "center of interval of {} restored attention layers",
                trace.window
            ),
            table: &trace.attention,
            rgb: (165, 15, 21),
        },
    ];
    let mut body = String::new();
    let mut x = 10.0;
    for p in &panels {
        x += panel(&mut body, x, trace, p) + PANEL_GAP;
    }
    let height = TOP + trace.tokens.len() as f64 * CELL_H + 70.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{height:.0}" viewBox="0 0 {:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#,
        x, x
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="16" font-size="12">{} → {} (clean p = {:.3}, corrupted p = {:.3}; noise σ = {:.3}, {} samples; * marks the subject)</text>"#,
        esc(&trace.prompt),
        esc(trace.answer.trim()),
        trace.clean,
        trace.corrupted,
        trace.noise,
        trace.samples
    );
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}
