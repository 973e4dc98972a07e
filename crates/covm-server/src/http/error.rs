//! The one place where an error becomes an HTTP status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use covm_types::{Error, ErrorKind};

/// An app error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError(e)
    }
}

/// A response's marker: the app said another node runs the VM (the forwarding middleware sends the
/// request there).
#[derive(Debug, Clone)]
pub struct OtherNode(pub String);

/// The error code of a response, for the middleware that logs failed requests.
#[derive(Debug, Clone)]
pub struct ResponseCode(pub covm_types::ErrorCode);

pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorKind::Locked => StatusCode::LOCKED,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let mut resp = (status(e.kind), axum::Json(e.body())).into_response();
        if let Some(s) = e.retry_after_s {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if e.kind == ErrorKind::Unauthenticated {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(node) = &e.other_node {
            resp.extensions_mut().insert(OtherNode(node.clone()));
        }
        resp.extensions_mut().insert(ResponseCode(e.code));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status() {
        let cases = [
            (ErrorKind::InvalidRequest, 400),
            (ErrorKind::Unauthenticated, 401),
            (ErrorKind::Forbidden, 403),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Conflict, 409),
            (ErrorKind::RequestTimeout, 408),
            (ErrorKind::PreconditionFailed, 412),
            (ErrorKind::PayloadTooLarge, 413),
            (ErrorKind::UnsupportedMediaType, 415),
            (ErrorKind::Locked, 423),
            (ErrorKind::RateLimited, 429),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::StorageFull, 507),
            (ErrorKind::Internal, 500),
        ];
        for (kind, code) in cases {
            assert_eq!(status(kind).as_u16(), code, "{kind:?}");
        }
    }

    #[test]
    fn rate_limited_carries_retry_after() {
        let r = ApiError(Error::rate_limited(7, "slow down")).into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
    }
}
