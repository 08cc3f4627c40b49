//! Configuration reload (SIGHUP): what can change without a restart (the terminal registry, products' modes and
//! watermarks, terminals' MAC keys read again from their file) is applied at once; anything else that changed is reported by key as needing a restart.

use std::sync::Arc;

use tokio::time::Instant;

use super::config::{self, GatewayConfig};
use super::Gateway;

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// What changed and was applied.
    pub applied: Vec<String>,
    /// What changed and needs a restart (keys as in the configuration file).
    pub needs_restart: Vec<String>,
}

impl Gateway {
    /// The terminal registry in force.
    pub(super) fn registry(&self) -> Arc<config::TerminalRegistry> {
        self.terminals.read().expect("not poisoned").clone()
    }

    /// Applies what can change without a restart (the terminal registry, products' modes and watermarks) from
    /// `new`, and says what else changed and needs a restart. PINs of a product no longer prefetched go back to the
    /// PIN server.
    pub fn reload(&self, new: &GatewayConfig) -> ReloadReport {
        let mut r = ReloadReport::default();
        let old_terminals = self.registry();
        // Where terminals may come from (allow lists, callers' numbers, NACs) is part of the registry.
        if old_terminals.terminals != new.terminals.terminals || old_terminals.origins != new.terminals.origins {
            let added = new
                .terminals
                .terminals
                .keys()
                .filter(|k| !old_terminals.terminals.contains_key(*k))
                .count();
            let removed = old_terminals
                .terminals
                .keys()
                .filter(|k| !new.terminals.terminals.contains_key(*k))
                .count();
            *self.terminals.write().expect("not poisoned") = Arc::new(new.terminals.clone());
            r.applied.push(format!(
                "terminal registry: {} terminals ({added} added, {removed} removed, others may have changed)",
                new.terminals.terminals.len()
            ));
        }
        {
            let mut products = self.products.lock().expect("not poisoned");
            if *products != new.products {
                self.cache.lock().expect("not poisoned").set_modes(
                    new.products.iter().map(|p| (p.code.clone(), p.amount, p.mode)),
                    Instant::now(),
                );
                *products = new.products.clone();
                r.applied.push(format!(
                    "products: {} listed, modes and watermarks applied",
                    new.products.len()
                ));
                self.refill_wake.notify_one();
            }
        }
        if let Some(new_keys) = new.terminal_keys.as_ref().map(|k| k.keys.clone()) {
            let mut keys = self.terminal_keys.write().expect("not poisoned");
            if keys.ids() != new_keys.ids() {
                r.applied.push(format!(
                    "terminal keys: {} terminals, {} keys",
                    new_keys.terminals().count(),
                    new_keys.ids().len()
                ));
            }
            // Replaced even when the ids are the same: a key whose grace ended is gone from the new set.
            *keys = new_keys;
        }
        let c = &self.cfg;
        let mut restart = |key: &str, changed: bool| {
            if changed {
                r.needs_restart.push(key.to_string());
            }
        };
        restart("gateway.journal", c.journal != new.journal);
        restart("gateway.journal_keys_file", c.journal_keys != new.journal_keys);
        restart(
            "gateway.response_deadline_ms",
            c.response_deadline != new.response_deadline,
        );
        restart(
            "gateway.keep_cache_on_shutdown",
            c.keep_cache_on_shutdown != new.keep_cache_on_shutdown,
        );
        restart("gateway.admin", c.admin != new.admin);
        restart("gateway.metrics", c.metrics != new.metrics);
        restart("gateway.repeat_window_secs", c.repeat_window != new.repeat_window);
        restart("gateway.repeat_max", c.repeat_max != new.repeat_max);
        restart("gateway.lease_secs", c.lease != new.lease);
        restart("gateway.refill_cover_secs", c.refill_cover != new.refill_cover);
        restart("gateway.refill_lead_secs", c.refill_lead != new.refill_lead);
        restart("gateway.protocols", c.protocols != new.protocols);
        restart("gateway.log", c.log != new.log);
        restart("gateway.mac_failures", c.mac_failures != new.mac_failures);
        restart(
            "gateway.mac_failure_window_secs",
            c.mac_failure_window != new.mac_failure_window,
        );
        restart(
            "gateway.terminal_keys_file",
            c.terminal_keys.is_some() != new.terminal_keys.is_some(),
        );
        restart("gateway.terminal_locks_file", c.terminal_locks != new.terminal_locks);
        restart("policy", c.policy != new.policy);
        restart(
            "upstream",
            c.servers
                .iter()
                .map(|s| (s.addr, &s.name))
                .ne(new.servers.iter().map(|s| (s.addr, &s.name)))
                || c.cert != new.cert
                || c.key != new.key
                || c.ca != new.ca
                || format!("{:?}", c.upstream) != format!("{:?}", new.upstream),
        );
        restart(
            "listener",
            format!("{:?}", c.listeners) != format!("{:?}", new.listeners),
        );
        restart("serial", format!("{:?}", c.serial) != format!("{:?}", new.serial));
        r
    }

    /// While the gateway runs: each SIGHUP reads the configuration at `reload_from` again and applies it
    /// ([`Gateway::reload`]); a file with problems changes nothing and its problems are logged. Without a path, or
    /// without a way to listen for SIGHUP, it waits for ever.
    pub(super) async fn reload_on_hangup(&self, reload_from: Option<std::path::PathBuf>) {
        let Some(path) = reload_from else {
            return std::future::pending().await;
        };
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; configuration reloads are off");
            return std::future::pending().await;
        };
        while hup.recv().await.is_some() {
            match GatewayConfig::load(&path) {
                Err(e) => tracing::error!(error = %e, "SIGHUP: the configuration has a problem; nothing changed"),
                Ok(new) => {
                    let r = self.reload(&new);
                    if r.applied.is_empty() && r.needs_restart.is_empty() {
                        tracing::info!("SIGHUP: configuration reloaded, nothing changed");
                    }
                    for a in &r.applied {
                        tracing::info!(change = %a, "SIGHUP: applied");
                    }
                    if !r.needs_restart.is_empty() {
                        tracing::warn!(keys = %r.needs_restart.join(", "), "SIGHUP: these changed and need a restart; not applied");
                    }
                }
            }
        }
    }
}
