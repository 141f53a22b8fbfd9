//! `GET /`: the web dashboard, one self-contained HTML page (inline CSS and JavaScript, no
//! external resources, no build step) that drives the `/v1` API from the browser.
//!
//! The page itself is public, like `/healthz`: it holds no data. It asks for the API key, keeps it
//! in the browser's storage and sends it as `Authorization: Bearer …` with every `/v1` call,
//! including the job event stream, which it reads with `fetch` since `EventSource` cannot send
//! headers.

use super::AppState;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The page: markup and styles, then the scripts, joined at compile time so the binary serves
/// one document with nothing else to fetch.
pub const PAGE: &str = concat!(
    include_str!("dashboard.html"),
    "<script>\n",
    include_str!("dashboard.js"),
    include_str!("dashboard_job.js"),
    "</script>\n</body>\n</html>\n",
);

/// Inline scripts and styles only, and calls to this origin only: the page needs nothing else,
/// so nothing else may run or load even if a dataset name were to smuggle markup in.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// `GET /` (outside the API-key layer).
pub fn router() -> Router<AppState> {
    Router::new().route("/", get(page))
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // A new binary may serve a new page: always revalidate.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn page_is_one_whole_document() {
        assert!(PAGE.starts_with("<!doctype html>"));
        assert!(PAGE.trim_end().ends_with("</html>"));
        assert_eq!(PAGE.matches("<script>").count(), 1);
        // Self-contained: no resource from elsewhere.
        for needle in ["src=\"http", "href=\"http", "@import", "<script src"] {
            assert!(!PAGE.contains(needle), "page refers to an external resource: {needle}");
        }
    }
}
