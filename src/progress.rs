//! Progress bars of the long operator commands (`pingate pins import`, `pingate audit`, `pingate replay`,
//! `pingate-load`), drawn by `indicatif`: position, rate and, where the total is known, the time left.
//!
//! They go to standard error, and only when it is a terminal: `ProgressDrawTarget::stderr()` hides the bar when
//! stderr is a pipe or a file, so a log collector, a CI log or a test that captures stderr gets no `\r` and no escape
//! sequence from them, only the command's own lines.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a bar is redrawn at most, and ticked while nothing moves (so the elapsed time and rate stay live).
const TICK: Duration = Duration::from_millis(200);

/// A bar that is drawn is ticked by a thread of indicatif's; a hidden one needs no thread.
fn tick(pb: &ProgressBar) {
    if !pb.is_hidden() {
        pb.enable_steady_tick(TICK);
    }
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants of this module: a bad one is a bug caught by the tests below, never a
    // user's error; the default style is a harmless fallback.
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// A bar of `total` steps, each a `unit` ("PINs", "requests", "checks"), after `prefix`: done of total, rate, and
/// the time left. Hidden unless stderr is a terminal.
pub fn bar(prefix: &str, total: u64, unit: &str) -> ProgressBar {
    let template = format!(
        "{{prefix}} [{{bar:30}}] {{human_pos}}/{{human_len}} {} ({{per_sec}}, {{eta}} left) {{msg}}",
        unit.replace(['{', '}'], "")
    );
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        .with_style(style(&template))
        .with_prefix(prefix.to_string());
    tick(&pb);
    pb
}

/// A bar of a run that lasts `seconds`: elapsed of the whole, the time left, and a message the caller keeps current
/// (what was sent and answered so far). Hidden unless stderr is a terminal.
pub fn timed(prefix: &str, seconds: u64) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(seconds), ProgressDrawTarget::stderr())
        .with_style(style("{prefix} [{bar:30}] {pos}/{len} s ({eta} left) {msg}"))
        .with_prefix(prefix.to_string());
    tick(&pb);
    pb
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IsTerminal;

    #[test]
    fn bars_show_only_on_a_terminal() {
        // Under `cargo test` in CI stderr is a pipe: the bars must draw nothing there. Run by hand in a terminal,
        // they are shown, as they should be.
        let tty = std::io::stderr().is_terminal();
        let b = bar("importing", 10, "PINs");
        let t = timed("gateway", 5);
        assert_eq!(b.is_hidden(), !tty);
        assert_eq!(t.is_hidden(), !tty);
        b.finish_and_clear();
        t.finish_and_clear();
    }

    #[test]
    fn templates_are_valid() {
        // The fallback style would hide a broken template: each one parses.
        ProgressStyle::with_template("{prefix} [{bar:30}] {human_pos}/{human_len} PINs ({per_sec}, {eta} left) {msg}")
            .unwrap();
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} s ({eta} left) {msg}").unwrap();
        // A unit cannot inject a template key.
        let b = bar("x", 1, "{msg}s");
        b.finish_and_clear();
    }
}
