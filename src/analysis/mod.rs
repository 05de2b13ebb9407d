//! Analyses: where a model keeps a fact (causal tracing), and how a trained editor's updates
//! differ between tasks (the principal components of its updates, as a scatter figure).

pub mod lines;
pub mod scatter;
pub mod svg;
pub mod trace;
pub mod update_pca;

/// Escapes text for SVG and HTML.
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
