//! The HTTP surface: `/metrics`, `/healthz`, `/readyz`, and the lead API
//! (`GET /v1/leads/{id}`, `GET /v1/leads/{id}/explain`, `DELETE /v1/leads/{id}`).
//!
//! Served through hyper's HTTP/1 connection builder, so that the limits are
//! hyper's: a header-read timeout that also closes idle keep-alive
//! connections, at most `http.max_connections` connections at once (more wait
//! in the listen queue), and a per-request timeout. `/v1/*` requires a bearer
//! token when one is configured. Lead lookups read memory first, then Redis
//! through a small pool of connections of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::kafka::client_log::Quiet;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::decode::{Format, encode_avro, input_schema, input_schema_text};
use crate::engine::explain::Explanation;
use crate::engine::rules::published;
use crate::engine::{Engine, Kind, LeadState, Segment};
use crate::event::{Event, EventType, MAX_ID_LEN, Source, format_rfc3339, wall_clock_ms};
use crate::kafka::runtime::Runtime;
use crate::output::SignalOut;
use crate::registry::{Registry, frame};
use crate::service::Stores;
use crate::settings::{HttpSettings, Settings};
use crate::shard::cache::LeadKey;
use crate::store::{ShardId, Store};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    rt: Arc<Runtime>,
    stores: Arc<Vec<Arc<dyn Store>>>,
    next: Arc<AtomicUsize>,
    token: Option<[u8; 32]>,
    eraser: Option<Arc<FutureProducer<Quiet>>>,
    crm_topic: String,
    crm_format: Format,
    /// With `avro-registry` CRM input: the registry, and the id under which
    /// leadscore's CRM schema is registered (`<crm topic>-value`), found on
    /// the first erasure request.
    crm_registry: Option<Arc<Registry>>,
    crm_schema_id: Arc<std::sync::OnceLock<u32>>,
}

impl AppState {
    /// The state of a running service.
    pub fn new(
        rt: Arc<Runtime>,
        stores: &Stores,
        s: &Settings,
        registry: Option<Arc<Registry>>,
    ) -> anyhow::Result<Self> {
        let eraser = crate::kafka::producer_config(&s.kafka)
            .create_with_context::<_, FutureProducer<Quiet>>(Quiet)
            .ok()
            .map(Arc::new);
        Ok(AppState {
            rt,
            stores: Arc::new((0..4).map(|_| stores.make()).collect()),
            next: Arc::new(AtomicUsize::new(0)),
            token: s.http.auth_token.as_deref().map(digest),
            eraser,
            crm_topic: s.kafka.topics.crm.clone(),
            crm_format: s.kafka.formats.crm,
            crm_registry: registry.filter(|_| s.kafka.formats.crm == Format::AvroRegistry),
            crm_schema_id: Arc::default(),
        })
    }

    fn store(&self) -> Arc<dyn Store> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.stores.len();
        Arc::clone(&self.stores[i])
    }

    fn engine(&self) -> &Engine {
        &self.rt.engine
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A lead as served by `GET /v1/leads/{id}`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, ToSchema)]
pub struct LeadView {
    /// Lead id.
    pub lead_id: String,
    /// Total score, decayed to now.
    pub score: f64,
    /// Engagement, decayed to now.
    pub engagement: f64,
    /// Fit.
    pub fit: f64,
    /// Fit grade; null while no profile attribute is known (unknown fit).
    pub fit_grade: Option<String>,
    /// Profile attributes the fit rules use that are not known yet.
    pub missing_profile: Vec<String>,
    /// Visible segment.
    pub segment: String,
    /// Channels the lead opted out of.
    pub opted_out_channels: Vec<String>,
    /// First-touch source, if known.
    pub first_touch_source: Option<String>,
    /// First-touch campaign, if known.
    pub first_touch_campaign: Option<String>,
    /// Event time of the last event applied (RFC 3339).
    #[schema(format = DateTime)]
    pub last_event_at: Option<String>,
    /// The instant the scores are decayed to (RFC 3339, the request's time).
    #[schema(format = DateTime)]
    pub as_of: String,
    /// Top contributing signals now.
    pub top_signals: Vec<SignalOut>,
    /// Rules version.
    pub rules_version: String,
}

/// Every error answer.
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    /// What went wrong.
    error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// The OpenAPI document's fixed parts; the paths come from the routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "leadscore",
        description = "Lead lookups, explanations and erasure, plus the operational endpoints. \
            `/v1/*` requires `Authorization: Bearer <token>` when `http.auth_token` is set; \
            `/metrics`, `/healthz`, `/readyz` and `/openapi.json` stay open.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "leads", description = "Leads' scores, explanations and erasure"),
        (name = "operations", description = "Metrics, liveness, readiness")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(utoipa::openapi::Components::new)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

