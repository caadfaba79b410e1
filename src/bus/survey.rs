//! Surveys: what the other nodes' shards know of Pusher channels, asked over the bus.
//!
//! The Pusher HTTP API's channel queries (`GET /apps/{id}/channels…`) count subscribed connections on
//! every node. The asking node's bus thread publishes an `S` envelope (its survey id and the question:
//! one channel, or the channels with a prefix) on the broadcast channel; every other node's bus thread
//! asks its own shards (the same `ShardMsg::ChannelCounts` the asking node's handler sends to its
//! shards) in a task of its runtime, so the thread goes on relaying meanwhile, and publishes the sums
//! in an `R` envelope addressed to the asking node. The asking node waits for every peer it knows to
//! be alive (`PeerWatch::known`) or for `SURVEY_TIMEOUT_MS`, whichever comes first, and answers with
//! what came: a Pusher client can do nothing with an error, so a node that does not answer in time
//! is left out (and counted in `notif_survey_timeouts_total`). A node that answers but was not known
//! yet (it started a moment ago) is counted too, if its answer comes before the survey ends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures_channel::oneshot;
use tokio::sync::mpsc::WeakUnboundedSender;
use uuid::Uuid;

use crate::bus::redis_bus::BusCmd;
use crate::delivery::inbox::{ShardInbox, ShardMsg};

/// Subscribed connections per channel.
pub type Counts = BTreeMap<String, usize>;

/// One survey of this node, waiting for answers.
struct Pending {
    /// The peers that have not answered yet.
    waiting: HashSet<Uuid>,
    /// The sums of the answers so far.
    counts: Counts,
    /// Where the sums go.
    reply: oneshot::Sender<Counts>,
}

/// This node's surveys under way, and the answering of other nodes'. Owned by the bus thread; needs
/// its tokio runtime (timers and answer tasks are spawned on it).
pub struct Surveys {
    /// The bus thread's own queue, for the timers and the answer tasks (weak: the thread must still
    /// see its queue close when every handle is gone).
    queue: WeakUnboundedSender<BusCmd>,
    /// `SURVEY_TIMEOUT_MS`.
    timeout: Duration,
    /// The next survey's id.
    next_id: u64,
    /// The surveys waiting for answers, by id.
    pending: HashMap<u64, Pending>,
}

impl Surveys {
    /// No survey yet; `queue` is the bus thread's, `timeout` how long a survey waits.
    pub fn new(queue: WeakUnboundedSender<BusCmd>, timeout: Duration) -> Surveys {
        Surveys {
            queue,
            timeout,
            next_id: 0,
            pending: HashMap::new(),
        }
    }

    /// Begins a survey of `peers`, answered on `reply`: its id, for the `S` envelope to publish, or
    /// `None` when there is no peer to ask (then `reply` has its empty answer already).
    pub fn begin(&mut self, peers: HashSet<Uuid>, reply: oneshot::Sender<Counts>) -> Option<u64> {
        if peers.is_empty() {
            let _ = reply.send(Counts::new());
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.pending.insert(
            id,
            Pending {
                waiting: peers,
                counts: Counts::new(),
                reply,
            },
        );
        let queue = self.queue.clone();
        let timeout = self.timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(queue) = queue.upgrade() {
                let _ = queue.send(BusCmd::SurveyExpired(id));
            }
        });
        Some(id)
    }

    /// Node `from` answered survey `id` with `counts`; the survey answers once every peer has.
    pub fn answered(&mut self, id: u64, from: Uuid, counts: Counts) {
        let Some(pending) = self.pending.get_mut(&id) else {
            // Late (the survey timed out) or a second copy: the sums went already.
            return;
        };
        // A node this one did not know of yet (it started a moment ago) is alive: its counts count.
        pending.waiting.remove(&from);
        for (name, n) in counts {
            *pending.counts.entry(name).or_insert(0) += n;
        }
        if pending.waiting.is_empty() {
            if let Some(done) = self.pending.remove(&id) {
                let _ = done.reply.send(done.counts);
            }
        }
    }

    /// Survey `id`'s timeout passed: it answers with what came. Whether some peer was still missing
    /// (false: it had answered whole already).
    pub fn expire(&mut self, id: u64) -> bool {
        match self.pending.remove(&id) {
            Some(done) => {
                let _ = done.reply.send(done.counts);
                true
            }
            None => false,
        }
    }

    /// Every survey under way answers with what came (Redis was lost: no more answers can come).
    pub fn finish_all(&mut self) {
        for (_, done) in self.pending.drain() {
            let _ = done.reply.send(done.counts);
        }
    }

    /// Answers node `to`'s survey `id`: this node's shards count their subscribed connections, in
    /// a task (the bus thread does not wait for them), and the sums go back through the bus queue
    /// as a [`BusCmd::SurveyAnswer`].
    pub fn answer(&self, shards: &[ShardInbox], to: Uuid, id: u64, prefix: String, exact: bool) {
        let answers: Vec<_> = shards
            .iter()
            .map(|shard| {
                let (reply, answer) = oneshot::channel();
                shard.send_to_shard(ShardMsg::ChannelCounts {
                    prefix: prefix.clone(),
                    exact,
                    reply,
                });
                answer
            })
            .collect();
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let counts = sum_shard_counts(answers).await;
            if let Some(queue) = queue.upgrade() {
                let _ = queue.send(BusCmd::SurveyAnswer { to, id, counts });
            }
        });
    }
}

/// Sums the shards' `(channel, subscribed connections)` answers. A shard that is gone (shutting
/// down) answers nothing: it holds no connections either.
pub async fn sum_shard_counts(answers: Vec<oneshot::Receiver<Vec<(String, usize)>>>) -> Counts {
    let mut counts = Counts::new();
    for answer in answers {
        if let Ok(list) = answer.await {
            for (name, n) in list {
                *counts.entry(name).or_insert(0) += n;
            }
        }
    }
    counts
}
