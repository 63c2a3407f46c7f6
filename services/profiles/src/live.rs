//! Live profile changes: `GET /v1/profiles/{id}/changes` is a server-sent event stream
//! with one `changed` event each time the profile (or one merged into it) is committed
//! with a change, so a screen showing it can read it again at once instead of polling.
//!
//! The processor notes the profiles a batch touches ([`Changes::touch`]); the runner
//! calls [`Changes::committed`] once the batch's state is in RocksDB, so a reader woken
//! by an event reads the new state. Each open stream filters the instance's broadcast of
//! changed ids; a stream that falls behind is told `changed` once (it reads the profile
//! anyway).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::json;
use tokio::sync::broadcast;

use tessera_common::admin::error;
use tessera_common::store::SharedStore;

use crate::state::{Changes, live_id};

#[derive(Clone)]
pub struct LiveState {
    pub store: SharedStore,
    pub changes: Changes,
    pub placement: crate::state::Placement,
}

/// The stream of a profile's changes (by any id it had: a merged-away id follows its
/// survivor). The first event, `ready`, names the live profile id.
pub async fn changes(State(st): State<LiveState>, Path(id): Path<String>) -> Response {
    // Another instance's profile: its peers' gatherer finds the one that serves it.
    if !st.placement.serves(&id) {
        return error(StatusCode::NOT_FOUND, "not_found", "no such profile here");
    }
    let rx = st.changes.subscribe();
    let store = st.store.clone();
    let resolve = move |id: String| {
        let store = store.clone();
        async move {
            tokio::task::spawn_blocking(move || live_id(|k| store.get(k), &id).ok())
                .await
                .ok()
                .flatten()
        }
    };
    let Some(live) = resolve(id.clone()).await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the state store cannot be read",
        );
    };
    if !st.placement.serves(&live) {
        return crate::api::elsewhere(&live);
    }
    let placement = st.placement.clone();
    // A merge that moves the profile to another instance ends the stream: the client
    // reconnects (EventSource does by itself) and is sent to that instance.
    let moved = move |live: &str| !placement.serves(live);
    Sse::new(stream(id, live, rx, resolve, moved))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn stream<F, Fut>(
    requested: String,
    live: String,
    rx: broadcast::Receiver<Arc<str>>,
    resolve: F,
    moved: impl Fn(&str) -> bool + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: Fn(String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send,
{
    let first = Event::default()
        .event("ready")
        .data(json!({ "profile_id": live }).to_string());
    let state = (requested, live, rx, resolve, moved, Some(first), false);
    futures::stream::unfold(
        state,
        |(requested, mut live, mut rx, resolve, moved, first, ended)| async move {
            if let Some(e) = first {
                return Some((Ok(e), (requested, live, rx, resolve, moved, None, false)));
            }
            if ended {
                return None;
            }
            loop {
                let changed = match rx.recv().await {
                    Ok(id) => *id == *live || *id == *requested,
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                if changed {
                    // A merge moves the profile: follow it.
                    if let Some(now) = resolve(requested.clone()).await {
                        live = now;
                    }
                    let e = Event::default()
                        .event("changed")
                        .data(json!({ "profile_id": live }).to_string());
                    let ended = moved(&live);
                    return Some((Ok(e), (requested, live, rx, resolve, moved, None, ended)));
                }
            }
        },
    )
}

pub fn routes(state: LiveState) -> axum::Router {
    axum::Router::new()
        .route("/v1/profiles/{id}/changes", axum::routing::get(changes))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_announced_only_after_commit_and_only_when_someone_listens() {
        let c = Changes::default();
        c.touch("p-1");
        c.take()();
        let mut rx = c.subscribe();
        c.touch("p-2");
        c.touch("p-2");
        let first = c.take();
        // The next batch is processed while the first one's outputs are acknowledged.
        c.touch("p-3");
        assert!(rx.try_recv().is_err(), "nothing before the commit");
        first();
        assert_eq!(&*rx.try_recv().unwrap(), "p-2");
        assert!(
            rx.try_recv().is_err(),
            "one announcement per profile per batch, and the next batch's only at its commit"
        );
        c.take()();
        assert_eq!(&*rx.try_recv().unwrap(), "p-3");
    }
}
