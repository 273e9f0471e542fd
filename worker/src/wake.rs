//! Waking idle apalis workers: a poll strategy that fires every poll interval *or* as soon as
//! the enqueue script publishes on the queue's wake channel, whichever comes first. apalis'
//! own strategies only poll on a timer (and its pub/sub factory never wakes on push), so
//! without this the enqueue→start latency is half a poll interval on average.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy};
use futures::StreamExt;
use futures::channel::mpsc;
use sessionfleet::CancellationToken;
use sessionfleet::jobs::QueueClass;
use sessionfleet::queue::Queue;

/// Wake-up senders of the running apalis workers, per queue.
#[derive(Clone, Default)]
pub struct Wakers(Arc<Mutex<HashMap<QueueClass, Vec<mpsc::Sender<()>>>>>);

impl Wakers {
    /// A strategy for a new apalis worker of `q` (its sender is registered here).
    pub fn strategy(&self, q: QueueClass, interval: Duration) -> WakeStrategy {
        let (tx, rx) = mpsc::channel(1);
        if let Ok(mut m) = self.0.lock() {
            m.entry(q).or_default().push(tx);
        }
        WakeStrategy {
            rx,
            interval,
            delay: None,
        }
    }

    /// Wakes every worker of `q`; drops senders of workers that are gone.
    pub fn wake(&self, q: QueueClass) {
        if let Ok(mut m) = self.0.lock()
            && let Some(senders) = m.get_mut(&q)
        {
            // A full channel already holds a pending wake-up: nothing lost.
            senders.retain_mut(|tx| tx.try_send(()).is_ok_or_full());
        }
    }
}

trait SendOutcome {
    fn is_ok_or_full(self) -> bool;
}

impl SendOutcome for Result<(), mpsc::TrySendError<()>> {
    fn is_ok_or_full(self) -> bool {
        match self {
            Ok(()) => true,
            Err(e) => !e.is_disconnected(),
        }
    }
}

/// Poll interval or wake-up, whichever comes first.
pub struct WakeStrategy {
    rx: mpsc::Receiver<()>,
    interval: Duration,
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PollStrategy for WakeStrategy {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut woke = false;
        while let Poll::Ready(Some(())) = self.rx.poll_next_unpin(cx) {
            woke = true;
        }
        loop {
            let interval = self.interval;
            let delay = self
                .delay
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
            if delay.as_mut().poll(cx).is_ready() {
                self.delay = None;
                woke = true;
                continue;
            }
            break;
        }
        if woke {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// Listens on the wake channels of `queues` until `stop`, reconnecting after any error.
pub async fn listen(
    queue: Queue,
    queues: Vec<QueueClass>,
    wakers: Wakers,
    stop: CancellationToken,
) {
    let channels: HashMap<String, QueueClass> = queues
        .iter()
        .map(|q| (queue.keys().wake_channel(*q), *q))
        .collect();
    let mut attempt = 0u32;
    loop {
        match queue.client().get_async_pubsub().await {
            Ok(mut ps) => {
                let mut ok = true;
                for ch in channels.keys() {
                    if let Err(e) = ps.subscribe(ch).await {
                        tracing::warn!(error = %redact(&queue, &e), "cannot subscribe to wake-ups");
                        ok = false;
                        break;
                    }
                }
                if ok {
                    attempt = 0;
                    // Jobs pushed while we were not subscribed are found by the next poll.
                    for q in &queues {
                        wakers.wake(*q);
                    }
                    let mut messages = ps.on_message();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            m = messages.next() => match m {
                                Some(msg) => if let Some(q) = channels.get(msg.get_channel_name()) { wakers.wake(*q) },
                                None => break,
                            },
                        }
                    }
                    tracing::warn!(
                        "wake-up subscription lost; reconnecting (polling continues meanwhile)"
                    );
                }
            }
            Err(e) => {
                tracing::debug!(error = %redact(&queue, &e), "wake-up subscription not available")
            }
        }
        attempt += 1;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(sessionfleet::backoff::exponential(attempt, Duration::from_millis(100), Duration::from_secs(5))) => {}
        }
    }
}

fn redact(queue: &Queue, e: &redis::RedisError) -> String {
    queue.scrub(&e.to_string())
}
