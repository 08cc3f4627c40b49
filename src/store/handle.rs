//! The async face of the inventory for servers: operations go through a channel to backend workers that take
//! whatever has queued up (up to a cap) and apply it in one transaction. While one batch commits (a disk sync),
//! the next one gathers: durable sales share syncs without any waiting on a timer (group commit).
//!
//! SQLite: one writer thread (SQLite has one writer anyway). PostgreSQL: a few connections, each a task.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{Op, Outcome, StoreError};
use crate::crypto::PinCipher;

/// Where the inventory lives: `sqlite:PATH` or `postgres://…` / `postgresql://…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DbUrl {
    pub fn parse(s: &str) -> Result<DbUrl, StoreError> {
        if let Some(p) = s.strip_prefix("sqlite://").or_else(|| s.strip_prefix("sqlite:")) {
            if p.is_empty() {
                return Err(StoreError::BadRequest(
                    "sqlite: needs a file path, e.g. sqlite:pins.db".into(),
                ));
            }
            Ok(DbUrl::Sqlite(PathBuf::from(p)))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(DbUrl::Postgres(s.to_string()))
        } else {
            Err(StoreError::BadRequest(format!(
                "database `{s}`: expected sqlite:PATH or postgres://USER@HOST:PORT/DB"
            )))
        }
    }
}

/// Tuning of the workers.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most operations in one transaction.
    pub max_batch: usize,
    /// PostgreSQL connections (each applies batches independently).
    pub pg_connections: usize,
    /// PostgreSQL schema to use (tests); `None` is the connection's default.
    pub pg_schema: Option<String>,
    /// Operations waiting for a worker before callers are made to wait.
    pub queue: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            max_batch: 64,
            pg_connections: 2,
            pg_schema: None,
            queue: 4096,
        }
    }
}

/// Operations queued together, and who waits for their results.
struct Job {
    ops: Vec<Op>,
    reply: Reply,
}

enum Reply {
    /// [`StoreHandle::call`]: one operation.
    One(oneshot::Sender<Result<Outcome, StoreError>>),
    /// [`StoreHandle::call_many`]: its operations' results, in order.
    Many(oneshot::Sender<Vec<Result<Outcome, StoreError>>>),
}

impl Reply {
    /// Sends this job's results, taken from the front of `results`.
    fn send(self, results: &mut std::vec::IntoIter<Result<Outcome, StoreError>>, n: usize) {
        match self {
            Reply::One(r) => {
                if let Some(x) = results.next() {
                    let _ = r.send(x);
                }
            }
            Reply::Many(r) => {
                let _ = r.send(results.by_ref().take(n).collect());
            }
        }
    }

    fn fail(self, n: usize, msg: &str) {
        let mut results = super::failed_batch(n, msg).into_iter();
        self.send(&mut results, n);
    }
}

/// A cloneable handle to the inventory's workers. The workers stop when the last handle is dropped, after
/// finishing what was queued.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Job>,
    workers: Arc<std::sync::Mutex<Vec<Worker>>>,
}

enum Worker {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl StoreHandle {
    /// Opens the inventory (creating or migrating its schema) and starts the workers. `keys` is the PIN key spec
    /// (see [`PinCipher::from_spec`]); it must hold every key that sealed an available PIN, or the open is refused.
    pub async fn open(url: &DbUrl, keys: &str, opts: &StoreOptions) -> Result<StoreHandle, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>(opts.queue);
        let max = opts.max_batch.max(1);
        let workers = match url {
            DbUrl::Sqlite(path) => {
                let store = SqliteStore::open(path, PinCipher::from_spec(keys)?)?;
                // A key dropped from the keyring while PINs still need it is an operator's mistake: refused at
                // start, by name, rather than found one sale at a time.
                store.check_keys()?;
                vec![Worker::Thread(std::thread::spawn(move || {
                    sqlite_worker(store, rx, max)
                }))]
            }
            DbUrl::Postgres(u) => {
                let rx = Arc::new(Mutex::new(rx));
                let mut w = Vec::new();
                for i in 0..opts.pg_connections.max(1) {
                    let store = PgStore::connect(u, opts.pg_schema.as_deref(), PinCipher::from_spec(keys)?).await?;
                    if i == 0 {
                        store.check_keys().await?;
                    }
                    let again = Reconnect {
                        url: u.clone(),
                        schema: opts.pg_schema.clone(),
                        keys: crate::keyfile::Secret::new(keys),
                    };
                    w.push(Worker::Task(tokio::spawn(pg_worker(store, again, rx.clone(), max))));
                }
                w
            }
        };
        Ok(StoreHandle {
            tx,
            workers: Arc::new(std::sync::Mutex::new(workers)),
        })
    }

