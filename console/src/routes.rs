//! The console's HTTP routes: the page and its assets, the JSON the page reads, the server-sent event
//! stream of the live snapshot, the admin actions (POST, through the broker's audited RPCs) and the
//! export downloads streamed from the broker. Every route is behind the token check ([`require_token`]).

use std::convert::Infallible;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flashgate_common::batch_report::BatchReport;
use flashgate_common::device_export::{DeviceRow, write_csv_header, write_csv_row};
use flashgate_proto::v1 as pb;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{self, Role};
use crate::{Console, ConsoleError, validate};

/// The page (one document; the script draws each view).
pub const INDEX_HTML: &str = include_str!("../assets/index.html");
/// The page's script.
pub const APP_JS: &str = include_str!("../assets/app.js");
/// The page's style sheet.
pub const STYLE_CSS: &str = include_str!("../assets/style.css");

/// The console's router over `console`.
pub fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/api/session", get(session))
        .route("/api/snapshot", get(snapshot))
        .route("/api/events", get(events))
        .route("/api/batch/{id}", get(batch))
        .route("/api/device", get(device))
        .route("/api/audit", get(audit))
        .route("/api/action", post(action).layer(DefaultBodyLimit::max(validate::MAX_ACTION_BODY)))
        .route("/export/batch/{id}/report.json", get(export_report))
        .route("/export/batch/{id}/devices.jsonl", get(export_jsonl))
        .route("/export/batch/{id}/devices.csv", get(export_csv))
        .layer(middleware::from_fn_with_state(console.clone(), require_token))
        .with_state(console)
}

/// The token check in front of every route: the `token` query parameter (which also sets the
/// cookie) or the cookie; a POST must also carry the admin token in [`auth::ACTION_HEADER`]. The
/// role found is put in the request's extensions.
async fn require_token(State(c): State<Console>, mut req: Request, next: Next) -> Response {
    let from_query = req.uri().query().and_then(auth::query_token).map(str::to_owned);
    let from_cookie = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| auth::cookie_value(v, auth::COOKIE_NAME))
        .map(str::to_owned);
    let (token, set) = match (from_query, from_cookie) {
        (Some(q), _) => (q, true),
        (None, Some(c)) => (c, false),
        (None, None) => return ConsoleError::Unauthorized.into_response(),
    };
    let Some(role) = c.tokens.role_of(&token) else {
        return ConsoleError::Unauthorized.into_response();
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let header_token = req.headers().get(auth::ACTION_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if role != Role::Admin {
            return ConsoleError::Forbidden("the wallboard token is read-only: actions need the admin URL")
                .into_response();
        }
        if !c.tokens.is_admin(header_token) {
            return ConsoleError::Forbidden("an action must carry the admin token in the x-console-token header")
                .into_response();
        }
    }
    req.extensions_mut().insert(role);
    let mut resp = next.run(req).await;
    if set && let Ok(v) = HeaderValue::from_str(&auth::set_cookie(&token)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert("x-frame-options", HeaderValue::from_static("DENY"));
    resp.headers_mut().insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn index() -> Response {
    let csp = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'";
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CONTENT_SECURITY_POLICY, csp)], INDEX_HTML)
        .into_response()
}

fn role_of(req_role: Option<axum::Extension<Role>>) -> Role {
    // The middleware always inserts a role before a handler runs.
    req_role.map(|r| r.0).unwrap_or(Role::Wallboard)
}

async fn session(State(c): State<Console>, role: Option<axum::Extension<Role>>) -> Response {
    let role = role_of(role);
    let action_token = (role == Role::Admin).then(|| c.tokens.admin().to_owned());
    axum::Json(json!({
        "role": role.as_str(),
        "action_token": action_token,
        "broker": c.info.broker,
        "admin": c.info.admin,
        "poll_interval_ms": crate::live::POLL_INTERVAL.as_millis() as u64,
    }))
    .into_response()
}

fn json_text(text: &str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], text.to_owned()).into_response()
}

async fn snapshot(State(c): State<Console>) -> Response {
    json_text(&c.live.latest())
}

