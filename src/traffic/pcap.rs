//! Import of packet captures (`pcap` and `pcapng`, as tcpdump, tshark and Wireshark write them) into capture
//! files: the TCP streams of one port are reassembled, split into frames with the listener's framing, and written
//! as `T` (to the port) and `H` (from the port) records. No I/O here: bytes in, a [`Capture`] and a report out.
//!
//! Read: pcap (microsecond and nanosecond, either byte order) and pcapng (section, interface, enhanced and simple
//! packet blocks; other blocks are skipped), link types Ethernet (with VLAN tags), Linux cooked (SLL and SLL2),
//! BSD loopback and raw IP; IPv4 (unfragmented) and IPv6 (TCP directly after the fixed header). TCP segments are put
//! in sequence order; retransmissions and overlaps are dropped; a gap (a segment the capture missed) is reported and
//! that direction of the connection stops there.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::iso8583::Dialect;
use crate::link::framing::{FrameCodec, Framing};
use crate::traffic::capture::{protect_pins, Capture, Direction, PinPolicy, Record};

/// Errors of a packet capture that cannot be read at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    /// The file starts with neither a pcap nor a pcapng magic number.
    #[error("not a pcap or pcapng file (magic {0:08X})")]
    Magic(u32),
    /// The file ends inside a header or block; `offset` is where that header or block starts.
    #[error("truncated {what} at byte offset {offset}")]
    Truncated { what: &'static str, offset: usize },
    /// A pcapng block with an impossible length.
    #[error("pcapng block at byte offset {offset} has length {length}")]
    BlockLength { offset: usize, length: u32 },
}

/// What an import found besides the frames.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub packets: usize,
    /// TCP segments to or from the port (with or without payload).
    pub segments: usize,
    pub connections: usize,
    pub frames_from_terminals: usize,
    pub frames_from_host: usize,
    /// Packets skipped: other protocols, other ports, IP fragments, link types not read.
    pub skipped: usize,
    /// Problems a person should know: gaps in a stream, framing errors, answers left out.
    pub warnings: Vec<String>,
}

struct Packet<'a> {
    at: Duration,
    linktype: u16,
    data: &'a [u8],
}

fn u16e(b: &[u8], le: bool) -> u16 {
    let a = [b[0], b[1]];
    if le {
        u16::from_le_bytes(a)
    } else {
        u16::from_be_bytes(a)
    }
}

fn u32e(b: &[u8], le: bool) -> u32 {
    let a = [b[0], b[1], b[2], b[3]];
    if le {
        u32::from_le_bytes(a)
    } else {
        u32::from_be_bytes(a)
    }
}

fn packets(file: &[u8]) -> Result<Vec<Packet<'_>>, PcapError> {
    if file.len() < 4 {
        return Err(PcapError::Truncated {
            what: "file header",
            offset: 0,
        });
    }
    let magic = u32::from_le_bytes([file[0], file[1], file[2], file[3]]);
    match magic {
        0xa1b2c3d4 | 0xa1b23c4d | 0xd4c3b2a1 | 0x4d3cb2a1 => pcap(file),
        0x0a0d0d0a => pcapng(file),
        m => Err(PcapError::Magic(m)),
    }
}

fn pcap(file: &[u8]) -> Result<Vec<Packet<'_>>, PcapError> {
    if file.len() < 24 {
        return Err(PcapError::Truncated {
            what: "pcap header",
            offset: 0,
        });
    }
    let raw = u32::from_le_bytes([file[0], file[1], file[2], file[3]]);
    let le = matches!(raw, 0xa1b2c3d4 | 0xa1b23c4d);
    let nanos = matches!(raw, 0xa1b23c4d | 0x4d3cb2a1);
    let linktype = (u32e(&file[20..], le) & 0xFFFF) as u16;
    let mut out = Vec::new();
    let mut off = 24;
    while off < file.len() {
        if file.len() - off < 16 {
            return Err(PcapError::Truncated {
                what: "packet header",
                offset: off,
            });
        }
        let secs = u32e(&file[off..], le);
        let frac = u32e(&file[off + 4..], le);
        let len = u32e(&file[off + 8..], le) as usize;
        let start = off + 16;
        if file.len() - start < len {
            return Err(PcapError::Truncated {
                what: "packet",
                offset: off,
            });
        }
        let at = Duration::from_secs(u64::from(secs))
            + if nanos {
                Duration::from_nanos(u64::from(frac))
            } else {
                Duration::from_micros(u64::from(frac))
            };
        out.push(Packet {
            at,
            linktype,
            data: &file[start..start + len],
        });
        off = start + len;
    }
    Ok(out)
}

