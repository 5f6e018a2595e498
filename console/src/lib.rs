//! `flashgate console`: a live web console of the line, served on loopback over plain HTTP and
//! talking to a broker with the mutual-TLS admin identity of whoever started it.
//!
//! This crate owns the HTTP side only: the axum [`router`] (pages, JSON for the pages, server-sent
//! events, actions, exports), its tokens ([`auth`]), the checks of every request value
//! ([`validate`]) and the poller behind the live view ([`live`]). The `flashgate` binary opens the
//! broker channel (the same connection code as `flashgate admin`), binds the listener and prints the
//! URLs. Every action goes through the broker's audited `AdminService` RPCs, as the admin.

pub mod auth;
pub mod live;
pub mod routes;
pub mod validate;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flashgate_proto::v1::admin_service_client::AdminServiceClient;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

pub use auth::{Role, Tokens};
pub use routes::router;

/// Default port of the console on 127.0.0.1.
pub const DEFAULT_PORT: u16 = 7480;
/// Largest response the console accepts from the broker (device histories, reports).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Most server-sent event streams open at once (browsers keep one per open page).
pub const MAX_EVENT_STREAMS: usize = 64;

/// Why a console request failed; each becomes an HTTP status with the message as its body.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A request value was missing or malformed (400).
    #[error("{field} {why}")]
    Invalid {
        /// The parameter.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// No valid token (401).
    #[error("no valid console token: open the URL `flashgate console` printed")]
    Unauthorized,
    /// The token may not do this (403).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The broker refused or failed the RPC.
    #[error("{what}: {text}")]
    Broker {
        /// What the console asked for.
        what: &'static str,
        /// The gRPC code.
        code: tonic::Code,
        /// The status in words.
        text: String,
    },
    /// The broker answered something the console cannot read (502).
    #[error("{0}")]
    BadAnswer(String),
    /// Too many event streams are open (503).
    #[error("too many live pages are open on this console (at most {MAX_EVENT_STREAMS})")]
    Busy,
}

impl ConsoleError {
    /// `what` failed at the broker with `status`.
    pub fn broker(what: &'static str, status: &tonic::Status) -> Self {
        Self::Broker { what, code: status.code(), text: status_text(status) }
    }

    /// The HTTP status of this error.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Broker { code, .. } => match code {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => StatusCode::CONFLICT,
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_GATEWAY,
            },
            Self::BadAnswer(_) => StatusCode::BAD_GATEWAY,
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        (self.http_status(), [("content-type", "text/plain; charset=utf-8")], self.to_string()).into_response()
    }
}

/// A failed RPC in one line: the Flashgate refusal (`refused (REASON): message`) or the gRPC code and
/// message.
pub fn status_text(status: &tonic::Status) -> String {
    flashgate_proto::errors::describe_status(status)
}

/// The broker's `AdminService`, as the admin who started the console.
#[derive(Debug, Clone)]
pub struct Admin {
    client: AdminServiceClient<Channel>,
}

impl Admin {
    /// The admin client on an open mutual-TLS `channel`.
    pub fn new(channel: Channel) -> Self {
        Self { client: AdminServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES) }
    }

    /// A client for one request (clones share the channel).
    pub fn client(&self) -> AdminServiceClient<Channel> {
        self.client.clone()
    }
}

/// What the console shows about itself on its pages.
#[derive(Debug, Clone, Default)]
pub struct ConsoleInfo {
    /// The broker URL.
    pub broker: String,
    /// The admin identity the console acts as.
    pub admin: String,
}

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct Console {
    /// The broker.
    pub admin: Admin,
    /// The tokens.
    pub tokens: Tokens,
    /// The live picture.
    pub live: live::Live,
    /// About this console.
    pub info: ConsoleInfo,
    /// The newest checkpoint this console had signed (`CheckpointAudit`), as JSON.
    pub last_checkpoint: Arc<Mutex<Option<serde_json::Value>>>,
    /// Permits for event streams.
    pub streams: Arc<Semaphore>,
}

impl Console {
    /// The console on `admin` with `tokens`; starts the poller (needs a Tokio runtime).
    pub fn start(admin: Admin, tokens: Tokens, info: ConsoleInfo) -> Self {
        let live = live::spawn(admin.clone());
        Self {
            admin,
            tokens,
            live,
            info,
            last_checkpoint: Arc::new(Mutex::new(None)),
            streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
        }
    }
}

/// The URLs a console on `addr` prints: the admin one, and the wallboard one when there is a token for it.
pub fn urls(addr: SocketAddr, tokens: &Tokens) -> (String, Option<String>) {
    let base = format!("http://{addr}/");
    (format!("{base}?token={}", tokens.admin()), tokens.wallboard().map(|w| format!("{base}?token={w}")))
}

/// Serves `console` on `listener` until `shutdown` resolves. Open pages are not waited for: their
/// event streams never end by themselves, and an action in flight is the broker's to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Console,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::select! {
        r = axum::serve(listener, router(console)) => r,
        () = shutdown => Ok(()),
    }
}