    /// Applies one operation (batched with whatever else is queued).
    pub async fn call(&self, op: Op) -> Result<Outcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                ops: vec![op],
                reply: Reply::One(reply),
            })
            .await
            .map_err(|_| StoreError::Db("store is shut down".into()))?;
        rx.await.map_err(|_| StoreError::Db("store worker stopped".into()))?
    }

    /// Applies several operations, in order, in one transaction (with whatever else is queued, however many they
    /// are): one commit and one answer for all of them, e.g. a gateway's batch of confirms. One result each.
    pub async fn call_many(&self, ops: Vec<Op>) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        let n = ops.len();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                ops,
                reply: Reply::Many(reply),
            })
            .await
            .map_err(|_| StoreError::Db("store is shut down".into()))?;
        let results = rx.await.map_err(|_| StoreError::Db("store worker stopped".into()))?;
        if results.len() != n {
            return Err(StoreError::Db(format!(
                "internal: {} results for {n} operations",
                results.len()
            )));
        }
        Ok(results)
    }

    /// Drops this handle and waits for the workers to finish (only effective on the last handle).
    pub async fn close(self) {
        let workers = std::mem::take(&mut *self.workers.lock().expect("not poisoned"));
        drop(self.tx);
        for w in workers {
            match w {
                Worker::Thread(t) => {
                    let _ = tokio::task::spawn_blocking(move || t.join()).await;
                }
                Worker::Task(t) => {
                    let _ = t.await;
                }
            }
        }
    }
}

/// Most operations one transaction takes from several callers (a job is never split: one of more operations, a
/// gateway's confirms, is a transaction of its own). Confirms are cheap per operation and each transaction costs a
/// disk sync, so several batches of confirms share one.
const MAX_OPS: usize = 1024;

/// Adds to `jobs` whatever is already queued, while they are fewer than `max` callers and [`MAX_OPS`] operations:
/// the batch that shares one commit.
fn gather(jobs: &mut Vec<Job>, rx: &mut mpsc::Receiver<Job>, max: usize) {
    let mut n: usize = jobs.iter().map(|j| j.ops.len()).sum();
    while jobs.len() < max && n < MAX_OPS {
        match rx.try_recv() {
            Ok(j) => {
                n += j.ops.len();
                jobs.push(j);
            }
            Err(_) => break,
        }
    }
}

/// Splits a batch into its operations and the callers waiting for their results (with how many each waits for).
fn split(jobs: &mut Vec<Job>) -> (Vec<Op>, Vec<(Reply, usize)>) {
    let mut ops = Vec::with_capacity(jobs.iter().map(|j| j.ops.len()).sum());
    let mut replies = Vec::with_capacity(jobs.len());
    for j in jobs.drain(..) {
        replies.push((j.reply, j.ops.len()));
        ops.extend(j.ops);
    }
    (ops, replies)
}

/// Answers every caller of a batch from its results, in order.
fn answer(replies: Vec<(Reply, usize)>, results: Vec<Result<Outcome, StoreError>>) {
    let mut results = results.into_iter();
    for (reply, n) in replies {
        reply.send(&mut results, n);
    }
}

fn sqlite_worker(mut store: SqliteStore, mut rx: mpsc::Receiver<Job>, max: usize) {
    let mut jobs = Vec::with_capacity(max);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        gather(&mut jobs, &mut rx, max);
        let (ops, mut replies) = split(&mut jobs);
        let mut taken = ops.len();
        // What arrived while the batch was applied joins its transaction (within the same limits), instead of
        // waiting for its commit and then paying a commit of its own.
        let mut late = |store_jobs: &mut Vec<Job>| -> Option<Vec<Op>> {
            if replies.len() >= max || taken >= MAX_OPS {
                return None;
            }
            while replies.len() + store_jobs.len() < max && taken < MAX_OPS {
                match rx.try_recv() {
                    Ok(j) => {
                        taken += j.ops.len();
                        store_jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            if store_jobs.is_empty() {
                return None;
            }
            let (ops, r) = split(store_jobs);
            replies.extend(r);
            Some(ops)
        };
        let results = store.apply_batch_then(&ops, &mut || late(&mut jobs));
        answer(replies, results);
    }
}

/// What a PostgreSQL worker needs to open its connection again.
struct Reconnect {
    url: String,
    schema: Option<String>,
    keys: crate::keyfile::Secret,
}

async fn pg_worker(mut store: PgStore, again: Reconnect, rx: Arc<Mutex<mpsc::Receiver<Job>>>, max: usize) {
    let mut jobs = Vec::with_capacity(max);
    // Set when a batch failed with a database error: the connection may be dying without knowing it yet.
    let mut suspect = false;
    loop {
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(j) => jobs.push(j),
                None => return,
            }
            gather(&mut jobs, &mut rx, max);
        }
        // A connection PostgreSQL closed (restart, failover, terminated backend) is opened again before the batch;
        // if that fails, the batch fails (its callers retry) and the next batch tries again.
        let lost = store.client().is_closed() || (suspect && store.client().batch_execute("SELECT 1").await.is_err());
        suspect = false;
        if lost {
            match reconnect(&again).await {
                Ok(s) => {
                    tracing::info!("PostgreSQL connection reopened");
                    store = s;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL unreachable");
                    for j in jobs.drain(..) {
                        j.reply.fail(j.ops.len(), &format!("PostgreSQL unreachable: {e}"));
                    }
                    // Do not spin on a database that is down.
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let (ops, replies) = split(&mut jobs);
        let results = store.apply_batch(&ops).await;
        suspect = results.iter().all(|r| matches!(r, Err(StoreError::Db(_))));
        answer(replies, results);
    }
}

async fn reconnect(again: &Reconnect) -> Result<PgStore, StoreError> {
    PgStore::connect(
        &again.url,
        again.schema.as_deref(),
        PinCipher::from_spec(again.keys.expose())?,
    )
    .await
}
