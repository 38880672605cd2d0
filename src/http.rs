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

use crate::engine::explain::Explanation;
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
        .route("/v1/leads/{id}/explain", get(explain))
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

/// The lead's state: from memory, else from the store.
async fn find(s: &AppState, id: &str) -> Result<LeadState, Response> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("lead id must be 1..={MAX_ID_LEN} bytes"),
        ));
    }
    let in_memory = s.leads.get(id).map(|l| l.state.clone());
    let state = match in_memory {
        Some(state) => state,
        None => {
            let store = Arc::clone(&s.store);
            let key = id.to_owned();
            let loaded = tokio::task::spawn_blocking(move || store.load(&[key.as_str()])).await;
            match loaded {
                Ok(Ok(mut v)) => match v.pop().flatten() {
                    Some(bytes) => s.engine.decode(&bytes).map_err(|e| {
                        error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("stored state unreadable: {e}"),
                        )
                    })?,
                    None => return Err(error(StatusCode::NOT_FOUND, "unknown lead")),
                },
                Ok(Err(e)) => {
                    return Err(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("state store unavailable: {e}"),
                    ));
                }
                Err(e) => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            }
        }
    };
    if state.is_new() {
        return Err(error(StatusCode::NOT_FOUND, "unknown lead"));
    }
    Ok(state)
}

async fn lead(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match find(&s, &id).await {
        Ok(state) => {
            Json(view(&s.engine, &id, &state, crate::event::wall_clock_ms())).into_response()
        }
        Err(response) => response,
    }
}

async fn explain(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match find(&s, &id).await {
        Ok(state) => {
            let x = s.engine.explain(&state, crate::event::wall_clock_ms());
            Json(explain_view(&s.engine, &id, &x)).into_response()
        }
        Err(response) => response,
    }
}

/// The JSON form of an explanation.
pub fn explain_view(engine: &Engine, id: &str, x: &Explanation) -> serde_json::Value {
    let rules = engine.rules();
    serde_json::json!({
        "lead_id": id,
        "as_of": format_rfc3339(x.at),
        "score": x.scores.total,
        "engagement": x.scores.engagement,
        "fit": x.scores.fit,
        "fit_grade": x.scores.grade.as_str(),
        "segment": x.segment.name(rules),
        "contributions": x.contributions.iter().map(|c| serde_json::json!({
            "rule": c.rule,
            "event_id": c.event_id,
            "occurred_at": format_rfc3339(c.at),
            "points_then": c.points_then,
            "points_now": c.points_now,
            "capped": c.capped,
        })).collect::<Vec<_>>(),
        "earlier_contributions": x.earlier.iter().map(|(rule, now)| serde_json::json!({
            "rule": rule, "points_now": now,
        })).collect::<Vec<_>>(),
        "adjustment": x.adjustment,
        "caps": x.caps.iter().map(|c| serde_json::json!({
            "rule": c.rule,
            "window_start": format_rfc3339(c.window_start),
            "window_end": format_rfc3339(c.window_end),
            "matches": c.matches,
            "points": c.points,
            "max_matches": c.max_matches,
            "max_points": c.max_points,
        })).collect::<Vec<_>>(),
        "fit_breakdown": x.fit.iter().map(|(rule, p)| serde_json::json!({"rule": rule, "points": p})).collect::<Vec<_>>(),
        "segment_history": x.history.iter().map(|(from, to, reason, at)| serde_json::json!({
            "from": from.name(rules), "to": to.name(rules), "reason": reason.as_str(), "at": format_rfc3339(*at),
        })).collect::<Vec<_>>(),
        "rules_version": rules.version,
    })
}
