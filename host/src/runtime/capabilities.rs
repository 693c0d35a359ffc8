//! What a plugin may reach beyond the host's own imports: named environment variables and
//! outbound HTTP to listed `host:port` pairs. Everything is denied unless the plugin's
//! manifest grants it (`[capabilities]`, see [`super::manifest`]).
//!
//! Environment variables are copied from the host's environment when the plugin loads; a
//! granted name the host does not have is left out (and logged). HTTP goes through
//! `wasi:http`, which every plugin may import: a request whose authority is not granted
//! fails inside the guest with `HTTP-request-denied` before any connection is made, and the
//! host logs the first such refusal of each attempt.

use std::sync::Arc;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks, default_send_request,
};

/// What carries a response's body in the background, as `wasi:http` wants it.
type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

/// What a manifest grants, as written there (validated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Environment variable names copied from the host.
    pub env: Vec<String>,
    /// `host:port` pairs, lowercase, that requests may go to.
    pub http: Vec<String>,
}

/// A plugin's capabilities resolved against this host: the values of its granted variables
/// and its HTTP allow-list, shared by all of its attempts.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Variables and their values, as the guest sees them.
    pub env: Arc<[(String, String)]>,
    /// Where outbound requests may go.
    pub http: Arc<[String]>,
}

impl Grants {
    /// Resolves `capabilities` against the host's environment. Returns the grants and the
    /// granted variables the host does not have.
    pub fn resolve(capabilities: &Capabilities) -> (Grants, Vec<String>) {
        let mut env = Vec::new();
        let mut missing = Vec::new();
        for name in &capabilities.env {
            match std::env::var(name) {
                Ok(value) => env.push((name.clone(), value)),
                Err(_) => missing.push(name.clone()),
            }
        }
        let grants = Grants {
            env: env.into(),
            http: capabilities.http.clone().into(),
        };
        (grants, missing)
    }
}

/// The `wasi:http` hooks of one attempt: sends the requests its grant allows, refuses the
/// others.
pub struct HttpGate {
    allowed: Arc<[String]>,
    refused_once: bool,
}

impl HttpGate {
    /// A gate that lets requests through to `allowed` only.
    pub fn new(allowed: Arc<[String]>) -> Self {
        HttpGate {
            allowed,
            refused_once: false,
        }
    }

    /// Whether a request to `authority` (`host` or `host:port`) over `https` or not is
    /// granted. A missing port is the scheme's default.
    fn allows(&self, authority: &str, https: bool) -> bool {
        let authority = authority.to_ascii_lowercase();
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok() && !port.contains(']'));
        let with_port = if has_port {
            authority
        } else {
            format!("{authority}:{}", if https { 443 } else { 80 })
        };
        self.allowed.contains(&with_port)
    }
}

impl WasiHttpHooks for HttpGate {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send>
    {
        // Nothing reports errors of the request body: it is written before this call.
        drop(fut);
        let https = request.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
        let authority = request
            .uri()
            .authority()
            .map(|authority| authority.as_str().to_owned())
            .unwrap_or_default();
        if !self.allows(&authority, https) {
            if !self.refused_once {
                self.refused_once = true;
                tracing::warn!(
                    %authority,
                    "plugin's HTTP request refused: not in its [capabilities] http grant"
                );
            }
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        Box::new(async move {
            let (response, io) = default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as IoFuture,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_matches_host_and_port_with_default_ports() {
        let gate = HttpGate::new(Arc::from(vec![
            "127.0.0.1:8000".to_owned(),
            "models.internal:443".to_owned(),
            "plain.internal:80".to_owned(),
            "[::1]:9000".to_owned(),
        ]));
        assert!(gate.allows("127.0.0.1:8000", false));
        assert!(!gate.allows("127.0.0.1:8001", false));
        assert!(!gate.allows("127.0.0.1", false));
        assert!(gate.allows("Models.Internal", true));
        assert!(!gate.allows("models.internal", false));
        assert!(gate.allows("plain.internal", false));
        assert!(gate.allows("[::1]:9000", false));
        assert!(!gate.allows("[::1]", false));
        assert!(!gate.allows("", false));
    }

    #[test]
    fn granted_variables_missing_on_the_host_are_left_out() {
        let capabilities = Capabilities {
            env: vec!["PATH".into(), "REBOUND_TEST_SURELY_UNSET_VARIABLE".into()],
            http: vec![],
        };
        let (grants, missing) = Grants::resolve(&capabilities);
        assert_eq!(grants.env.len(), 1);
        assert_eq!(grants.env[0].0, "PATH");
        assert_eq!(missing, ["REBOUND_TEST_SURELY_UNSET_VARIABLE"]);
    }
}