fn pcapng(file: &[u8]) -> Result<Vec<Packet<'_>>, PcapError> {
    let mut out = Vec::new();
    let mut le = true;
    // Per interface of the current section: link type and time resolution (units per second).
    let mut ifaces: Vec<(u16, u64)> = Vec::new();
    let mut off = 0;
    while off < file.len() {
        if file.len() - off < 12 {
            return Err(PcapError::Truncated {
                what: "pcapng block",
                offset: off,
            });
        }
        let btype_raw = &file[off..off + 4];
        if btype_raw == [0x0a, 0x0d, 0x0d, 0x0a] {
            // Section header: its byte-order magic decides how the rest of the section is read.
            let bom = &file[off + 8..off + 12];
            le = bom == [0x4d, 0x3c, 0x2b, 0x1a];
            ifaces.clear();
        }
        let btype = u32e(btype_raw, le);
        let blen = u32e(&file[off + 4..], le);
        if blen < 12 || blen % 4 != 0 || blen as usize > file.len() - off {
            return Err(PcapError::BlockLength {
                offset: off,
                length: blen,
            });
        }
        let body = &file[off + 8..off + blen as usize - 4];
        match btype {
            1 if body.len() >= 8 => {
                let linktype = u16e(body, le);
                // Options: if_tsresol (code 9) changes the time unit from microseconds.
                let mut res = 1_000_000u64;
                let mut o = 8;
                while body.len() >= o + 4 {
                    let code = u16e(&body[o..], le);
                    let olen = u16e(&body[o + 2..], le) as usize;
                    if code == 0 || body.len() < o + 4 + olen {
                        break;
                    }
                    if code == 9 && olen >= 1 {
                        let v = body[o + 4];
                        res = if v & 0x80 == 0 {
                            10u64.saturating_pow(u32::from(v))
                        } else {
                            1u64 << (v & 0x7F).min(63)
                        };
                    }
                    o += 4 + olen.div_ceil(4) * 4;
                }
                ifaces.push((linktype, res.max(1)));
            }
            6 if body.len() >= 20 => {
                let iface = u32e(body, le) as usize;
                let ts = (u64::from(u32e(&body[4..], le)) << 32) | u64::from(u32e(&body[8..], le));
                let caplen = u32e(&body[12..], le) as usize;
                if body.len() - 20 < caplen {
                    return Err(PcapError::Truncated {
                        what: "enhanced packet",
                        offset: off,
                    });
                }
                if let Some(&(linktype, res)) = ifaces.get(iface) {
                    let nanos = (u128::from(ts % res) * 1_000_000_000 / u128::from(res)) as u64;
                    let at = Duration::from_secs(ts / res) + Duration::from_nanos(nanos);
                    out.push(Packet {
                        at,
                        linktype,
                        data: &body[20..20 + caplen],
                    });
                }
            }
            3 if body.len() >= 4 => {
                if let Some(&(linktype, _)) = ifaces.first() {
                    let len = (u32e(body, le) as usize).min(body.len() - 4);
                    out.push(Packet {
                        at: Duration::ZERO,
                        linktype,
                        data: &body[4..4 + len],
                    });
                }
            }
            _ => {}
        }
        off += blen as usize;
    }
    Ok(out)
}

/// An address and port.
type Endpoint = (IpAddr, u16);

/// A frame found in a stream: when, connection, direction, content.
type Found = (Duration, u64, Direction, Bytes);

/// A TCP segment: endpoints, sequence, flags, payload.
struct Segment<'a> {
    src: Endpoint,
    dst: Endpoint,
    seq: u32,
    syn: bool,
    fin_or_rst: bool,
    payload: &'a [u8],
}

