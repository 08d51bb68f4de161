//! The one way to Redis (`--redis`): a handle that connects on first use and reconnects by
//! itself, the timeouts every call gets, and a helper for each shape of call the proxy makes
//! (one command, an atomic pipeline, a script, a key scan, a subscription).
//!
//! Low level: this module knows commands, keys and bytes, and nothing of the proxy. What a key
//! means (a revocation, a rate counter) belongs to the module that owns that fact
//! (`auth::revocation`, `ratelimit`); this module must never learn those types. It never sees
//! tokens or secrets.
//!
//! The external crate has the same name: inside this crate it is spelled `::redis`, and this
//! module `crate::redis`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubStream};
use ::redis::{Cmd, FromRedisValue, Pipeline, ScriptInvocation};
use arc_swap::ArcSwapOption;
use futures_util::StreamExt;

/// Longest wait on one Redis call on the request path: a slow Redis must not stall agents
/// (the rate limiter falls back to local counting instead).
const CALL_TIMEOUT: Duration = Duration::from_millis(300);
/// Longest wait to (re)connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Keys asked for per SCAN step: large enough that a few thousand keys take a few round trips.
const SCAN_COUNT: usize = 1000;

/// Errors talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The `--redis` URL cannot be used.
    #[error("--redis {url:?} is not a usable Redis URL: {reason}")]
    BadUrl {
        /// The URL as given (a password in it is the operator's own).
        url: String,
        /// Why.
        reason: String,
    },
    /// Redis refused or failed a command.
    #[error("Redis failed: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// Redis did not answer in time.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// A handle on Redis. Cheap to share; connects on first use and reconnects by itself.
pub struct Redis {
    client: ::redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
}

// SECURITY: the URL may carry a password; Debug shows nothing of it.
impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redis { .. }")
    }
}

async fn timed<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, ::redis::RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RedisError::Timeout(limit)),
    }
}

impl Redis {
    /// Parse the URL; no I/O (the first call connects).
    pub fn open(url: &str) -> Result<Redis, RedisError> {
        let client = ::redis::Client::open(url).map_err(|e| RedisError::BadUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Redis {
            client,
            conn: ArcSwapOption::empty(),
        })
    }

    /// The multiplexed connection, connecting on first use. The manager reconnects by itself
    /// after Redis comes back; a call made while it is away fails fast.
    async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        if let Some(c) = self.conn.load_full() {
            return Ok(ConnectionManager::clone(&c));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(500);
        let c = timed(
            CONNECT_TIMEOUT * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await?;
        self.conn.store(Some(Arc::new(c.clone())));
        Ok(c)
    }

    /// Check that Redis answers.
    pub async fn ping(&self) -> Result<(), RedisError> {
        self.query::<String>(&::redis::cmd("PING")).await?;
        Ok(())
    }

    /// Run one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisError> {
        let mut c = self.connection().await?;
        timed(CALL_TIMEOUT, cmd.query_async(&mut c)).await
    }

    /// Run a pipeline in one round trip, ignoring its replies: MULTI/EXEC (all or nothing)
    /// when the caller made it `atomic()`. Gets three call timeouts: it carries several
    /// commands, and it is not on the request path.
    pub async fn exec(&self, pipe: &Pipeline) -> Result<(), RedisError> {
        let mut c = self.connection().await?;
        timed(CALL_TIMEOUT * 3, pipe.query_async::<()>(&mut c)).await
    }

    /// Run a Lua script: `EVALSHA`, loading the script on first use (or after Redis lost it).
    pub async fn eval<T: FromRedisValue>(
        &self,
        call: &ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let mut c = self.connection().await?;
        timed(CALL_TIMEOUT, call.invoke_async(&mut c)).await
    }

    /// Every key matching `pattern` with its value (SCAN, then MGET per batch). Keys that
    /// vanish between the two are left out.
    pub async fn scan_values<V: FromRedisValue>(
        &self,
        pattern: &str,
    ) -> Result<Vec<(String, V)>, RedisError> {
        let mut c = self.connection().await?;
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = timed(
                CALL_TIMEOUT,
                ::redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut c),
            )
            .await?;
            if !keys.is_empty() {
                let values: Vec<Option<V>> = timed(
                    CALL_TIMEOUT,
                    ::redis::cmd("MGET").arg(&keys).query_async(&mut c),
                )
                .await?;
                out.extend(
                    keys.into_iter()
                        .zip(values)
                        .filter_map(|(key, value)| Some((key, value?))),
                );
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Subscribe to `channel` on a connection of its own (a subscribed connection can do
    /// nothing else). The subscription ends when that connection drops; the caller
    /// resubscribes, and catches up on what it missed by other means (pushes are not queued).
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, RedisError> {
        let mut pubsub = timed(CONNECT_TIMEOUT, self.client.get_async_pubsub()).await?;
        timed(CONNECT_TIMEOUT, pubsub.subscribe(channel)).await?;
        Ok(Subscription {
            messages: pubsub.into_on_message(),
        })
    }
}

/// Messages published on one channel, from [`Redis::subscribe`].
pub struct Subscription {
    messages: PubSubStream,
}

impl Subscription {
    /// The next message's payload; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        let msg = self.messages.next().await?;
        Some(msg.get_payload_bytes().to_vec())
    }
}
