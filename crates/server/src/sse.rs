//! Server-sent events and the bridge from the engine thread to async handlers.
//!
//! Each HTTP request gets a Tokio channel; the engine writes [`RequestEvent`]s into it through a
//! [`TokioSink`] (never blocking the engine thread). The handler's [`Submitted`] owns the
//! receiving end and a [`CancelGuard`]: if the handler or the SSE body is dropped before the
//! request finished — the client went away — the guard cancels the request in the engine, which
//! frees its KV blocks at once. (The engine also notices the closed channel by itself.)

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use gptoss_engine::engine::{EngineHandle, EventSink};
use gptoss_engine::request::{RequestEvent, RequestId};
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::errors::ApiError;

/// Delivers the events of prompt `index` of an HTTP request into its channel.
pub struct TokioSink {
    /// The channel.
    pub tx: UnboundedSender<(usize, RequestEvent)>,
    /// Which prompt of the HTTP request.
    pub index: usize,
}

impl EventSink for TokioSink {
    fn send(&mut self, event: RequestEvent) -> bool {
        self.tx.send((self.index, event)).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Cancels engine requests when dropped, unless disarmed.
pub struct CancelGuard {
    engine: EngineHandle,
    ids: Vec<RequestId>,
    armed: bool,
}

impl CancelGuard {
    /// Guards `ids`.
    pub fn new(engine: EngineHandle, ids: Vec<RequestId>) -> Self {
        CancelGuard {
            engine,
            ids,
            armed: true,
        }
    }

    /// Guards one more request.
    pub fn push(&mut self, id: RequestId) {
        self.ids.push(id);
    }

    /// The requests finished: nothing to cancel.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            for &id in &self.ids {
                self.engine.cancel(id);
            }
        }
    }
}

/// Requests submitted for one HTTP request: their events and the guard.
pub struct Submitted {
    /// `(prompt index, event)`.
    pub rx: UnboundedReceiver<(usize, RequestEvent)>,
    /// Cancels on drop.
    pub guard: CancelGuard,
    /// Number of engine requests (prompts).
    pub prompts: usize,
}

/// `data: {json}\n\n`.
pub fn data_frame(value: &impl Serialize) -> Bytes {
    let mut s = String::from("data: ");
    s.push_str(&serde_json::to_string(value).expect("serialisable"));
    s.push_str("\n\n");
    Bytes::from(s)
}

/// `event: NAME\ndata: {json}\n\n`.
pub fn event_frame(event: &str, value: &impl Serialize) -> Bytes {
    let mut s = format!("event: {event}\ndata: ");
    s.push_str(&serde_json::to_string(value).expect("serialisable"));
    s.push_str("\n\n");
    Bytes::from(s)
}

/// `data: [DONE]\n\n`.
pub fn done_frame() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// The end of a stream of `data:` chunks that failed: the error's body, then `[DONE]`.
pub fn error_frames(error: ApiError, out: &mut Vec<Bytes>) {
    out.push(data_frame(&error.body()));
    out.push(done_frame());
}

/// Turns engine events into SSE frames for one endpoint.
pub trait StreamConverter: Send + 'static {
    /// Handles one event, appending frames; returns true once the response is complete.
    fn on_event(&mut self, index: usize, event: RequestEvent, out: &mut Vec<Bytes>) -> bool;
    /// The engine went away before the end.
    fn on_abort(&mut self, out: &mut Vec<Bytes>);
}

struct StreamState<C> {
    sub: Submitted,
    conv: C,
    pending: std::collections::VecDeque<Bytes>,
    finished: bool,
}

/// An SSE response: `initial` frames, then the converter's frames until it reports completion.
pub fn sse_response<C: StreamConverter>(sub: Submitted, conv: C, initial: Vec<Bytes>) -> Response {
    let state = StreamState {
        sub,
        conv,
        pending: initial.into(),
        finished: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(frame) = st.pending.pop_front() {
                return Some((Ok::<Bytes, Infallible>(frame), st));
            }
            if st.finished {
                return None;
            }
            let mut out = Vec::new();
            match st.sub.rx.recv().await {
                Some((index, ev)) => {
                    if st.conv.on_event(index, ev, &mut out) {
                        st.finished = true;
                        st.sub.guard.disarm();
                    }
                }
                None => {
                    st.conv.on_abort(&mut out);
                    st.finished = true;
                }
            }
            st.pending.extend(out);
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
