//! The ops console: one page served at `GET /ops`, its script and style,
//! all embedded in the binary at build time (nothing from a CDN; it works
//! offline). The page asks for nothing without the ops token the user
//! gives it (kept in the tab's `sessionStorage`; `/ops#token=…` signs in
//! directly), and reads the API with it: `/v1/ops/stream` for the live
//! summary and events, `/v1/ops/dataflow` for the operator graph,
//! `/v1/orders/{id}` for the inspector, and the ops actions.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

/// The page.
const INDEX: &str = include_str!("../console/index.html");
/// Its script.
const SCRIPT: &str = include_str!("../console/app.js");
/// Its style.
const STYLE: &str = include_str!("../console/style.css");

/// The console's settings.
#[derive(Clone, Debug, Default)]
pub struct ConsoleConfig {
    /// A raster tile URL template (`https://tiles.example/{z}/{x}/{y}.png`)
    /// drawn under the map; none: the map draws on a plain background.
    pub map_tiles: Option<String>,
}

/// `text` with the five HTML special characters escaped, for an attribute.
pub fn escape_attr(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// The page with the settings written in.
pub fn page(config: &ConsoleConfig) -> String {
    let tiles = escape_attr(config.map_tiles.as_deref().unwrap_or(""));
    INDEX.replace(
        r#"<meta name="grabflow-map-tiles" content="">"#,
        &format!(r#"<meta name="grabflow-map-tiles" content="{tiles}">"#),
    )
}

fn asset(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body.into(),
    )
        .into_response()
}

/// The console's routes: `/ops`, `/ops/app.js`, `/ops/style.css`. They
/// need no token (the page holds no data; every call it makes does).
pub fn routes(config: ConsoleConfig) -> Router {
    let page: Arc<str> = Arc::from(page(&config));
    Router::new()
        .route(
            "/ops",
            get(move || {
                let page = Arc::clone(&page);
                async move { asset("text/html; charset=utf-8", page.to_string()) }
            }),
        )
        .route(
            "/ops/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ops/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    #[test]
    fn the_tile_url_is_written_into_the_page_escaped() {
        let config = ConsoleConfig {
            map_tiles: Some("https://t.example/{z}/{x}/{y}.png?a=1&b=\"2\"".into()),
        };
        let html = page(&config);
        assert!(
            html.contains(r#"content="https://t.example/{z}/{x}/{y}.png?a=1&amp;b=&quot;2&quot;""#)
        );
        assert!(page(&ConsoleConfig::default())
            .contains(r#"<meta name="grabflow-map-tiles" content="">"#));
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_from_the_binary() {
        let app = routes(ConsoleConfig::default());
        for (path, kind, needle) in [
            ("/ops", "text/html", "data-metric=\"riders_indexed\""),
            ("/ops/app.js", "text/javascript", "EventSource"),
            ("/ops/style.css", "text/css", "body"),
        ] {
            let r = app
                .clone()
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let ct = r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_string();
            assert!(ct.starts_with(kind), "{path}: {ct}");
            let body = axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap();
            let text = String::from_utf8(body.to_vec()).unwrap();
            assert!(text.contains(needle), "{path} lacks {needle}");
            for remote in ["src=\"http", "href=\"http", "url(http", "@import"] {
                assert!(
                    !text.contains(remote),
                    "{path} loads from elsewhere: {remote}"
                );
            }
        }
    }
}