/// The routes with their OpenAPI description, open and under `/v1`; the
/// document is built from the same lists that route requests, so it cannot
/// miss one.
fn api() -> (OpenApiRouter<AppState>, OpenApiRouter<AppState>) {
    let open = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(metrics))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi_json));
    let v1 = OpenApiRouter::new()
        .routes(routes!(lead, erase))
        .routes(routes!(explain));
    (open, v1)
}

/// The OpenAPI document served at `/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let (open, v1) = api();
    let mut doc = open.into_openapi();
    doc.merge(v1.into_openapi());
    doc
}

/// The router.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let (open, v1) = api();
    let (open, mut doc) = open.split_for_parts();
    let (v1, v1_doc) = v1.split_for_parts();
    doc.merge(v1_doc);
    let doc = Arc::new(doc.to_pretty_json().unwrap_or_default());
    open.merge(v1.route_layer(middleware::from_fn_with_state(state.clone(), authorize)))
        .layer(axum::Extension(OpenApiJson(doc)))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::map_response(method_not_allowed))
        .layer(middleware::from_fn_with_state(request_timeout, time_limit))
        .with_state(state)
}

/// The router's 405 (its `Allow` header kept) with the API's JSON error body
/// instead of an empty one.
async fn method_not_allowed(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let allowed = allow
        .as_ref()
        .and_then(|a| a.to_str().ok())
        .map_or(String::new(), |a| format!(" (allowed: {a})"));
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed{allowed}"),
    );
    if let Some(a) = allow {
        r.headers_mut().insert(header::ALLOW, a);
    }
    r
}

/// A lead id from the path; one that cannot be read (not UTF-8) gets the
/// API's JSON error, not the router's plain-text one.
struct LeadId(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for LeadId {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| LeadId(id))
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))
    }
}

#[derive(Clone)]
struct OpenApiJson(Arc<String>);

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")))]
async fn openapi_json(axum::Extension(OpenApiJson(doc)): axum::Extension<OpenApiJson>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.as_str().to_owned(),
    )
        .into_response()
}

async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "request timed out"),
    }
}

async fn authorize(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(want) = &s.token else {
        return next.run(req).await;
    };
    // The scheme's name is case-insensitive (RFC 9110, 11.1).
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| digest(token.trim()));
    let (why, challenge) = match given {
        // Digests of equal length, compared in constant time.
        Some(d) if bool::from(d.ct_eq(want)) => return next.run(req).await,
        Some(_) => (
            "the bearer token is not valid",
            r#"Bearer error="invalid_token""#,
        ),
        None => (
            "a bearer token is required (Authorization: Bearer …)",
            "Bearer",
        ),
    };
    let mut r = error(StatusCode::UNAUTHORIZED, why);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(challenge),
    );
    r
}

/// Serves until `cancel` fires, with hyper's limits (see the module doc).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cfg: HttpSettings,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = router(state, Duration::from_millis(cfg.request_timeout_ms));
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms))
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = cancel.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "Cannot accept an HTTP connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => break,
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(3)) => {}
    }
    Ok(())
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Every metric, counters with known labels from zero", content_type = "text/plain")))]
async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.rt.metrics.render(),
    )
        .into_response()
}

/// Liveness: the consumer loop turned within the last minute.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses(
    (status = 200, description = "Alive", body = String, content_type = "text/plain"),
    (status = 503, description = "The consumer loop stalled", body = ErrorBody)))]
async fn healthz(State(s): State<AppState>) -> Response {
    if s.rt.health.alive(Duration::from_secs(60)) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "consumer loop stalled")
    }
}

/// Readiness: consuming, with Redis (and the Schema Registry, if used) answering.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready", body = String, content_type = "text/plain"),
    (status = 503, description = "Not ready, and why", body = ErrorBody)))]
async fn readyz(State(s): State<AppState>) -> Response {
    let why = s.rt.health.not_ready();
    if why.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else if let Some(f) = s.rt.fatal() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: stopping on an error: {f}"),
        )
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", why.join("; ")),
        )
    }
}

