//! Following one job's events through node failures.
//!
//! Live events come on a plain subscription to `natter.events.<id>`; the ones
//! stored before it began, or published while this process was reconnecting
//! to another node, are read from NATTER_EVENTS by direct get. Neither needs a
//! JetStream consumer, whose creation waits on the cluster's meta leader and
//! failed for tens of seconds after a node was lost. Each attempt's events are
//! numbered, so this hands them on in order and once each, however they came.

use async_nats::jetstream::stream;
use futures::StreamExt;
use natter_shared::jetstream::stored_events;
use natter_shared::proto::Event;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a quiet follow waits before asking the stream what it missed: an
/// event published while this process was between nodes reached no one live.
const QUIET_CHECK: Duration = Duration::from_secs(2);

/// How long held events wait for an attempt's first ones before the attempt
/// is taken to start at the earliest held.
const FIRST_EVENTS_WAIT: Duration = Duration::from_secs(1);

pub struct Follower {
    job_id: Uuid,
    live: async_nats::Subscriber,
    events: stream::Stream,
    /// Stream sequence the next read of stored events starts at.
    stored_from: u64,
    /// Per attempt, the `seq` of the next event to hand on.
    next: HashMap<u32, u64>,
    /// Events that came before one they follow.
    held: BTreeMap<(u32, u64), Event>,
    ready: VecDeque<Event>,
    /// Since when held events have waited for ones before them.
    stuck_since: Option<Instant>,
}

impl Follower {
    /// Subscribes first, then reads what is stored, so nothing falls between.
    pub async fn start(
        client: &async_nats::Client,
        events: stream::Stream,
        job_id: Uuid,
    ) -> Result<Follower, async_nats::SubscribeError> {
        let live = client.subscribe(natter_shared::subjects::events(job_id)).await?;
        let mut follower = Follower {
            job_id,
            live,
            events,
            stored_from: 1,
            next: HashMap::new(),
            held: BTreeMap::new(),
            ready: VecDeque::new(),
            stuck_since: None,
        };
        follower.read_stored().await;
        Ok(follower)
    }

    /// The job's next event; `None` only if the subscription is closed.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            match tokio::time::timeout(QUIET_CHECK, self.live.next()).await {
                Ok(Some(message)) => match serde_json::from_slice::<Event>(&message.payload) {
                    Ok(event) => self.offer(event),
                    Err(e) => tracing::warn!(job = %self.job_id, "skipping an unreadable event: {e}"),
                },
                Ok(None) => return None,
                Err(_) => self.read_stored().await,
            }
            // A gap: the missing events were published while this process
            // was away; the stream has them.
            if self.ready.is_empty() && !self.held.is_empty() {
                self.read_stored().await;
                // A replica may lag: only a gap that outlasts this wait means
                // the first events are not to be had.
                let stuck = *self.stuck_since.get_or_insert_with(Instant::now);
                if self.ready.is_empty() && stuck.elapsed() >= FIRST_EVENTS_WAIT {
                    self.start_unseen_attempts();
                }
            }
            if !self.ready.is_empty() {
                self.stuck_since = None;
            }
        }
    }

    /// Takes in the stored events not read yet. A failed read is only logged:
    /// the next quiet check tries again, as a node may be coming back.
    async fn read_stored(&mut self) {
        match stored_events(&self.events, self.job_id, self.stored_from).await {
            Ok((events, next)) => {
                self.stored_from = next;
                for event in events {
                    self.offer(event);
                }
            }
            Err(e) => tracing::warn!(job = %self.job_id, "cannot read the job's stored events yet: {e}"),
        }
    }

    fn offer(&mut self, event: Event) {
        if event.seq < self.next.get(&event.attempt).copied().unwrap_or(0) {
            return; // seen already, live and then stored, or the other way round
        }
        self.held.insert((event.attempt, event.seq), event);
        self.release();
    }

    /// An attempt none of whose events came yet, still missing its first
    /// ones after the stream was read: they are not to be had (expired, or
    /// a publisher that numbers from 1), so it starts at its earliest held.
    fn start_unseen_attempts(&mut self) {
        let firsts: Vec<(u32, u64)> = self.held.keys().copied().collect();
        for (attempt, seq) in firsts {
            self.next.entry(attempt).or_insert(seq);
        }
        self.release();
    }

    /// Hands on every held event whose predecessors have all been handed on.
    fn release(&mut self) {
        while let Some(key) =
            self.held.keys().find(|(attempt, seq)| *seq == self.next.get(attempt).copied().unwrap_or(0)).copied()
        {
            let event = self.held.remove(&key).expect("the key was just found");
            self.next.insert(key.0, key.1 + 1);
            self.ready.push_back(event);
        }
    }
}
