//! One HTTP/1.1 connection: checks, limits, and the hand-off to the provider.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::HEADER_TIMEOUT;
use super::auth::Credentials;
use crate::cimxml::parse_request;
use crate::provider::Provider;

/// What every connection shares.
#[derive(Debug)]
pub(super) struct State {
    pub(super) provider: Arc<Provider>,
    pub(super) credentials: Option<Credentials>,
    pub(super) local_access: Option<Arc<dyn super::LocalAccess>>,
    pub(super) max_request_bytes: usize,
    pub(super) request_timeout: Duration,
}

/// What the connection's peer check decided.
#[derive(Debug, Clone)]
pub(super) enum Caller {
    /// Served (or left to HTTP Basic when credentials are configured).
    Admitted,
    /// Every request gets 403, saying why.
    Refused(String),
}

pub(super) async fn serve_connection<S>(stream: S, state: Arc<State>, caller: Caller)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let caller = Arc::new(caller);
    let service = hyper::service::service_fn(move |request| {
        let state = Arc::clone(&state);
        let caller = Arc::clone(&caller);
        async move { Ok::<_, Infallible>(handle(request, &state, &caller).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(error) = served {
        tracing::debug!(%error, "cim: connection ended");
    }
}

fn respond(
    status: StatusCode,
    cim_error: Option<&'static str>,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Some(value) = cim_error {
        response
            .headers_mut()
            .insert("CIMError", HeaderValue::from_static(value));
    }
    response
}

async fn handle(
    request: Request<Incoming>,
    state: &State,
    caller: &Caller,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    if let Caller::Refused(reason) = caller {
        // DSP0200 has no CIMError value for authorization; the request is refused as invalid
        // for this caller, and the body says why.
        return respond(
            StatusCode::FORBIDDEN,
            Some("request-not-valid"),
            format!("access denied: {reason}\n"),
        );
    }
    if request.method() != Method::POST {
        let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, None, String::new());
        response
            .headers_mut()
            .insert("Allow", HeaderValue::from_static("POST"));
        return response;
    }
    if request.uri().path() != "/cimom" {
        return respond(
            StatusCode::NOT_FOUND,
            None,
            "CIM-XML is served at /cimom\n".into(),
        );
    }
    if let Some(credentials) = &state.credentials {
        let header = request
            .headers()
            .get("Authorization")
            .and_then(|v| v.to_str().ok());
        if !credentials.accepts(header) {
            let mut response = respond(StatusCode::UNAUTHORIZED, None, String::new());
            response.headers_mut().insert(
                "WWW-Authenticate",
                HeaderValue::from_static("Basic realm=\"vmms\""),
            );
            return response;
        }
    }
    let headers = request.headers();
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/xml");
    if !content_type.starts_with("application/xml") && !content_type.starts_with("text/xml") {
        return respond(
            StatusCode::NOT_ACCEPTABLE,
            Some("header-mismatch"),
            String::new(),
        );
    }
    let operation = headers.get("CIMOperation").and_then(|v| v.to_str().ok());
    if operation.is_some_and(|o| !o.eq_ignore_ascii_case("MethodCall")) {
        return respond(
            StatusCode::BAD_REQUEST,
            Some("header-mismatch"),
            String::new(),
        );
    }
    let limited = Limited::new(request.into_body(), state.max_request_bytes);
    let body = match tokio::time::timeout(state.request_timeout, limited.collect()).await {
        Err(_) => return respond(StatusCode::REQUEST_TIMEOUT, None, String::new()),
        Ok(Err(_)) => {
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                Some("request-not-valid"),
                format!("request larger than {} bytes\n", state.max_request_bytes),
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let provider = Arc::clone(&state.provider);
    let work = tokio::task::spawn_blocking(move || {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ("request-not-well-formed", "body is not UTF-8".to_owned()))?;
        let request = parse_request(text).map_err(|e| (e.header(), e.to_string()))?;
        Ok::<_, (&'static str, String)>(provider.handle(&request))
    });
    let outcome = match tokio::time::timeout(state.request_timeout, work).await {
        Err(_) => return respond(StatusCode::GATEWAY_TIMEOUT, None, String::new()),
        Ok(Err(_)) => return respond(StatusCode::INTERNAL_SERVER_ERROR, None, String::new()),
        Ok(Ok(outcome)) => outcome,
    };
    match outcome {
        Err((header, message)) => respond(
            StatusCode::BAD_REQUEST,
            Some(header),
            format!("{message}\n"),
        ),
        Ok(xml) => {
            let mut response = respond(StatusCode::OK, None, xml);
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/xml; charset=\"utf-8\""),
            );
            headers.insert("CIMOperation", HeaderValue::from_static("MethodResponse"));
            if let Ok(value) = HeaderValue::from_str(&started.elapsed().as_micros().to_string()) {
                headers.insert("WBEMServerResponseTime", value);
            }
            response
        }
    }
}