/// The view of a lead's state at `at` (never before its clock).
pub fn view(engine: &Engine, id: &str, state: &LeadState, at: i64) -> LeadView {
    let at = at.max(state.as_of);
    let scores = engine.scores_at(state, at);
    let rules = engine.rules();
    let opted: Vec<u8> = state
        .channels
        .iter()
        .filter(|c| c.opted_out)
        .map(|c| c.channel)
        .collect();
    LeadView {
        lead_id: id.to_owned(),
        score: published(scores.total),
        engagement: published(scores.engagement),
        fit: published(scores.fit),
        fit_grade: scores.grade.map(|g| g.as_str().to_owned()),
        missing_profile: engine.missing_profile(state),
        segment: Segment::of(state).name(rules).to_owned(),
        opted_out_channels: engine.opted_out_names(&opted),
        first_touch_source: state.first_touch.as_ref().map(|f| f.source.clone()),
        first_touch_campaign: state.first_touch.as_ref().and_then(|f| f.campaign.clone()),
        last_event_at: (state.last_event_at != i64::MIN)
            .then(|| format_rfc3339(state.last_event_at)),
        as_of: format_rfc3339(at),
        top_signals: engine
            .top_signals(state, at)
            .into_iter()
            .map(|s| SignalOut {
                rule: s.rule,
                points: published(s.points),
                last_at: format_rfc3339(s.last_at),
                count: s.count,
            })
            .collect(),
        rules_version: rules.version.clone(),
    }
}

// Its error is the response sent as is, like every handler's; once per request.
#[allow(clippy::result_large_err)]
fn check_id(id: &str) -> Result<(), Response> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("lead id must be 1..={MAX_ID_LEN} bytes"),
        ));
    }
    Ok(())
}

/// A lead's state: from this instance's memory if a shard here holds it,
/// else from the first shard in the store that does.
async fn locate(s: &AppState, id: &str) -> Result<Option<LeadState>, Response> {
    let key = LeadKey::lead(id);
    let engine = s.engine();
    for cache in s.rt.caches.read().values() {
        if let Some(blob) = cache.lock().peek(&key) {
            return Ok(engine.decode(&blob).ok());
        }
    }
    let all: Vec<ShardId> = (0..s.rt.partitions()).collect();
    let store = s.store();
    let result = tokio::task::spawn_blocking(move || store.find(&key, &all)).await;
    match result {
        Ok(Ok(hits)) => Ok(hits
            .into_iter()
            .find_map(|(_, bytes)| engine.decode(&bytes).ok())),
        Ok(Err(e)) => {
            s.rt.metrics.redis_errors.with_label_values(&["http"]).inc();
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("state store unavailable: {e}"),
            ))
        }
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn find(s: &AppState, id: &str) -> Result<LeadState, Response> {
    check_id(id)?;
    match locate(s, id).await? {
        Some(state) if !state.is_new() && state.kind == Kind::Lead => Ok(state),
        _ => Err(error(StatusCode::NOT_FOUND, "unknown lead")),
    }
}

/// A lead's scores, segment and top signals, decayed to now.
#[utoipa::path(get, path = "/v1/leads/{id}", tag = "leads", params(("id" = String, Path, description = "The lead id (1 to 256 bytes)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The lead", body = LeadView),
        (status = 400, description = "Bad lead id", body = ErrorBody),
        (status = 401, description = "A bearer token is required", body = ErrorBody),
        (status = 404, description = "Unknown lead (or only an anonymous visitor)", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody)))]
async fn lead(State(s): State<AppState>, LeadId(id): LeadId) -> Response {
    match find(&s, &id).await {
        Ok(state) => Json(view(s.engine(), &id, &state, wall_clock_ms())).into_response(),
        Err(response) => response,
    }
}

/// Why a lead has its score: the remembered contributions then and now,
/// caps in force, the fit breakdown and the segment history; the parts add
/// up to the score.
#[utoipa::path(get, path = "/v1/leads/{id}/explain", tag = "leads", params(("id" = String, Path, description = "The lead id (1 to 256 bytes)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The explanation", body = ExplainView),
        (status = 400, description = "Bad lead id", body = ErrorBody),
        (status = 401, description = "A bearer token is required", body = ErrorBody),
        (status = 404, description = "Unknown lead", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody)))]
async fn explain(State(s): State<AppState>, LeadId(id): LeadId) -> Response {
    match find(&s, &id).await {
        Ok(state) => {
            let x = s.engine().explain(&state, wall_clock_ms());
            Json(ExplainView::new(s.engine(), &id, &x)).into_response()
        }
        Err(response) => response,
    }
}

