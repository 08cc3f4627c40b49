//! Fuzz target: the dial-up cores on arbitrary line input. The input is split into chunks, each fed to the modem
//! controller (and, once online, to the link) at advancing times, with timers fired in between: neither core
//! panics, the link holds no more than its frame cap, and a call that ended says nothing more.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pingate::link::dialup::{DialupLink, LinkConfig, LinkEvent};
use pingate::link::modem::{ModemConfig, ModemController, ModemEvent};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut modem = ModemController::new(ModemConfig::default(), data.first().is_some_and(|b| b & 1 == 1), now);
    let cfg = LinkConfig {
        inter_char: data.get(1).and_then(|b| (b & 1 == 1).then(|| Duration::from_millis(50))),
        max_frame: 64,
        ..LinkConfig::default()
    };
    let mut link: Option<DialupLink> = None;
    // Chunks: a length byte, then that many bytes; the length byte's top bits also advance the clock.
    let mut rest = data.get(2..).unwrap_or(&[]);
    while let Some((&n, tail)) = rest.split_first() {
        let len = usize::from(n & 0x1F).min(tail.len());
        let (chunk, after) = tail.split_at(len);
        rest = after;
        now += Duration::from_millis(u64::from(n >> 5) * 400);
        modem.handle_timeout(now);
        modem.handle_input(chunk, now);
        while let Some(ev) = modem.poll_event() {
            match ev {
                ModemEvent::Connected { .. } => link = Some(DialupLink::new(cfg.clone(), now)),
                ModemEvent::CarrierLost => {
                    if let Some(l) = &mut link {
                        l.carrier_lost();
                    }
                }
                _ => {}
            }
        }
        let _ = modem.poll_transmit();
        let _ = modem.poll_dtr();
        if let Some(l) = &mut link {
            if let Some(d) = modem.poll_data() {
                l.handle_input(&d, now);
            }
            l.handle_timeout(now);
            let mut ended = false;
            while let Some(ev) = l.poll_event() {
                match ev {
                    LinkEvent::Request(d) => {
                        assert!(d.len() <= 64);
                        l.respond(&d, now);
                    }
                    LinkEvent::Ended(_) => ended = true,
                    _ => {}
                }
            }
            let _ = l.poll_transmit();
            if ended {
                assert!(l.ended().is_some());
                l.handle_input(b"\x02x\x03{", now);
                assert!(l.poll_event().is_none() && l.poll_transmit().is_none());
                link = None;
                modem.hang_up(now);
            }
        }
    }
});
