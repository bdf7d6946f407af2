//! The caller-side buffer: a bounded queue the hot path pushes into and the writer swaps out.
//!
//! `record` takes one uncontended-in-practice lock, pushes, and wakes the writer only when the
//! queue goes from empty to non-empty (or reaches a batch): no syscall per event. When the queue
//! is full the caller waits on a condition variable until the writer makes room (backpressure).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::{Notify, oneshot};

use super::error::StatsError;
use super::writer::PruneReport;
use crate::status::CallEvent;

/// What travels from callers to the writer, in order.
pub(crate) enum Msg {
    Event(CallEvent),
    /// Answered once every message queued before it is committed.
    Flush(oneshot::Sender<()>),
    /// Runs retention once every message queued before it is committed.
    Prune(oneshot::Sender<Result<PruneReport, StatsError>>),
}

struct State {
    items: Vec<Msg>,
    /// Events (not control messages) in `items`.
    events: usize,
    /// Set by `close`: the writer drains what is left, then stops.
    closing: Option<Instant>,
    /// Control messages waiting; the writer skips its linger while any is queued.
    urgent: bool,
    /// Events accepted since the collector opened.
    accepted: u64,
}

pub(crate) struct Queue {
    state: Mutex<State>,
    not_full: Condvar,
    wake_writer: Notify,
    capacity: usize,
    wake_at: usize,
    /// Times a caller had to wait for room.
    pub(crate) waits: AtomicU64,
    /// Events refused because the collector was closed.
    pub(crate) refused: AtomicU64,
}

impl Queue {
    pub(crate) fn new(capacity: usize, batch_size: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: Vec::with_capacity(capacity.min(8_192)),
                events: 0,
                closing: None,
                urgent: false,
                accepted: 0,
            }),
            not_full: Condvar::new(),
            wake_writer: Notify::new(),
            capacity,
            wake_at: batch_size.min(capacity).max(1),
            waits: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Queues one event, waiting while the queue is full. Returns the event if the collector
    /// is closed.
    pub(crate) fn push_event(&self, event: CallEvent) -> Result<(), CallEvent> {
        let mut st = self.state.lock();
        if st.events >= self.capacity && st.closing.is_none() {
            self.waits.fetch_add(1, Ordering::Relaxed);
            // The writer may be asleep in its linger: make sure it drains now.
            self.wake_writer.notify_one();
            while st.events >= self.capacity && st.closing.is_none() {
                self.not_full.wait_for(&mut st, Duration::from_millis(100));
            }
        }
        self.push_locked(st, event)
    }

    /// Queues one event unless the queue is full or closed.
    pub(crate) fn try_push_event(&self, event: CallEvent) -> Result<(), CallEvent> {
        let st = self.state.lock();
        if st.events >= self.capacity {
            return Err(event);
        }
        self.push_locked(st, event)
    }

    fn push_locked(
        &self,
        mut st: parking_lot::MutexGuard<'_, State>,
        event: CallEvent,
    ) -> Result<(), CallEvent> {
        if st.closing.is_some() {
            drop(st);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(event);
        }
        st.items.push(Msg::Event(event));
        st.events += 1;
        st.accepted += 1;
        let wake = st.events == 1 || st.events == self.wake_at;
        drop(st);
        if wake {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Queues a control message (never waits for room; control messages are tiny and rare).
    pub(crate) fn push_control(&self, msg: Msg) -> Result<(), StatsError> {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return Err(StatsError::Closed);
        }
        st.items.push(msg);
        st.urgent = true;
        drop(st);
        self.wake_writer.notify_one();
        Ok(())
    }

    /// Stops accepting events; the writer drains what is queued and stops by `deadline`.
    /// Returns `false` if the queue was already closing.
    pub(crate) fn close(&self, deadline: Instant) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return false;
        }
        st.closing = Some(deadline);
        drop(st);
        self.not_full.notify_all();
        self.wake_writer.notify_one();
        true
    }

    /// Moves everything queued into `into` (which must be empty) and wakes waiting callers.
    /// Returns the number of events moved.
    pub(crate) fn take(&self, into: &mut Vec<Msg>) -> usize {
        debug_assert!(into.is_empty());
        let mut st = self.state.lock();
        std::mem::swap(&mut st.items, into);
        let n = std::mem::take(&mut st.events);
        st.urgent = false;
        drop(st);
        if n > 0 {
            self.not_full.notify_all();
        }
        n
    }

    /// Events waiting in the queue, and events accepted since the collector opened.
    pub(crate) fn counts(&self) -> (usize, u64) {
        let st = self.state.lock();
        (st.events, st.accepted)
    }

    pub(crate) fn is_urgent(&self) -> bool {
        let st = self.state.lock();
        st.urgent || st.closing.is_some() || st.events >= self.wake_at
    }

    pub(crate) fn closing(&self) -> Option<Instant> {
        self.state.lock().closing
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.state.lock().items.is_empty()
    }

    /// Waits until a caller signals new work.
    pub(crate) async fn notified(&self) {
        self.wake_writer.notified().await;
    }
}