/// The registry id of leadscore's CRM schema under `<crm topic>-value`
/// (registered, or found if already there), to frame erasure requests the
/// way every other message on an `avro-registry` topic is framed.
async fn crm_schema_id(s: &AppState) -> Result<u32, Response> {
    if let Some(id) = s.crm_schema_id.get() {
        return Ok(*id);
    }
    let Some(registry) = s.crm_registry.clone() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the CRM topic is avro-registry but no schema registry is configured",
        ));
    };
    let subject = format!("{}-value", s.crm_topic);
    let found = tokio::task::spawn_blocking(move || {
        registry.register(&subject, input_schema_text(Source::Crm))
    })
    .await;
    match found {
        Ok(Ok(id)) => Ok(*s.crm_schema_id.get_or_init(|| id)),
        Ok(Err(e)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot register the CRM schema for the erasure request: {e}"),
        )),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// `DELETE /v1/leads/{id}`: erases a person. The request goes through the CRM
/// topic (an `erasure_requested` event, to every partition), so each shard
/// applies it in order, whichever member owns it: one that holds the lead
/// removes it and its linked anonymous ids from memory, Redis and the
/// timers, and remembers the erasure. Never lost across restarts; needs
/// no Redis. Answers 202 once the broker has every copy of the request.
#[utoipa::path(delete, path = "/v1/leads/{id}", tag = "leads", params(("id" = String, Path, description = "The lead id (1 to 256 bytes)")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The erasure request is on the CRM topic", body = ErasureAccepted),
        (status = 400, description = "Bad lead id", body = ErrorBody),
        (status = 401, description = "A bearer token is required", body = ErrorBody),
        (status = 503, description = "The broker unavailable (or, for an avro-registry CRM topic, the Schema Registry); some partitions may have the request already: send it again", body = ErrorBody)))]
async fn erase(State(s): State<AppState>, LeadId(id): LeadId) -> Response {
    if let Err(r) = check_id(&id) {
        return r;
    }
    let Some(producer) = s.eraser.clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no producer for erasure requests",
        );
    };
    let event_id = format!("erasure-{}", uuid::Uuid::new_v4());
    let event = Event {
        event_id: event_id.clone().into(),
        lead_id: Some(id.clone().into()),
        anonymous_id: None,
        occurred_at: wall_clock_ms(),
        source: Source::Crm,
        kind: EventType::ErasureRequested,
        channel: None,
        attributes: Vec::new(),
    };
    let payload = match s.crm_format {
        Format::Json => serde_json::json!({
            "event_id": event_id, "lead_id": id, "occurred_at": format_rfc3339(event.occurred_at), "type": "erasure_requested",
        })
        .to_string()
        .into_bytes(),
        format => match encode_avro(&input_schema(Source::Crm), &event) {
            Ok(datum) if format == Format::AvroRegistry => match crm_schema_id(&s).await {
                Ok(id) => frame(id, &datum),
                Err(r) => return r,
            },
            Ok(datum) => datum,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
    };
    // Every partition: a lead whose events reached several has a state in
    // each, and only each shard's owner knows whether its shard holds one
    // (this member's memory and Redis can both be behind it). A shard that
    // holds nothing of the lead drops the request.
    let targets: Vec<Option<i32>> = match s.rt.partitions() {
        0 => vec![None],
        n => (0..n).map(Some).collect(),
    };
    let unavailable = |e: &dyn std::fmt::Display| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "cannot queue the erasure request: {e}; it may have reached some partitions \
                 already: send it again (an erasure is idempotent)"
            ),
        )
    };
    // Every copy is queued before any acknowledgement is awaited: the
    // request takes one broker round trip, not one per partition.
    let mut deliveries = Vec::with_capacity(targets.len());
    for partition in &targets {
        let mut record = FutureRecord::to(&s.crm_topic)
            .key(id.as_bytes())
            .payload(&payload);
        if let Some(p) = partition {
            record = record.partition(*p);
        }
        match producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => return unavailable(&e),
        }
    }
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return unavailable(&e),
            Err(_) => return unavailable(&"the producer stopped"),
        }
    }
    (
        StatusCode::ACCEPTED,
        Json(ErasureAccepted {
            erasure_event_id: event_id,
            lead_id: id,
            partitions: targets.iter().flatten().copied().collect(),
        }),
    )
        .into_response()
}

/// The answer to an erasure request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErasureAccepted {
    /// Id of the `erasure_requested` event produced to the CRM topic.
    pub erasure_event_id: String,
    /// The lead.
    pub lead_id: String,
    /// CRM partitions the request went to: every one (empty: the partition
    /// count was not known yet, and the request was keyed by the lead id).
    pub partitions: Vec<i32>,
}