/// The IP packet inside a link-layer frame.
fn ip_of(linktype: u16, d: &[u8]) -> Option<&[u8]> {
    match linktype {
        1 => {
            // Ethernet, with any number of VLAN tags.
            let mut o = 12;
            loop {
                let et = u16::from_be_bytes([*d.get(o)?, *d.get(o + 1)?]);
                match et {
                    0x8100 | 0x88a8 => o += 4,
                    0x0800 | 0x86dd => return d.get(o + 2..),
                    _ => return None,
                }
            }
        }
        113 => d.get(16..),    // Linux cooked
        276 => d.get(20..),    // Linux cooked v2
        0 | 108 => d.get(4..), // BSD loopback
        101 | 228 | 229 | 12 | 14 => Some(d),
        _ => None,
    }
}

fn tcp_of(ip: &[u8]) -> Option<Segment<'_>> {
    let v = ip.first()? >> 4;
    let (src, dst, tcp) = match v {
        4 => {
            let ihl = usize::from(ip[0] & 0x0F) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
            if *ip.get(9)? != 6 || frag & 0x3FFF != 0 || ihl < 20 {
                return None; // not TCP, or a fragment
            }
            let end = total.min(ip.len());
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let t: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(t), ip.get(ihl..end)?)
        }
        6 => {
            if *ip.get(6)? != 6 {
                return None; // extension headers: not read
            }
            let plen = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let t: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let end = (40 + plen).min(ip.len());
            (IpAddr::from(s), IpAddr::from(t), ip.get(40..end)?)
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    Some(Segment {
        src: (src, sport),
        dst: (dst, dport),
        seq,
        syn: flags & 0x02 != 0,
        fin_or_rst: flags & 0x05 != 0,
        payload: tcp.get(doff..)?,
    })
}

/// One direction of one connection, put back in order and cut into frames.
struct Stream {
    conn: u64,
    dir: Direction,
    /// Sequence number of the first payload byte.
    isn: Option<u32>,
    /// Payload bytes delivered so far.
    delivered: u32,
    /// Segments ahead of a gap, by relative offset.
    ahead: BTreeMap<u32, Vec<u8>>,
    codec: FrameCodec,
    buf: BytesMut,
    /// The stream broke (a framing error); nothing more is read from it.
    broken: bool,
}

impl Stream {
    fn push(&mut self, seq: u32, payload: &[u8], at: Duration, out: &mut Vec<Found>, report: &mut ImportReport) {
        let isn = *self.isn.get_or_insert(seq);
        let rel = seq.wrapping_sub(isn);
        let end = rel.wrapping_add(payload.len() as u32);
        if end <= self.delivered {
            return; // a retransmission
        }
        if rel > self.delivered {
            self.ahead.insert(rel, payload.to_vec());
            return;
        }
        let skip = (self.delivered - rel) as usize;
        self.deliver(&payload[skip..], at, out, report);
        while let Some((&r, _)) = self.ahead.first_key_value() {
            if r > self.delivered {
                break;
            }
            let (r, p) = self.ahead.pop_first().expect("present");
            let end = r.wrapping_add(p.len() as u32);
            if end > self.delivered {
                let skip = (self.delivered - r) as usize;
                self.deliver(&p[skip..], at, out, report);
            }
        }
    }

    fn deliver(&mut self, bytes: &[u8], at: Duration, out: &mut Vec<Found>, report: &mut ImportReport) {
        self.delivered = self.delivered.wrapping_add(bytes.len() as u32);
        if self.broken {
            return;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => {
                    let mut data = Vec::new();
                    if let Some(t) = f.tpdu {
                        data.extend_from_slice(&t.bytes());
                    }
                    data.extend_from_slice(&f.message);
                    out.push((at, self.conn, self.dir, Bytes::from(data)));
                }
                Ok(None) => break,
                Err(e) => {
                    report.warnings.push(format!(
                        "connection {} ({}): framing error, the rest of this direction is skipped: {e}",
                        self.conn,
                        if self.dir == Direction::Terminal {
                            "terminal"
                        } else {
                            "host"
                        }
                    ));
                    self.broken = true;
                    break;
                }
            }
        }
    }
}