async fn events(State(c): State<Console>) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ConsoleError> {
    let permit = c.streams.clone().try_acquire_owned().map_err(|_| ConsoleError::Busy)?;
    let rx = c.live.subscribe();
    let stream = futures::stream::unfold((rx, permit, true), |(mut rx, permit, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let data = rx.borrow_and_update().clone();
        Some((Ok(Event::default().event("snapshot").data(data.as_str())), (rx, permit, false)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn batch(State(c): State<Console>, Path(id): Path<String>) -> Result<Response, ConsoleError> {
    let id = validate::batch_id(&id)?;
    let mut client = c.admin.client();
    let info = client
        .batch_status(pb::BatchStatusRequest { id: id.to_owned() })
        .await
        .map_err(|s| ConsoleError::broker("batch status", &s))?
        .into_inner();
    let report = client
        .batch_report(pb::BatchReportRequest { batch_id: id.to_owned() })
        .await
        .map_err(|s| ConsoleError::broker("batch report", &s))?
        .into_inner();
    let report: BatchReport = serde_json::from_str(&report.report_json)
        .map_err(|e| ConsoleError::BadAnswer(format!("the broker's batch report does not parse: {e}")))?;
    let report = serde_json::to_value(&report).map_err(|e| ConsoleError::BadAnswer(e.to_string()))?;
    Ok(axum::Json(json!({
        "batch": crate::live::batch_json(&info),
        "report": report,
        "rate": c.live.rate_series(id),
        "rate_bucket_ms": crate::live::RATE_BUCKET_MS,
    }))
    .into_response())
}

/// `GET /api/device?q=…`.
#[derive(Debug, Deserialize)]
struct DeviceQuery {
    #[serde(default)]
    q: String,
}

async fn device(State(c): State<Console>, Query(q): Query<DeviceQuery>) -> Result<Response, ConsoleError> {
    let device_id = validate::device_query(&q.q)?;
    let h = c
        .admin
        .client()
        .device_history(pb::DeviceHistoryRequest { device_id: device_id.clone() })
        .await
        .map_err(|s| ConsoleError::broker("device history", &s))?
        .into_inner();
    let mut records = Vec::with_capacity(h.records_json.len());
    for r in &h.records_json {
        let row: DeviceRow = serde_json::from_str(r)
            .map_err(|e| ConsoleError::BadAnswer(format!("a device record from the broker does not parse: {e}")))?;
        records.push(serde_json::to_value(&row).map_err(|e| ConsoleError::BadAnswer(e.to_string()))?);
    }
    let licences: Vec<Value> = h
        .licences
        .iter()
        .map(|l| json!({"batch_id": l.batch_id, "station": l.station, "site": l.site, "issued_at_ms": l.issued_at_ms}))
        .collect();
    let installs: Vec<Value> = h
        .installs
        .iter()
        .map(|i| {
            json!({"batch_id": i.batch_id, "station": i.station, "status_code": i.status_code, "message": i.message,
                   "flash_crc": i.flash_crc, "attempt": i.attempt, "reported_at_ms": i.reported_at_ms})
        })
        .collect();
    Ok(axum::Json(json!({
        "device_id": h.device_id,
        "licences": licences,
        "installs": installs,
        "records": records,
        "vendor_keys": h.vendor_keys,
    }))
    .into_response())
}

async fn audit(State(c): State<Console>) -> Result<Response, ConsoleError> {
    let mut client = c.admin.client();
    let v = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .map_err(|s| ConsoleError::broker("verifying the audit chain", &s))?
        .into_inner();
    let hsm = client
        .hsm_status(pb::HsmStatusRequest {})
        .await
        .map_err(|s| ConsoleError::broker("HSM status", &s))?
        .into_inner();
    let members: Vec<Value> = hsm
        .members
        .iter()
        .map(|m| {
            json!({"name": m.name, "healthy": m.healthy, "audit_key_fingerprint": m.audit_key_fingerprint,
                        "last_error": m.last_error})
        })
        .collect();
    let checkpoint = c.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(axum::Json(json!({
        "verify": {"ok": v.ok, "records": v.records, "head_seq": v.head_seq, "head_hash": v.head_hash,
                   "broken_seq": v.broken_seq, "fault": v.fault, "ledger_id": v.ledger_id, "genesis": v.genesis},
        "broker": hsm.broker,
        "members": members,
        "checkpoint": checkpoint,
    }))
    .into_response())
}

/// `POST /api/action`: one admin action, as JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRequest {
    action: String,
    #[serde(default)]
    station: String,
    #[serde(default)]
    batch: String,
    #[serde(default)]
    reason: String,
}

/// Names of the actions `POST /api/action` takes.
pub const ACTIONS: [&str; 6] = ["assign", "pause_station", "open_batch", "pause_batch", "close_batch", "checkpoint"];

async fn action(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> Result<Response, ConsoleError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(ConsoleError::Invalid { field: "content-type", why: "must be application/json".into() });
    }
    let req: ActionRequest = serde_json::from_slice(&body)
        .map_err(|e| ConsoleError::Invalid { field: "body", why: format!("is not an action: {e}") })?;
    let mut client = c.admin.client();
    let (done, warnings) = match req.action.as_str() {
        "assign" => {
            let station = validate::station(&req.station)?;
            let batch = validate::batch_id(&req.batch)?;
            let info = client
                .assign_station(pb::AssignStationRequest { station: station.to_owned(), batch_id: batch.to_owned() })
                .await
                .map_err(|s| ConsoleError::broker("assigning the station", &s))?
                .into_inner();
            (format!("assigned batch {batch} to {station}"), info.warnings)
        }
        "pause_station" => {
            let station = validate::station(&req.station)?;
            let reason = validate::reason(&req.reason)?;
            let reason = if reason.is_empty() { "paused from the console" } else { reason };
            let info = client
                .pause_station(pb::PauseStationRequest { station: station.to_owned(), reason: reason.to_owned() })
                .await
                .map_err(|s| ConsoleError::broker("pausing the station", &s))?
                .into_inner();
            (format!("paused {station}"), info.warnings)
        }
        a @ ("open_batch" | "pause_batch" | "close_batch") => {
            let batch = validate::batch_id(&req.batch)?;
            let (state, word) = match a {
                "open_batch" => (pb::BatchState::Open, "opened"),
                "pause_batch" => (pb::BatchState::Paused, "paused"),
                _ => (pb::BatchState::Closed, "closed"),
            };
            let info = client
                .set_batch_state(pb::SetBatchStateRequest { id: batch.to_owned(), state: state as i32 })
                .await
                .map_err(|s| ConsoleError::broker("setting the batch state", &s))?
                .into_inner();
            (format!("{word} batch {batch}"), info.warnings)
        }
        "checkpoint" => {
            let cp = client
                .checkpoint_audit(pb::CheckpointAuditRequest {})
                .await
                .map_err(|s| ConsoleError::broker("signing an audit checkpoint", &s))?
                .into_inner();
            let j = json!({"seq": cp.seq, "hash": cp.hash, "at": cp.at, "broker": cp.broker, "ledger_id": cp.ledger_id,
                           "checkpoint_hex": hex::encode(&cp.checkpoint)});
            *c.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = Some(j);
            (format!("signed a checkpoint of the audit head, seq {}", cp.seq), Vec::new())
        }
        other => {
            return Err(ConsoleError::Invalid {
                field: "action",
                why: format!("{:?} is not one of {}", other.chars().take(32).collect::<String>(), ACTIONS.join(", ")),
            });
        }
    };
    tracing::info!(action = %req.action, done = %done, "console action");
    Ok(axum::Json(json!({"done": done, "warnings": warnings})).into_response())
}

fn download(content_type: &'static str, filename: String, body: Body) -> Response {
    let disposition = format!("attachment; filename=\"{filename}\"");
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

async fn export_report(State(c): State<Console>, Path(id): Path<String>) -> Result<Response, ConsoleError> {
    let id = validate::batch_id(&id)?;
    let r = c
        .admin
        .client()
        .batch_report(pb::BatchReportRequest { batch_id: id.to_owned() })
        .await
        .map_err(|s| ConsoleError::broker("batch report", &s))?
        .into_inner();
    Ok(download("application/json", format!("{id}-report.json"), Body::from(r.report_json)))
}

async fn device_stream(c: &Console, id: &str) -> Result<tonic::Streaming<pb::DevicesChunk>, ConsoleError> {
    Ok(c.admin
        .client()
        .export_devices(pb::ExportDevicesRequest { batch_id: id.to_owned() })
        .await
        .map_err(|s| ConsoleError::broker("exporting the devices", &s))?
        .into_inner())
}

async fn export_jsonl(State(c): State<Console>, Path(id): Path<String>) -> Result<Response, ConsoleError> {
    let id = validate::batch_id(&id)?;
    let stream = device_stream(&c, id).await?.map(|r| r.map(|chunk| Bytes::from(chunk.data)));
    Ok(download("application/jsonl", format!("{id}-devices.jsonl"), Body::from_stream(stream)))
}

/// Whole lines of `flashgate-devices-v1` as CSV rows (no header).
pub fn csv_rows(lines: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let row: DeviceRow = serde_json::from_slice(line)
            .map_err(|e| std::io::Error::other(format!("a device line from the broker does not parse: {e}")))?;
        write_csv_row(&mut w, &row).map_err(std::io::Error::other)?;
    }
    w.into_inner().map_err(|e| std::io::Error::other(e.to_string()))
}

/// The CSV header line of the device export.
pub fn csv_header() -> Result<Vec<u8>, std::io::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    write_csv_header(&mut w).map_err(std::io::Error::other)?;
    w.into_inner().map_err(|e| std::io::Error::other(e.to_string()))
}

async fn export_csv(State(c): State<Console>, Path(id): Path<String>) -> Result<Response, ConsoleError> {
    let id = validate::batch_id(&id)?;
    let header = csv_header().map_err(|e| ConsoleError::BadAnswer(e.to_string()))?;
    let rows = device_stream(&c, id).await?.map(|r| match r {
        Ok(chunk) => csv_rows(&chunk.data).map(Bytes::from),
        Err(status) => Err(std::io::Error::other(crate::status_text(&status))),
    });
    let stream = futures::stream::once(async move { Ok(Bytes::from(header)) }).chain(rows);
    Ok(download("text/csv; charset=utf-8", format!("{id}-devices.csv"), Body::from_stream(stream)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use axum::http::{Request as HttpRequest, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::{Admin, ConsoleInfo, Tokens};

    const ADMIN: &str = "aaaaaaaaaaaaaaaa";
    const WALL: &str = "bbbbbbbbbbbbbbbb";

    fn app() -> Router {
        // A channel that is never connected: these requests are refused before any RPC.
        let channel = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
        let console =
            Console::start(Admin::new(channel), Tokens::new(ADMIN, Some(WALL.into())), ConsoleInfo::default());
        router(console)
    }

    async fn call(req: HttpRequest<Body>) -> (StatusCode, HeaderMap, String) {
        let resp = app().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn get(uri: &str) -> HttpRequest<Body> {
        HttpRequest::get(uri).body(Body::empty()).unwrap()
    }

    fn with_cookie(uri: &str, token: &str) -> HttpRequest<Body> {
        HttpRequest::get(uri)
            .header("cookie", format!("x=1; {}={token}", auth::COOKIE_NAME))
            .body(Body::empty())
            .unwrap()
    }

    fn post(token_cookie: &str, header_token: Option<&str>, body: &str) -> HttpRequest<Body> {
        let mut b = HttpRequest::post("/api/action")
            .header("cookie", format!("{}={token_cookie}", auth::COOKIE_NAME))
            .header("content-type", "application/json");
        if let Some(h) = header_token {
            b = b.header(auth::ACTION_HEADER, h);
        }
        b.body(Body::from(body.to_owned())).unwrap()
    }

    #[tokio::test]
    async fn every_route_needs_a_token() {
        for uri in ["/", "/assets/app.js", "/api/snapshot", "/api/session", "/export/batch/b1/devices.csv"] {
            let (status, _, body) = call(get(uri)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
            assert!(body.contains("no valid console token"), "{body}");
        }
        assert_eq!(call(get("/?token=aaaaaaaaaaaaaaab")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(with_cookie("/", "nope")).await.0, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn the_url_token_sets_the_cookie() {
        let (status, headers, body) = call(get(&format!("/?token={ADMIN}"))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("<title>Flashgate console</title>"));
        let cookie = headers.get(header::SET_COOKIE).unwrap().to_str().unwrap();
        assert!(
            cookie.starts_with(&format!("{}={ADMIN};", auth::COOKIE_NAME)) && cookie.contains("HttpOnly"),
            "{cookie}"
        );
        assert!(headers.get(header::CONTENT_SECURITY_POLICY).is_some());
        let (status, headers, js) = call(with_cookie("/assets/app.js", ADMIN)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.get(header::SET_COOKIE).is_none(), "the cookie is set once, from the URL");
        assert!(js.contains("EventSource"));
    }

    #[tokio::test]
    async fn sessions_say_the_role() {
        let (_, _, admin) = call(with_cookie("/api/session", ADMIN)).await;
        let admin: Value = serde_json::from_str(&admin).unwrap();
        assert_eq!((admin["role"].as_str(), admin["action_token"].as_str()), (Some("admin"), Some(ADMIN)));
        let (_, _, wall) = call(with_cookie("/api/session", WALL)).await;
        let wall: Value = serde_json::from_str(&wall).unwrap();
        assert_eq!(wall["role"], "wallboard");
        assert!(wall["action_token"].is_null(), "the wallboard never learns the admin token");
        let (status, _, snap) = call(with_cookie("/api/snapshot", WALL)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(snap.contains("\"stations\""));
    }

    #[tokio::test]
    async fn actions_need_the_admin_token_in_the_header() {
        let body = r#"{"action":"pause_batch","batch":"b1"}"#;
        let (status, _, text) = call(post(WALL, Some(WALL), body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(text.contains("read-only"), "{text}");
        let (status, _, text) = call(post(ADMIN, None, body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(text.contains("x-console-token"), "{text}");
        let (status, _, _) = call(post(ADMIN, Some(WALL), body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn action_values_are_checked_before_the_broker() {
        let cases = [
            (r#"{"action":"explode"}"#, "action \"explode\" is not one of assign"),
            (r#"{"action":"assign","station":"spiffe://t/site/a/station/1","batch":"b 1"}"#, "batch may hold only"),
            (r#"{"action":"assign","station":"x","batch":"b1"}"#, "station is not a spiffe://"),
            (
                r#"{"action":"pause_station","station":"spiffe://t/site/a/station/1","reason":"a\u0007"}"#,
                "reason holds control",
            ),
            (r#"{"action":"open_batch","batch":""}"#, "batch is empty"),
            (r#"{"action":"open_batch","batch":"b1","extra":1}"#, "body is not an action"),
            ("not json", "body is not an action"),
        ];
        for (body, want) in cases {
            let (status, _, text) = call(post(ADMIN, Some(ADMIN), body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
            assert!(text.contains(want), "{body}: {text}");
        }
        let big = format!(r#"{{"action":"open_batch","batch":"{}"}}"#, "b".repeat(validate::MAX_ACTION_BODY));
        assert_eq!(call(post(ADMIN, Some(ADMIN), &big)).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn path_and_query_values_are_checked() {
        let (status, _, text) = call(with_cookie("/api/batch/b%20x", ADMIN)).await;
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::BAD_REQUEST, "batch may hold only letters, digits, '.', '_' and '-'")
        );
        let (status, _, text) = call(with_cookie("/export/batch/..%2Fx/devices.csv", WALL)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        let (status, _, text) = call(with_cookie("/api/device?q=12", ADMIN)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(text.contains("has 2 hex digits"), "{text}");
    }

    #[test]
    fn device_lines_become_csv_rows() {
        let header = String::from_utf8(csv_header().unwrap()).unwrap();
        assert!(header.starts_with("batch_id,device_id"), "{header}");
        assert!(csv_rows(b"").unwrap().is_empty());
        let e = csv_rows(b"{\"not\":\"a row\"}\n").unwrap_err();
        assert!(e.to_string().contains("does not parse"), "{e}");
    }
}
