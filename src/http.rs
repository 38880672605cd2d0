//! The HTTP surface: `/metrics`, `/healthz`, `/readyz` and `GET /v1/leads/{id}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, LeadState, Segment};
use crate::event::{MAX_ID_LEN, format_rfc3339};
use crate::kafka::consumer::Health;
use crate::metrics::Metrics;
use crate::output::SignalOut;
use crate::pipeline::LeadMap;
use crate::store::Store;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Leads in memory.
    pub leads: Arc<LeadMap>,
    /// The engine (rules) for decaying to now.
    pub engine: Engine,
    /// Store for leads not in memory.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Metrics,
    /// Health of the consumer.
    pub health: Arc<Health>,
}

/// A lead as served by `GET /v1/leads/{id}`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct LeadView {
    /// Lead id.
    pub lead_id: String,
    /// Total score, decayed to now.
    pub score: f64,
    /// Engagement, decayed to now.
    pub engagement: f64,
    /// Fit.
    pub fit: f64,
    /// Fit grade.
    pub fit_grade: String,
    /// Visible segment.
    pub segment: String,
    /// Event time of the last event applied.
    pub last_event_at: Option<String>,
    /// The instant the scores are decayed to.
    pub as_of: String,
    /// Top contributing signals now.
    pub top_signals: Vec<SignalOut>,
    /// Rules version.
    pub rules_version: String,
}

#[derive(Serialize)]
struct ErrorBody {
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

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/leads/{id}", get(lead))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

/// Serves until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(s): State<AppState>) -> Response {
    if s.health.alive(Duration::from_secs(60)) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "consumer loop stalled")
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.health.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: consumer not running or state store unavailable",
        )
    }
}

/// The view of a lead's state at `at` (never before its last event).
pub fn view(engine: &Engine, id: &str, state: &LeadState, at: i64) -> LeadView {
    let at = at.max(state.as_of);
    let scores = engine.scores_at(state, at);
    let rules = engine.rules();
    LeadView {
        lead_id: id.to_owned(),
        score: scores.total,
        engagement: scores.engagement,
        fit: scores.fit,
        fit_grade: scores.grade.as_str().to_owned(),
        segment: Segment::of(state).name(rules).to_owned(),
        last_event_at: (state.last_event_at != i64::MIN)
            .then(|| format_rfc3339(state.last_event_at)),
        as_of: format_rfc3339(at),
        top_signals: engine
            .top_signals(state, at)
            .into_iter()
            .map(|s| SignalOut {
                rule: s.rule,
                points: s.points,
                last_at: format_rfc3339(s.last_at),
                count: s.count,
            })
            .collect(),
        rules_version: rules.version.clone(),
    }
}

async fn lead(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return error(
            StatusCode::BAD_REQUEST,
            format!("lead id must be 1..={MAX_ID_LEN} bytes"),
        );
    }
    let in_memory = s.leads.get(id.as_str()).map(|l| l.state.clone());
    let state = match in_memory {
        Some(state) => state,
        None => {
            let store = Arc::clone(&s.store);
            let key = id.clone();
            let loaded = tokio::task::spawn_blocking(move || store.load(&[key.as_str()])).await;
            match loaded {
                Ok(Ok(mut v)) => match v.pop().flatten() {
                    Some(bytes) => match s.engine.decode(&bytes) {
                        Ok(state) => state,
                        Err(e) => {
                            return error(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!("stored state unreadable: {e}"),
                            );
                        }
                    },
                    None => return error(StatusCode::NOT_FOUND, "unknown lead"),
                },
                Ok(Err(e)) => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("state store unavailable: {e}"),
                    );
                }
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
    };
    if state.is_new() {
        return error(StatusCode::NOT_FOUND, "unknown lead");
    }
    Json(view(&s.engine, &id, &state, crate::event::wall_clock_ms())).into_response()
}
