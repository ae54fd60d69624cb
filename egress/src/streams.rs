//! The rider streams: each rider's pushed messages (offers, withdrawals,
//! grab results, assignments) over a WebSocket or SSE, read from the
//! rider's ring in the view from a `seq` on, so a client resumes where it
//! left off (`?after=SEQ`, or `Last-Event-ID`). A client resuming from a
//! seq the ring no longer keeps first gets a `gap` message naming the first
//! seq it can have, never a silent skip.

use crate::state::EgressState;
use crate::view::{Egress, RiderMessage};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::Response;
use futures_util::stream::Stream;
use grabflow_api::Id;
use grabflow_http::auth::{Claims, Role};
use grabflow_http::extract::{self as wire, QueryParams};
use grabflow_http::ApiError;
use serde::Deserialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// `?after=SEQ` (and `access_token` for clients that cannot set headers).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Resume after this seq.
    pub after: Option<u64>,
    /// A token, for clients that cannot send `Authorization`.
    pub access_token: Option<String>,
}

/// The claims of a stream's token: the `Authorization` header's, else the
/// `access_token` query parameter's (browsers' `EventSource` cannot set
/// headers).
pub(crate) fn stream_claims(
    s: &EgressState,
    headers: &HeaderMap,
    access_token: Option<&str>,
) -> Result<Claims, ApiError> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = from_header
        .or(access_token)
        .ok_or_else(|| ApiError::unauthorized("send a bearer token"))?;
    s.secret
        .verify(token.trim())
        .ok_or_else(|| ApiError::unauthorized("the token is not valid"))
}

fn stream_auth(
    s: &EgressState,
    headers: &HeaderMap,
    q: &StreamQuery,
    rider: &Id,
) -> Result<(), ApiError> {
    stream_claims(s, headers, q.access_token.as_deref())?.require(&[Role::Rider], Some(rider))
}

fn resume_point(headers: &HeaderMap, q: &StreamQuery) -> u64 {
    q.after
        .or_else(|| {
            headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The rider's messages over a WebSocket.
#[utoipa::path(get, path = "/v1/riders/{rider_id}/ws", params(("rider_id" = String, Path), ("after" = Option<u64>, Query)),
    responses((status = 101, description = "Switching to WebSocket: one `RiderMessage` per text frame, in `seq` order", body = crate::view::RiderMessage),
        (status = 426, description = "`upgrade_required`: not a WebSocket handshake", body = grabflow_http::error::ErrorBody)),
    security(("bearer" = []), ("access_token" = [])))]
pub async fn rider_ws(
    State(s): State<EgressState>,
    Path(rider_id): Path<String>,
    QueryParams(q): QueryParams<StreamQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let rider = wire::id(&rider_id, "rider_id")?;
    stream_auth(&s, &headers, &q, &rider)?;
    let ws = ws.map_err(|e| ApiError::upgrade_required(e.body_text()))?;
    let after = resume_point(&headers, &q);
    Ok(ws.on_upgrade(move |socket| pump_ws(socket, s.egress, rider, after)))
}

async fn pump_ws(mut socket: WebSocket, egress: Arc<Egress>, rider: Id, mut cursor: u64) {
    let notify = egress.notifier(&rider);
    loop {
        let wait = notify.notified();
        tokio::pin!(wait);
        wait.as_mut().enable();
        let resume = egress.messages_after(&rider, cursor);
        if let Some(first_seq) = resume.gap {
            if socket
                .send(Message::Text(gap(first_seq).into()))
                .await
                .is_err()
            {
                return;
            }
            cursor = first_seq - 1;
        }
        for (seq, text) in resume.messages {
            if socket
                .send(Message::Text(text.as_ref().into()))
                .await
                .is_err()
            {
                return;
            }
            cursor = seq;
        }
        tokio::select! {
            _ = &mut wait => {}
            _ = egress.closed() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The rider's messages as Server-Sent Events (`id` is the seq).
#[utoipa::path(get, path = "/v1/riders/{rider_id}/stream", params(("rider_id" = String, Path), ("after" = Option<u64>, Query)),
    responses((status = 200, description = "Server-Sent Events: `id` is the seq, `data` one `RiderMessage`", body = crate::view::RiderMessage, content_type = "text/event-stream")),
    security(("bearer" = []), ("access_token" = [])))]
pub async fn rider_sse(
    State(s): State<EgressState>,
    Path(rider_id): Path<String>,
    QueryParams(q): QueryParams<StreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    let rider = wire::id(&rider_id, "rider_id")?;
    stream_auth(&s, &headers, &q, &rider)?;
    let cursor = resume_point(&headers, &q);
    let notify = s.egress.notifier(&rider);
    let init = (
        s.egress,
        rider,
        cursor,
        VecDeque::<(u64, Arc<str>)>::new(),
        notify,
    );
    let stream = futures_util::stream::unfold(
        init,
        |(egress, rider, mut cursor, mut queue, notify)| async move {
            loop {
                if let Some((seq, text)) = queue.pop_front() {
                    cursor = seq;
                    let event = SseEvent::default().id(seq.to_string()).data(text.as_ref());
                    return Some((Ok(event), (egress, rider, cursor, queue, notify)));
                }
                let wait = notify.notified();
                tokio::pin!(wait);
                wait.as_mut().enable();
                let resume = egress.messages_after(&rider, cursor);
                if let Some(first_seq) = resume.gap {
                    // Its id resumes from the first seq the client can have.
                    queue.push_back((first_seq - 1, Arc::from(gap(first_seq))));
                    queue.extend(resume.messages);
                } else if resume.messages.is_empty() {
                    tokio::select! {
                        _ = wait => {}
                        _ = egress.closed() => return None,
                    }
                } else {
                    queue.extend(resume.messages);
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The text of a [`RiderMessage::Gap`]: the messages before `first_seq`
/// after the client's seq are gone.
fn gap(first_seq: u64) -> String {
    serde_json::to_string(&RiderMessage::Gap { first_seq }).expect("messages serialize")
}
