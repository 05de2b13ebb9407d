//! One run as a self-contained HTML page: its record, KnowEdit's summary, two SVG figures (the
//! summary pre and post; how post-edit reliability and generalization spread over cases) and a
//! table of every case. No scripts, styles or fonts are fetched: the page opens offline.

use std::fmt::Write;
use std::path::PathBuf;

use crate::analysis::esc;
use crate::eval::case::CaseResult;
use crate::report::jsonl::RunRecord;
use crate::report::summary::{summarize, PhaseSummary, Summary};

const PRE: &str = "#9ca3af";
const POST: &str = "#0072B2";
const GEN: &str = "#E69F00";

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.1}"))
}

const METRICS: [&str; 4] = ["reliability", "generalization", "locality", "portability"];

fn metric(p: &PhaseSummary, name: &str) -> Option<f64> {
    match name {
        "reliability" => p.rewrite_acc,
        "generalization" => p.rephrase_acc,
        "locality" => p.locality,
        _ => p.portability,
    }
}

/// Grouped bars, pre and post, of the metrics the run has (0–100).
fn summary_svg(summary: &Summary) -> String {
    let shown: Vec<&str> = METRICS
        .into_iter()
        .filter(|m| metric(&summary.pre, m).is_some() || metric(&summary.post, m).is_some())
        .collect();
    let (w, h, left, top, plot_h) = (120.0 * shown.len() as f64 + 80.0, 270.0, 50.0, 44.0, 180.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    for tick in [0, 25, 50, 75, 100] {
        let y = top + plot_h * (1.0 - f64::from(tick) / 100.0);
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#e5e7eb"/><text x="{}" y="{}" text-anchor="end">{tick}</text>"##,
            w - 10.0,
            left - 6.0,
            y + 4.0
        );
    }
    for (k, name) in shown.iter().enumerate() {
        let x0 = left + 20.0 + 120.0 * k as f64;
        for (j, (phase, colour)) in [(&summary.pre, PRE), (&summary.post, POST)]
            .into_iter()
            .enumerate()
        {
            if let Some(v) = metric(phase, name) {
                let bh = plot_h * v.clamp(0.0, 100.0) / 100.0;
                let x = x0 + 40.0 * j as f64;
                let _ = write!(
                    s,
                    r#"<rect x="{x}" y="{}" width="36" height="{bh}" fill="{colour}"/><text x="{}" y="{}" text-anchor="middle">{v:.1}</text>"#,
                    top + plot_h - bh,
                    x + 18.0,
                    top + plot_h - bh - 4.0
                );
            }
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{name}</text>"#,
            x0 + 38.0,
            top + plot_h + 18.0
        );
    }
    let _ = write!(
        s,
        r#"<rect x="{left}" y="8" width="10" height="10" fill="{PRE}"/><text x="{}" y="17">pre</text><rect x="{}" y="8" width="10" height="10" fill="{POST}"/><text x="{}" y="17">post</text></svg>"#,
        left + 14.0,
        left + 54.0,
        left + 68.0
    );
    s
}

/// Histograms (ten bins of 10 points) of each case's post-edit reliability and generalization.
fn spread_svg(per_case: &[PhaseSummary]) -> String {
    let bins = |f: fn(&PhaseSummary) -> Option<f64>| {
        let mut counts = [0usize; 10];
        for v in per_case.iter().filter_map(f) {
            counts[((v / 10.0).floor() as usize).min(9)] += 1;
        }
        counts
    };
    let series = [
        ("reliability", POST, bins(|p| p.rewrite_acc)),
        ("generalization", GEN, bins(|p| p.rephrase_acc)),
    ];
    let most = series
        .iter()
        .flat_map(|(_, _, c)| c.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, h, left, top, plot_h, bin_w) = (560.0, 250.0, 50.0, 30.0, 170.0, 48.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    for (k, (_, colour, counts)) in series.iter().enumerate() {
        for (b, &n) in counts.iter().enumerate() {
            let bh = plot_h * n as f64 / most as f64;
            let x = left + bin_w * b as f64 + 2.0 + 22.0 * k as f64;
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{}" width="20" height="{bh}" fill="{colour}"><title>{n} cases</title></rect>"#,
                top + plot_h - bh
            );
        }
    }
    for b in 0..=10 {
        let x = left + bin_w * b as f64;
        let _ = write!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{}</text>"#,
            top + plot_h + 16.0,
            b * 10
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">post-edit score of a case (%)</text><text x="{}" y="{}" text-anchor="end">{most}</text><text x="{}" y="{}" text-anchor="end">0</text>"#,
        left + 5.0 * bin_w,
        top + plot_h + 34.0,
        left - 6.0,
        top + 8.0,
        left - 6.0,
        top + plot_h
    );
    for (k, (name, colour, _)) in series.iter().enumerate() {
        let x = left + 130.0 * k as f64;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="8" width="10" height="10" fill="{colour}"/><text x="{}" y="17">{name} (cases)</text>"#,
            x + 14.0
        );
    }
    s.push_str("</svg>");
    s
}