/// Options of an import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The gateway's (host's) port: segments to it are the terminals', from it the host's.
    pub port: u16,
    pub framing: Framing,
    pub tpdu: bool,
    pub max_frame: usize,
    /// What happens to PIN values in answers (they are real PINs in a real capture).
    pub pins: PinPolicy,
}

/// Reads a pcap or pcapng file into a capture of the frames on `opts.port`.
pub fn import(
    file: &[u8],
    dialect: &Dialect,
    dialect_name: &str,
    opts: &ImportOptions,
) -> Result<(Capture, ImportReport), PcapError> {
    let pkts = packets(file)?;
    let mut report = ImportReport {
        packets: pkts.len(),
        ..ImportReport::default()
    };
    let first = pkts.iter().map(|p| p.at).min().unwrap_or_default();
    // Connections by (terminal endpoint, host endpoint); a SYN on a finished tuple starts a new one.
    // (connection number, FIN or RST seen) by (terminal endpoint, host endpoint).
    let mut conns: HashMap<(Endpoint, Endpoint), (u64, bool)> = HashMap::new();
    let mut streams: HashMap<(u64, bool), Stream> = HashMap::new();
    let mut next_conn = 0u64;
    let mut frames = Vec::new();
    for p in &pkts {
        let Some(seg) = ip_of(p.linktype, p.data).and_then(tcp_of) else {
            report.skipped += 1;
            continue;
        };
        let to_host = seg.dst.1 == opts.port;
        if !to_host && seg.src.1 != opts.port {
            report.skipped += 1;
            continue;
        }
        report.segments += 1;
        let key = if to_host {
            (seg.src, seg.dst)
        } else {
            (seg.dst, seg.src)
        };
        let entry = conns.entry(key).or_insert_with(|| {
            next_conn += 1;
            (next_conn, false)
        });
        if seg.syn && to_host && entry.1 {
            // The tuple is used again for a new connection.
            next_conn += 1;
            *entry = (next_conn, false);
        }
        if seg.fin_or_rst {
            entry.1 = true;
        }
        let conn = entry.0;
        let stream = streams.entry((conn, to_host)).or_insert_with(|| Stream {
            conn,
            dir: if to_host { Direction::Terminal } else { Direction::Host },
            isn: None,
            delivered: 0,
            ahead: BTreeMap::new(),
            codec: FrameCodec::new(opts.framing, opts.tpdu, opts.max_frame),
            buf: BytesMut::new(),
            broken: false,
        });
        if seg.syn {
            stream.isn = Some(seg.seq.wrapping_add(1));
            continue;
        }
        if !seg.payload.is_empty() {
            stream.push(seg.seq, seg.payload, p.at - first, &mut frames, &mut report);
        }
    }
    report.connections = next_conn as usize;
    let mut keys: Vec<_> = streams.keys().copied().collect();
    keys.sort();
    for k in keys {
        let s = &streams[&k];
        if !s.ahead.is_empty() {
            report.warnings.push(format!(
                "connection {} ({}): the capture misses bytes after offset {}; {} later segment(s) left out",
                s.conn,
                if s.dir == Direction::Terminal {
                    "terminal"
                } else {
                    "host"
                },
                s.delivered,
                s.ahead.len()
            ));
        }
        if !s.buf.is_empty() && !s.broken {
            report.warnings.push(format!(
                "connection {}: {} bytes at the end do not make a whole frame",
                s.conn,
                s.buf.len()
            ));
        }
    }
    frames.sort_by_key(|f| f.0);
    let mut capture = Capture::new(opts.framing, opts.tpdu, dialect_name, opts.pins);
    capture.other.insert("source".into(), "pcap".into());
    for (at, conn, dir, data) in frames {
        let data = if dir == Direction::Host {
            match protect_pins(dialect, &data, opts.tpdu, opts.pins) {
                Some(d) => d,
                None => {
                    report.warnings.push(format!(
                        "connection {conn}: an answer at {:.6} s does not decode in {dialect_name}; left out (it could hold a PIN)",
                        at.as_secs_f64()
                    ));
                    continue;
                }
            }
        } else {
            data
        };
        match dir {
            Direction::Terminal => report.frames_from_terminals += 1,
            Direction::Host => report.frames_from_host += 1,
        }
        capture.records.push(Record {
            at,
            conn,
            dir,
            data,
            line: 0,
        });
    }
    Ok((capture, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet/IPv4/TCP packet.
    fn packet(src_port: u16, dst_port: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 12];
        p.extend_from_slice(&[0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        p.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 6, 0, 0]);
        p.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
        p.extend_from_slice(&src_port.to_be_bytes());
        p.extend_from_slice(&dst_port.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    fn pcap_file(pkts: &[Vec<u8>]) -> Vec<u8> {
        let mut f = vec![];
        f.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        f.extend_from_slice(&[2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 1, 0, 0, 0]);
        for (i, p) in pkts.iter().enumerate() {
            f.extend_from_slice(&(i as u32).to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(&(p.len() as u32).to_le_bytes());
            f.extend_from_slice(&(p.len() as u32).to_le_bytes());
            f.extend_from_slice(p);
        }
        f
    }

    fn opts() -> ImportOptions {
        ImportOptions {
            port: 9000,
            framing: Framing::Binary2,
            tpdu: false,
            max_frame: 4096,
            pins: PinPolicy::Clear,
        }
    }

    #[test]
    fn out_of_order_retransmitted_and_split_segments_are_reassembled() {
        let d = crate::iso8583::Dialects::builtin();
        let dialect = d.get("iso87-ascii").unwrap();
        // Two frames "AB" and "CDE" with a 2-byte length, sent as: [0 2 A] [B 0 3 C] retransmitted, then the
        // last piece before the middle one.
        let isn = 1000u32;
        let pkts = vec![
            packet(40000, 9000, isn - 1, 0x02, b""),
            packet(40000, 9000, isn, 0x18, &[0, 2, b'A']),
            packet(40000, 9000, isn + 7, 0x18, b"DE"),
            packet(40000, 9000, isn + 3, 0x18, &[b'B', 0, 3, b'C']),
            packet(40000, 9000, isn + 3, 0x18, &[b'B', 0, 3, b'C']),
            packet(9000, 40000, 7, 0x18, &[0, 1, b'Z']),
            packet(5555, 6666, 1, 0x18, b"other"),
        ];
        let (c, r) = import(&pcap_file(&pkts), dialect, "iso87-ascii", &opts()).unwrap();
        let got: Vec<(Direction, &[u8])> = c.records.iter().map(|r| (r.dir, &r.data[..])).collect();
        assert_eq!(
            got,
            [
                (Direction::Terminal, &b"AB"[..]),
                (Direction::Terminal, &b"CDE"[..]),
                (Direction::Host, &b"Z"[..])
            ]
        );
        assert_eq!((r.packets, r.skipped, r.connections), (7, 1, 1));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn a_gap_is_reported_and_bad_files_are_named() {
        let d = crate::iso8583::Dialects::builtin();
        let dialect = d.get("iso87-ascii").unwrap();
        let pkts = vec![
            packet(40000, 9000, 99, 0x02, b""),
            packet(40000, 9000, 100, 0x18, &[0, 2, b'A', b'B']),
            packet(40000, 9000, 110, 0x18, &[0, 1, b'X']),
        ];
        let (c, r) = import(&pcap_file(&pkts), dialect, "iso87-ascii", &opts()).unwrap();
        assert_eq!(c.records.len(), 1);
        assert!(
            r.warnings[0].contains("misses bytes after offset 4"),
            "{:?}",
            r.warnings
        );
        assert_eq!(
            import(b"nope", dialect, "x", &opts()).unwrap_err(),
            PcapError::Magic(0x65706f6e)
        );
        let mut f = pcap_file(&pkts);
        f.truncate(f.len() - 2);
        assert!(matches!(
            import(&f, dialect, "x", &opts()).unwrap_err(),
            PcapError::Truncated { what: "packet", .. }
        ));
    }
}
