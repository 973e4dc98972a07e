//! The web UI, served by the same binary: the assets of `web/dist` embedded at build time (see
//! `build.rs`). Every GET of a path outside `/api/`, `/metrics` and the health checks that is not an
//! asset gets `index.html`, so that the UI's deep links (`/vms/web-1`, `/audit`) work.

use axum::body::Body;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use covm_types::{Error, ErrorCode, ErrorKind};

use crate::http::error::ApiError;

#[derive(rust_embed::Embed)]
#[folder = "$COVM_UI_DIR"]
struct Assets;

/// What the UI's pages may load: their own scripts, styles and images, and requests to this origin
/// (the API, the feed and the consoles' WebSockets); nothing from elsewhere, never framed.
pub const UI_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data: blob:; connect-src 'self'; worker-src 'self' blob:; font-src 'self' data:; \
    frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'";

/// Serves an asset, or `index.html` for the UI's own paths; API paths that match no route get the
/// JSON error.
pub async fn fallback(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let api = path.starts_with("/api/") || path == "/api";
    if api || !matches!(method, Method::GET | Method::HEAD) {
        let why = match api {
            true => "there is no such API path",
            false => "there is no such path: the web UI's pages are only read (GET); the API is under /api/v1",
        };
        return ApiError(Error::new(ErrorKind::NotFound, ErrorCode::NoRoute, why)).into_response();
    }
    let name = path.trim_start_matches('/');
    let (file, immutable) = match Assets::get(name).filter(|_| !name.is_empty()) {
        // Vite names every built asset by its content's hash: it never changes.
        Some(f) => (f, name.starts_with("assets/")),
        None => match Assets::get("index.html") {
            Some(f) => (f, false),
            None => return StatusCode::NOT_FOUND.into_response(),
        },
    };
    let mime = file.metadata.mimetype().to_owned();
    let cache = match immutable {
        true => "public, max-age=31536000, immutable",
        false => "no-cache",
    };
    let mut resp = Response::new(Body::from(file.data.into_owned()));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_str(&mime).unwrap_or(HeaderValue::from_static("text/plain")));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(UI_CSP));
    resp
}

/// Whether this binary carries the built UI (not the page that says how to build it).
pub fn built() -> bool {
    Assets::iter().any(|n| n.starts_with("assets/"))
}