pub fn page(
    record: Option<&RunRecord>,
    summary: &Summary,
    results: &[CaseResult],
    files: &[PathBuf],
) -> String {
    let title = record.map_or("kedit report".to_string(), |r| {
        format!("kedit report: {}", r.editor)
    });
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #d1d5db;padding:2px 8px;text-align:right}}\
         td.t{{text-align:left}}th{{background:#f3f4f6}}</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    if let Some(record) = record {
        s.push_str("<h2>Run</h2><table>");
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(record) {
            for (k, v) in fields {
                let v = match v {
                    serde_json::Value::String(v) => v,
                    other => other.to_string(),
                };
                let _ = write!(
                    s,
                    r#"<tr><th class="t">{}</th><td class="t">{}</td></tr>"#,
                    esc(&k),
                    esc(&v)
                );
            }
        }
        s.push_str("</table>\n");
    }
    let _ = write!(s, "<p>{} cases from", summary.cases);
    for f in files {
        let _ = write!(s, " <code>{}</code>", esc(&f.display().to_string()));
    }
    s.push_str("</p>\n<h2>Summary</h2><table><tr><th></th><th>pre</th><th>post</th></tr>");
    for name in METRICS {
        let _ = write!(
            s,
            r#"<tr><td class="t">{name}</td><td>{}</td><td>{}</td></tr>"#,
            cell(metric(&summary.pre, name)),
            cell(metric(&summary.post, name))
        );
    }
    if let Some(secs) = summary.edit_seconds {
        let _ = write!(
            s,
            r#"<tr><td class="t">seconds per edit</td><td></td><td>{secs:.3}</td></tr>"#
        );
    }
    s.push_str("</table>\n");
    for warning in summary.warnings() {
        let _ = writeln!(s, "<p><strong>{}</strong></p>", esc(&warning));
    }
    let per_case: Vec<(PhaseSummary, PhaseSummary)> = results
        .iter()
        .map(|r| {
            let one = summarize(std::slice::from_ref(r));
            (one.pre, one.post)
        })
        .collect();
    let posts: Vec<PhaseSummary> = per_case.iter().map(|(_, post)| post.clone()).collect();
    let _ = write!(
        s,
        "{}\n<h2>Spread over cases</h2>\n{}\n<h2>Cases</h2>\n<table><tr><th>case</th>\
         <th>prompt</th><th>target</th><th>reliability pre</th><th>reliability post</th>\
         <th>generalization post</th><th>locality post</th><th>portability post</th>\
         <th>edit s</th></tr>\n",
        summary_svg(summary),
        spread_svg(&posts)
    );
    for (r, (pre, post)) in results.iter().zip(&per_case) {
        let _ = writeln!(
            s,
            r#"<tr><td>{}</td><td class="t">{}</td><td class="t">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td></tr>"#,
            r.case_id,
            esc(&r.requested_rewrite.prompt),
            esc(&r.requested_rewrite.target_new),
            cell(pre.rewrite_acc),
            cell(post.rewrite_acc),
            cell(post.rephrase_acc),
            cell(post.locality),
            cell(post.portability),
            r.time
        );
    }
    s.push_str("</table>\n</body></html>\n");
    s
}
