//! The wall clock in the one unit the system records time in: whole seconds since the Unix epoch (sale times,
//! leases, the binding of field 7 to its year, journal file names). Neutral ground: the gateway and the PIN server
//! both read it, and neither depends on the other for it.

/// Seconds since the Unix epoch (0 on a clock set before it).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
