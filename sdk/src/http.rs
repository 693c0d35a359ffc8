//! Outbound HTTP from inside the sandbox, through `wasi:http`.
//!
//! The host refuses every request unless the plugin's manifest lists the request's
//! `host:port` under `[capabilities] http`; a refused request fails here with
//! [`HttpError::Denied`], and the host logs it once per attempt. Requests block the attempt
//! (the host still stops it at its deadline), and the whole response body is read into
//! memory, so it counts against the plugin's memory cap.
//!
//! ```no_run
//! # fn call() -> Result<(), rebound_sdk::Failure> {
//! use std::time::Duration;
//! use rebound_sdk::{http, Failure};
//!
//! let response = http::get("http://127.0.0.1:8000/v1/models")
//!     .map_err(|err| Failure::retry(err.to_string()))?;
//! if response.status == 503 {
//!     return Err(Failure::retry_after(Duration::from_secs(5), "model server busy"));
//! }
//! # Ok(()) }
//! ```

use std::fmt;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

/// A response, with its whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, such as 200 or 503.
    pub status: u16,
    /// The body's bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text, with invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a request got no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The URL is not `http://host[:port]/path` or `https://…`.
    BadUrl(String),
    /// The host refused the request: its `host:port` is not in the plugin's grant.
    Denied(String),
    /// The request was allowed but failed (connection refused, timeout, protocol error).
    Failed(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadUrl(why) => write!(f, "bad URL: {why}"),
            HttpError::Denied(authority) => write!(
                f,
                "request to {authority} denied: not in the plugin's [capabilities] http grant"
            ),
            HttpError::Failed(why) => write!(f, "request failed: {why}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// Sends a GET to `url` and reads the whole response.
pub fn get(url: &str) -> Result<Response, HttpError> {
    send("GET", url, &[], None)
}

/// Sends a POST of `body` to `url`, with `content_type`, and reads the whole response.
pub fn post(url: &str, content_type: &str, body: &[u8]) -> Result<Response, HttpError> {
    send("POST", url, &[("content-type", content_type)], Some(body))
}

/// Sends a request with `method` (GET, POST, PUT, DELETE, HEAD, PATCH), `headers` and an
/// optional `body`, and reads the whole response.
pub fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, HttpError> {
    let target = Target::parse(url)?;
    let fields = Fields::new();
    for (name, value) in headers {
        fields
            .append(name, value.as_bytes())
            .map_err(|err| HttpError::BadUrl(format!("header {name}: {err:?}")))?;
    }
    let request = OutgoingRequest::new(fields);
    request
        .set_method(&parse_method(method)?)
        .and_then(|()| request.set_scheme(Some(&target.scheme)))
        .and_then(|()| request.set_authority(Some(&target.authority)))
        .and_then(|()| request.set_path_with_query(Some(&target.path)))
        .map_err(|()| HttpError::BadUrl(format!("{url} is not a valid request target")))?;
    let outgoing = request
        .body()
        .map_err(|()| HttpError::Failed("the request body was taken already".into()))?;

    let pending = outgoing_handler::handle(request, None)
        .map_err(|code| error_for(code, &target.authority))?;
    write_body(outgoing, body.unwrap_or_default())?;

    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(error_for(code, &target.authority)),
        Some(Err(())) | None => {
            return Err(HttpError::Failed("the response was not ready".into()));
        }
    };
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|()| HttpError::Failed("the response body was taken already".into()))?;
    let stream = incoming
        .stream()
        .map_err(|()| HttpError::Failed("the response body stream was taken already".into()))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(err)) => {
                return Err(HttpError::Failed(err.to_debug_string()));
            }
        }
    }
    Ok(Response {
        status,
        body: bytes,
    })
}

/// Writes all of `body` and ends it; an empty body is ended at once.
fn write_body(outgoing: OutgoingBody, body: &[u8]) -> Result<(), HttpError> {
    {
        let stream = outgoing
            .write()
            .map_err(|()| HttpError::Failed("the request body stream was taken already".into()))?;
        // `blocking-write-and-flush` takes at most 4096 bytes a call.
        for chunk in body.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|err| HttpError::Failed(format!("writing the request body: {err:?}")))?;
        }
        // The stream must be dropped before the body is finished.
    }
    OutgoingBody::finish(outgoing, None)
        .map_err(|code| HttpError::Failed(format!("finishing the request body: {code}")))
}

fn parse_method(method: &str) -> Result<Method, HttpError> {
    Ok(match method.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "HEAD" => Method::Head,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => return Err(HttpError::BadUrl(format!("unsupported method {other}"))),
    })
}

fn error_for(code: ErrorCode, authority: &str) -> HttpError {
    match code {
        ErrorCode::HttpRequestDenied => HttpError::Denied(authority.to_owned()),
        other => HttpError::Failed(other.to_string()),
    }
}

/// The parts of an `http(s)://authority/path?query` URL that a request needs.
struct Target {
    scheme: Scheme,
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, HttpError> {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            return Err(HttpError::BadUrl(format!(
                "{url} does not start with http:// or https://"
            )));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(HttpError::BadUrl(format!("{url} names no host")));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        Ok(Target {
            scheme,
            authority: authority.to_owned(),
            path,
        })
    }
}