/// `GET /v1/leads/{id}/explain`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExplainView {
    /// Lead id.
    pub lead_id: String,
    /// The instant explained (RFC 3339).
    #[schema(format = DateTime)]
    pub as_of: String,
    /// Total score.
    pub score: f64,
    /// Engagement.
    pub engagement: f64,
    /// Fit.
    pub fit: f64,
    /// Fit grade; null while fit is unknown.
    pub fit_grade: Option<String>,
    /// Visible segment.
    pub segment: String,
    /// Remembered contributions, oldest first.
    pub contributions: Vec<ContributionView>,
    /// Per rule, what its contributions before the remembered window are worth now.
    pub earlier_contributions: Vec<EarlierView>,
    /// Engagement no rule accounts for (the floor at zero, rounding).
    pub adjustment: f64,
    /// Caps in force.
    pub caps: Vec<CapView>,
    /// Fit points by rule.
    pub fit_breakdown: Vec<FitView>,
    /// Recent segment transitions.
    pub segment_history: Vec<TransitionView>,
    /// Rules version.
    pub rules_version: String,
}

/// One counted event.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContributionView {
    /// Rule name.
    pub rule: String,
    /// Input event id.
    pub event_id: String,
    /// Event time (RFC 3339).
    #[schema(format = DateTime)]
    pub occurred_at: String,
    /// Points when it counted (after any cap).
    pub points_then: f64,
    /// The same points decayed to `as_of`.
    pub points_now: f64,
    /// Whether a cap cut it.
    pub capped: bool,
}

/// Older contributions of one rule.
#[derive(Debug, Serialize, ToSchema)]
pub struct EarlierView {
    /// Rule name.
    pub rule: String,
    /// What they are worth now.
    pub points_now: f64,
}

/// A cap in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct CapView {
    /// Rule name.
    pub rule: String,
    /// Window start (RFC 3339).
    #[schema(format = DateTime)]
    pub window_start: String,
    /// Window end, exclusive (RFC 3339).
    #[schema(format = DateTime)]
    pub window_end: String,
    /// Matches counted in the window.
    pub matches: u32,
    /// Absolute points counted in the window.
    pub points: f64,
    /// The rule's limit on matches.
    pub max_matches: Option<u32>,
    /// The rule's limit on points.
    pub max_points: Option<f64>,
}

/// Fit points of one rule.
#[derive(Debug, Serialize, ToSchema)]
pub struct FitView {
    /// Rule name.
    pub rule: String,
    /// Points.
    pub points: f64,
}

/// A segment transition.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransitionView {
    /// Segment before.
    pub from: String,
    /// Segment after.
    pub to: String,
    /// `event`, `decay`, `lifecycle`, `frequency_cap` or `opt_out`.
    pub reason: String,
    /// When (RFC 3339).
    #[schema(format = DateTime)]
    pub at: String,
}

impl ExplainView {
    /// The served form of an explanation.
    pub fn new(engine: &Engine, id: &str, x: &Explanation) -> Self {
        let rules = engine.rules();
        ExplainView {
            lead_id: id.to_owned(),
            as_of: format_rfc3339(x.at),
            score: x.scores.total,
            engagement: x.scores.engagement,
            fit: x.scores.fit,
            fit_grade: x.scores.grade.map(|g| g.as_str().to_owned()),
            segment: x.segment.name(rules).to_owned(),
            contributions: x
                .contributions
                .iter()
                .map(|c| ContributionView {
                    rule: c.rule.clone(),
                    event_id: c.event_id.clone(),
                    occurred_at: format_rfc3339(c.at),
                    points_then: c.points_then,
                    points_now: c.points_now,
                    capped: c.capped,
                })
                .collect(),
            earlier_contributions: x
                .earlier
                .iter()
                .map(|(rule, now)| EarlierView {
                    rule: rule.clone(),
                    points_now: *now,
                })
                .collect(),
            adjustment: x.adjustment,
            caps: x
                .caps
                .iter()
                .map(|c| CapView {
                    rule: c.rule.clone(),
                    window_start: format_rfc3339(c.window_start),
                    window_end: format_rfc3339(c.window_end),
                    matches: c.matches,
                    points: c.points,
                    max_matches: c.max_matches,
                    max_points: c.max_points,
                })
                .collect(),
            fit_breakdown: x
                .fit
                .iter()
                .map(|(rule, points)| FitView {
                    rule: rule.clone(),
                    points: *points,
                })
                .collect(),
            segment_history: x
                .history
                .iter()
                .map(|(from, to, reason, at)| TransitionView {
                    from: from.name(rules).to_owned(),
                    to: to.name(rules).to_owned(),
                    reason: reason.as_str().to_owned(),
                    at: format_rfc3339(*at),
                })
                .collect(),
            rules_version: rules.version.clone(),
        }
    }
}
