//! Import of packet captures (`pcap` and `pcapng`, as tcpdump, tshark and Wireshark write them) into capture
//! files: the TCP streams of one port are reassembled, split into frames with the listener's framing, and written
//! as `T` (to the port) and `H` (from the port) records. No I/O here: bytes in, a [`Capture`] and a report out.
//!
//! Which library does what: the file formats are read by `pcap-parser` (the rusticata project's nom parsers: pcap in
//! microseconds or nanoseconds, either byte order, the "modified" variant; pcapng sections in either byte order,
//! interfaces with their time resolution and offset, enhanced and simple packet blocks, every other block skipped);
//! the link, IP and TCP headers by `etherparse` (Ethernet II with up to three VLAN tags, 802.1Q and 802.1ad; IPv4
//! and IPv6 with its extension headers). Linux cooked v1 and v2 and BSD loopback/null have fixed headers in front
//! of an EtherType or an address family: those few bytes are read here, the rest by `etherparse`. What stays here is product logic: which segments
//! belong to the port, connections (a SYN on a finished tuple starts a new one), TCP reassembly (segments put in
//! sequence order, retransmissions and overlaps dropped, a gap reported and that direction stopping there), framing,
//! and what happens to PINs in the answers ([`crate::traffic::capture::protect_answer`]).
//!
//! A file that cannot be read gives a [`PcapError`] naming the packet and the byte offset; a packet that is read
//! but whose headers do not parse, is cut by the snap length, is an IP fragment or has a link type not read, is
//! skipped and reported once per reason with a count.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use etherparse::{EtherType, NetSlice, SlicedPacket, TransportSlice};
use pcap_parser::{Block, PcapHeader};
use tokio_util::codec::Decoder;

use crate::iso8583::Dialect;
use crate::link::framing::{FrameCodec, Framing};
use crate::traffic::capture::{protect_answer, Capture, Direction, PinLocation, PinNote, PinPolicy, Record, Refused};

/// Errors of a packet capture that cannot be read (on). `packet` is the number of the packet being read, counted
/// from 1 as Wireshark numbers them; `offset` is the byte offset in the file of the record or block at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    /// The file starts with neither a pcap nor a pcapng magic number.
    #[error("not a pcap or pcapng file (magic {0:08X})")]
    Magic(u32),
    /// The file ends inside a header, record or block.
    #[error("truncated file at packet {packet}: {what} (byte offset {offset})")]
    Truncated { packet: usize, offset: usize, what: String },
    /// A header, record or block whose content is impossible (a length below its minimum, two lengths that
    /// disagree, a packet larger than its block, an unknown byte order, an unusable time resolution).
    #[error("corrupt file at packet {packet}: {what} (byte offset {offset})")]
    Corrupt { packet: usize, offset: usize, what: String },
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
    /// Packets skipped: other protocols, other ports, IP fragments, link types not read, headers that do not parse.
    pub skipped: usize,
    /// Problems a person should know: gaps in a stream, framing errors, packets skipped for a reason other than
    /// being other traffic, answers masked whole or left out. Each reason once, with its count.
    pub warnings: Vec<String>,
}

/// One packet as the file holds it: when, its link type, the bytes captured and its length on the wire.
struct Packet<'a> {
    number: usize,
    at: Duration,
    linktype: u32,
    data: &'a [u8],
    wire_len: u32,
}

/// Link type numbers (tcpdump.org's registry) read here.
mod linktype {
    pub const NULL: u32 = 0;
    pub const ETHERNET: u32 = 1;
    pub const RAW_BSD: u32 = 12;
    pub const RAW_OPENBSD: u32 = 14;
    pub const RAW: u32 = 101;
    pub const LOOP: u32 = 108;
    pub const LINUX_SLL: u32 = 113;
    pub const IPV4: u32 = 228;
    pub const IPV6: u32 = 229;
    pub const LINUX_SLL2: u32 = 276;
}

/// Reasons given once each with a count, so a report does not grow with the traffic.
#[derive(Default)]
struct Notes(Vec<Note>);

struct Note {
    what: String,
    unit: &'static str,
    count: usize,
    first: String,
    then: &'static str,
}

impl Notes {
    fn add(&mut self, what: String, unit: &'static str, then: &'static str, first: impl FnOnce() -> String) {
        match self.0.iter_mut().find(|n| n.what == what && n.unit == unit) {
            Some(n) => n.count += 1,
            None => self.0.push(Note {
                what,
                unit,
                count: 1,
                first: first(),
                then,
            }),
        }
    }

    fn write_into(self, warnings: &mut Vec<String>) {
        for n in self.0 {
            warnings.push(format!(
                "{}: {} {}{} (first: {}); {}",
                n.what,
                n.count,
                n.unit,
                if n.count == 1 { "" } else { "s" },
                n.first,
                n.then
            ));
        }
    }
}

fn u32_at(b: &[u8], at: usize, big: bool) -> Option<u32> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(if big {
        u32::from_be_bytes(a)
    } else {
        u32::from_le_bytes(a)
    })
}

fn packets(file: &[u8]) -> Result<Vec<Packet<'_>>, PcapError> {
    let Some(magic) = u32_at(file, 0, false) else {
        return Err(PcapError::Truncated {
            packet: 1,
            offset: 0,
            what: format!("the file header needs at least 4 bytes, the file has {}", file.len()),
        });
    };
    match magic {
        0xa1b2c3d4 | 0xa1b23c4d | 0xa1b2cd34 | 0xd4c3b2a1 | 0x4d3cb2a1 => pcap(file),
        0x0a0d0d0a => pcapng(file),
        m => Err(PcapError::Magic(m)),
    }
}

/// libpcap's largest snap length (`MAXIMUM_SNAPLEN`): no capture tool writes a bigger record.
const MAX_SNAPLEN: u32 = 262_144;

fn pcap(file: &[u8]) -> Result<Vec<Packet<'_>>, PcapError> {
    let (mut rest, header): (&[u8], PcapHeader) = match pcap_parser::parse_pcap_header(file) {
        Ok(ok) => ok,
        Err(_) => {
            return Err(PcapError::Truncated {
                packet: 1,
                offset: 0,
                what: format!("the pcap file header needs 24 bytes, the file has {}", file.len()),
            })
        }
    };
    let big = header.is_bigendian();
    let nanos = header.is_nanosecond_precision();
    // The upper 16 bits of the link type field carry the FCS length, not the link type.
    let linktype = (header.network.0 as u32) & 0xFFFF;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let offset = file.len() - rest.len();
        let number = out.len() + 1;
        let head = if header.is_modified_format() { 24 } else { 16 };
        // A record larger than any capture holds is a damaged length, not a file cut short: said so, rather than
        // "N bytes announced" with N in the billions.
        let most = header.snaplen.max(MAX_SNAPLEN);
        if let Some(caplen) = u32_at(rest, 8, big).filter(|c| rest.len() >= head && *c > most) {
            return Err(PcapError::Corrupt {
                packet: number,
                offset,
                what: format!(
                    "the packet record announces {caplen} captured bytes, more than the {most} a capture holds"
                ),
            });
        }
        let parsed = if header.is_modified_format() {
            pcap_parser::parse_pcap_frame_modified(rest)
        } else if big {
            pcap_parser::parse_pcap_frame_be(rest)
        } else {
            pcap_parser::parse_pcap_frame(rest)
        };
        let (next, record) = parsed.map_err(|_| {
            // With its length checked above, a record fails only where the file ends inside it: name what was
            // announced and what is left.
            let what = match u32_at(rest, 8, big) {
                Some(caplen) if rest.len() >= head => format!(
                    "the packet record announces {caplen} captured bytes, {} remain",
                    rest.len() - head
                ),
                _ => format!("the packet record header needs {head} bytes, {} remain", rest.len()),
            };
            PcapError::Truncated {
                packet: number,
                offset,
                what,
            }
        })?;
        let frac = if nanos {
            Duration::from_nanos(u64::from(record.ts_usec))
        } else {
            Duration::from_micros(u64::from(record.ts_usec))
        };
        out.push(Packet {
            number,
            at: Duration::from_secs(u64::from(record.ts_sec)) + frac,
            linktype,
            data: record.data,
            wire_len: record.origlen,
        });
        rest = next;
    }
    Ok(out)
}

/// What a pcapng interface says about its packets.
struct Interface {
    linktype: u32,
    /// Time units per second (`if_tsresol`).
    per_second: u64,
    /// Seconds added to every time stamp (`if_tsoffset`).
    offset: i64,
}

fn block_name(block_type: u32) -> String {
    match block_type {
        0x0a0d0d0a => "section header block".into(),
        1 => "interface description block".into(),
        3 => "simple packet block".into(),
        4 => "name resolution block".into(),
        5 => "interface statistics block".into(),
        6 => "enhanced packet block".into(),
        t => format!("block of type 0x{t:08X}"),
    }
}

fn pcapng(file: &[u8]) -> Result<Vec<Packet<'_>>, PcapError> {
    let mut out = Vec::new();
    let mut big = false;
    let mut ifaces: Vec<Interface> = Vec::new();
    let mut rest = file;
    while !rest.is_empty() {
        let offset = file.len() - rest.len();
        let number = out.len() + 1;
        let parsed = if big {
            pcap_parser::parse_block_be(rest)
        } else {
            pcap_parser::parse_block_le(rest)
        };
        let (next, block) = parsed.map_err(|_| {
            // pcap-parser says that a block failed, not why: the why is read from the block's own header. A
            // section header's type reads the same in both byte orders; other blocks are in the section's order.
            let is_shb = u32_at(rest, 0, false) == Some(0x0a0d0d0a);
            let name = block_name(if is_shb {
                0x0a0d0d0a
            } else {
                u32_at(rest, 0, big).unwrap_or(0)
            });
            let bom = rest.get(8..12);
            let order_big = if is_shb {
                bom == Some(&[0x1a, 0x2b, 0x3c, 0x4d][..])
            } else {
                big
            };
            let bom_known = matches!(bom, Some([0x1a, 0x2b, 0x3c, 0x4d]) | Some([0x4d, 0x3c, 0x2b, 0x1a]));
            match u32_at(rest, 4, order_big) {
                _ if is_shb && bom.is_some() && !bom_known => PcapError::Corrupt {
                    packet: number,
                    offset,
                    what: "the section header's byte-order magic is neither 1A2B3C4D nor 4D3C2B1A".into(),
                },
                None => PcapError::Truncated {
                    packet: number,
                    offset,
                    what: format!("a block header needs 8 bytes, {} remain", rest.len()),
                },
                Some(len) if len as usize > rest.len() => PcapError::Truncated {
                    packet: number,
                    offset,
                    what: format!("the {name} announces {len} bytes, {} remain", rest.len()),
                },
                Some(len) => PcapError::Corrupt {
                    packet: number,
                    offset,
                    what: format!(
                        "the {name} of {len} bytes does not hold together (a length below its minimum, its two \
                         lengths disagreeing, or content larger than the block)"
                    ),
                },
            }
        })?;
        match block {
            Block::SectionHeader(shb) => {
                big = shb.big_endian();
                ifaces.clear();
            }
            Block::InterfaceDescription(idb) => {
                let per_second = idb
                    .ts_resolution()
                    .filter(|r| *r > 0)
                    .ok_or_else(|| PcapError::Corrupt {
                        packet: number,
                        offset,
                        what: format!(
                            "interface {} has a time resolution (if_tsresol 0x{:02X}) finer than 2^64 per second",
                            ifaces.len(),
                            idb.if_tsresol
                        ),
                    })?;
                ifaces.push(Interface {
                    linktype: (idb.linktype.0 as u32) & 0xFFFF,
                    per_second,
                    offset: idb.if_tsoffset,
                });
            }
            Block::EnhancedPacket(epb) => {
                let iface = ifaces.get(epb.if_id as usize).ok_or_else(|| PcapError::Corrupt {
                    packet: number,
                    offset,
                    what: format!(
                        "the packet names interface {}, the section describes {}",
                        epb.if_id,
                        ifaces.len()
                    ),
                })?;
                let ts = (u64::from(epb.ts_high) << 32) | u64::from(epb.ts_low);
                let secs = i64::try_from(ts / iface.per_second)
                    .unwrap_or(i64::MAX)
                    .saturating_add(iface.offset)
                    .max(0);
                let nanos = u128::from(ts % iface.per_second) * 1_000_000_000 / u128::from(iface.per_second);
                out.push(Packet {
                    number,
                    at: Duration::from_secs(secs as u64) + Duration::from_nanos(nanos as u64),
                    linktype: iface.linktype,
                    // The block's data is padded to 4 bytes: the packet is its first caplen.
                    data: &epb.data[..(epb.caplen as usize).min(epb.data.len())],
                    wire_len: epb.origlen,
                });
            }
            Block::SimplePacket(spb) => {
                // A simple packet belongs to the first interface and has no time stamp.
                let iface = ifaces.first().ok_or_else(|| PcapError::Corrupt {
                    packet: number,
                    offset,
                    what: "a simple packet block in a section that describes no interface".into(),
                })?;
                out.push(Packet {
                    number,
                    at: Duration::ZERO,
                    linktype: iface.linktype,
                    data: &spb.data[..(spb.origlen as usize).min(spb.data.len())],
                    wire_len: spb.origlen,
                });
            }
            _ => {}
        }
        rest = next;
    }
    Ok(out)
}

/// A TCP segment: endpoints, sequence, flags, payload.
struct Segment<'a> {
    src: Endpoint,
    dst: Endpoint,
    seq: u32,
    syn: bool,
    fin_or_rst: bool,
    payload: &'a [u8],
}

/// Why a packet gives no segment. `Other` is traffic that is simply not ours (not IP, not TCP): skipped quietly.
enum Skip {
    Other,
    LinkType(u32),
    Fragment,
    Headers(String),
}

/// The headers of a packet, by its link type.
fn slice(linktype: u32, d: &[u8]) -> Result<SlicedPacket<'_>, Skip> {
    let sliced = match linktype {
        linktype::ETHERNET => SlicedPacket::from_ethernet(d),
        // Linux cooked v1 and v2: read here because etherparse's SLL refuses ARPHRD types it does not list, among
        // them the loopback device (772) that `tcpdump -i any` records local traffic on. v1: 16 bytes, the protocol
        // type (an EtherType, big-endian) last; v2: 20 bytes, the protocol type first, then reserved, interface
        // index, ARPHRD type, packet type, address length, 8 bytes of address.
        linktype::LINUX_SLL | linktype::LINUX_SLL2 => {
            let (len, at, name) = if linktype == linktype::LINUX_SLL {
                (16, 14, "Linux cooked v1")
            } else {
                (20, 0, "Linux cooked v2")
            };
            let (Some(proto), Some(rest)) = (d.get(at..at + 2), d.get(len..)) else {
                return Err(Skip::Headers(format!(
                    "{name} header needs {len} bytes, the packet has {}",
                    d.len()
                )));
            };
            SlicedPacket::from_ether_type(EtherType(u16::from_be_bytes([proto[0], proto[1]])), rest)
        }
        linktype::NULL | linktype::LOOP => {
            // 4 bytes of address family: host byte order for NULL, network order for LOOP; IPv4 is 2, IPv6 is 10
            // (Linux), 24, 28 or 30 (the BSDs, macOS).
            let Some(family) = d.get(..4) else {
                return Err(Skip::Headers(format!(
                    "loopback header needs 4 bytes, the packet has {}",
                    d.len()
                )));
            };
            let ip = |v: u32| matches!(v, 2 | 10 | 24 | 28 | 30);
            let a: [u8; 4] = [family[0], family[1], family[2], family[3]];
            if !ip(u32::from_le_bytes(a)) && !ip(u32::from_be_bytes(a)) {
                return Err(Skip::Other);
            }
            SlicedPacket::from_ip(&d[4..])
        }
        linktype::RAW | linktype::RAW_BSD | linktype::RAW_OPENBSD | linktype::IPV4 | linktype::IPV6 => {
            SlicedPacket::from_ip(d)
        }
        other => return Err(Skip::LinkType(other)),
    };
    sliced.map_err(|e| Skip::Headers(e.to_string()))
}

/// The TCP segment in a packet.
fn segment_of(linktype: u32, d: &[u8]) -> Result<Segment<'_>, Skip> {
    let p = slice(linktype, d)?;
    let (src, dst) = match &p.net {
        Some(NetSlice::Ipv4(v)) => (
            IpAddr::from(v.header().source_addr()),
            IpAddr::from(v.header().destination_addr()),
        ),
        Some(NetSlice::Ipv6(v)) => (
            IpAddr::from(v.header().source_addr()),
            IpAddr::from(v.header().destination_addr()),
        ),
        _ => return Err(Skip::Other),
    };
    if p.is_ip_payload_fragmented() {
        return Err(Skip::Fragment);
    }
    let Some(TransportSlice::Tcp(tcp)) = p.transport else {
        return Err(Skip::Other);
    };
    Ok(Segment {
        src: (src, tcp.source_port()),
        dst: (dst, tcp.destination_port()),
        seq: tcp.sequence_number(),
        syn: tcp.syn(),
        fin_or_rst: tcp.fin() || tcp.rst(),
        payload: tcp.payload(),
    })
}

/// An address and port.
type Endpoint = (IpAddr, u16);

/// A frame found in a stream: when, connection, direction, content.
type Found = (Duration, u64, Direction, Bytes);

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
    fn side(&self) -> &'static str {
        if self.dir == Direction::Terminal {
            "terminal"
        } else {
            "host"
        }
    }

    fn push(&mut self, seq: u32, payload: &[u8], at: Duration, out: &mut Vec<Found>, notes: &mut Notes) {
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
        self.deliver(&payload[skip..], at, out, notes);
        while let Some((&r, _)) = self.ahead.first_key_value() {
            if r > self.delivered {
                break;
            }
            let (r, p) = self.ahead.pop_first().expect("present");
            let end = r.wrapping_add(p.len() as u32);
            if end > self.delivered {
                let skip = (self.delivered - r) as usize;
                self.deliver(&p[skip..], at, out, notes);
            }
        }
    }

    fn deliver(&mut self, bytes: &[u8], at: Duration, out: &mut Vec<Found>, notes: &mut Notes) {
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
                    let (conn, dir) = (self.conn, self.side());
                    notes.add(
                        "framing errors".into(),
                        "stream",
                        "the rest of each such stream (one direction of a connection) skipped",
                        || format!("connection {conn} ({dir}): {e}"),
                    );
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
    /// Where the host puts PINs in its answers when it is not pingate (`--pin-at`); empty: pingate's field 63, and
    /// a field 63 of another layout masked whole.
    pub pin_at: Vec<PinLocation>,
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
    let mut notes = Notes::default();
    let first = pkts.iter().map(|p| p.at).min().unwrap_or_default();
    // (connection number, FIN or RST seen) by (terminal endpoint, host endpoint); a SYN on a finished tuple starts
    // a new connection.
    let mut conns: HashMap<(Endpoint, Endpoint), (u64, bool)> = HashMap::new();
    let mut streams: HashMap<(u64, bool), Stream> = HashMap::new();
    let mut next_conn = 0u64;
    let mut frames = Vec::new();
    for p in &pkts {
        if (p.data.len() as u64) < u64::from(p.wire_len) {
            // Cut by the snap length: its headers may be whole but its payload is not, so its stream would take
            // a piece of a segment for all of it. Left out: the stream shows a gap where it was.
            report.skipped += 1;
            notes.add(
                "packets cut short by the capture's snap length".into(),
                "packet",
                "skipped; a stream they belonged to shows a gap",
                || format!("packet {}, {} of {} bytes", p.number, p.data.len(), p.wire_len),
            );
            continue;
        }
        let seg = match segment_of(p.linktype, p.data) {
            Ok(seg) => seg,
            Err(skip) => {
                report.skipped += 1;
                match skip {
                    Skip::Other => {}
                    Skip::LinkType(t) => notes.add(
                        format!(
                            "link type {t} is not read (Ethernet 1, Linux cooked 113 and 276, raw IP 101, 228 and \
                             229, loopback 0 and 108 are)"
                        ),
                        "packet",
                        "skipped",
                        || format!("packet {}", p.number),
                    ),
                    Skip::Fragment => notes.add(
                        "IP fragments (not reassembled)".into(),
                        "packet",
                        "skipped; a stream they belonged to shows a gap",
                        || format!("packet {}", p.number),
                    ),
                    Skip::Headers(e) => notes.add("headers that do not parse".into(), "packet", "skipped", || {
                        format!("packet {}: {e}", p.number)
                    }),
                }
                continue;
            }
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
            stream.push(seg.seq, seg.payload, p.at - first, &mut frames, &mut notes);
        }
    }
    report.connections = next_conn as usize;
    let mut keys: Vec<_> = streams.keys().copied().collect();
    keys.sort();
    for k in keys {
        let s = &streams[&k];
        if !s.ahead.is_empty() {
            notes.add(
                "streams the capture misses bytes of".into(),
                "stream",
                "the segments after each gap left out",
                || {
                    format!(
                        "connection {} ({}) misses bytes after offset {}, {} later segment(s)",
                        s.conn,
                        s.side(),
                        s.delivered,
                        s.ahead.len()
                    )
                },
            );
        }
        if !s.buf.is_empty() && !s.broken {
            notes.add(
                "streams ending in bytes that do not make a whole frame".into(),
                "stream",
                "those bytes left out",
                || format!("connection {} ({}), {} bytes", s.conn, s.side(), s.buf.len()),
            );
        }
    }
    frames.sort_by_key(|f| f.0);
    let mut capture = Capture::new(opts.framing, opts.tpdu, dialect_name, opts.pins);
    capture.other.insert("source".into(), "pcap".into());
    let mut answers = 0usize;
    for (at, conn, dir, data) in frames {
        let data = if dir == Direction::Host {
            answers += 1;
            let which = || format!("answer {answers}, connection {conn} at {:.6} s", at.as_secs_f64());
            match protect_answer(dialect, &data, opts.tpdu, opts.pins, &opts.pin_at) {
                Ok(p) => {
                    for n in p.notes {
                        let (what, then) = match &n {
                            PinNote::NotReceipt { field } => (
                                format!("field {field} is not pingate's receipt layout"),
                                if opts.pins == PinPolicy::Omitted {
                                    "left out of the answer (give --pin-at to mask only the PIN)"
                                } else {
                                    "masked whole, its length kept (give --pin-at to mask only the PIN)"
                                },
                            ),
                            PinNote::PlaceMissing { place, why } => (
                                format!("--pin-at {place}: {why}"),
                                "the whole field masked, its length kept",
                            ),
                        };
                        notes.add(what, "answer", then, which);
                    }
                    p.data
                }
                Err(refused) => {
                    let (what, detail) = match refused {
                        Refused::DoesNotDecode(e) => (format!("answers that do not decode in {dialect_name}"), e),
                        Refused::DoesNotEncode(e) => ("answers that do not encode once masked".to_string(), e),
                        Refused::PinElsewhere { field } => (
                            format!("answers whose PIN (from field {field}) is also elsewhere in the message"),
                            String::new(),
                        ),
                    };
                    notes.add(what, "answer", "left out (it could hold a PIN)", || {
                        if detail.is_empty() {
                            which()
                        } else {
                            format!("{}: {detail}", which())
                        }
                    });
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
    notes.write_into(&mut report.warnings);
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
            pin_at: Vec::new(),
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
            r.warnings[0].contains("streams the capture misses bytes of: 1 stream (first: connection 1 (terminal) misses bytes after offset 4, 1 later segment(s)); the segments after each gap left out"),
            "{:?}",
            r.warnings
        );
        // Framing errors on two connections (a length above --max-frame): one warning with the count.
        let bad = vec![
            packet(40001, 9000, 100, 0x18, &[0xFF, 0xFF, b'x']),
            packet(40002, 9000, 100, 0x18, &[0xFF, 0xFF, b'y']),
            packet(40003, 9000, 100, 0x18, &[0, 1, b'Z', 0]),
        ];
        let (c, r) = import(&pcap_file(&bad), dialect, "iso87-ascii", &opts()).unwrap();
        assert_eq!(c.records.len(), 1);
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
        assert!(
            r.warnings[0].starts_with("framing errors: 2 streams (first: connection 1 (terminal): ")
                && r.warnings[0].ends_with("the rest of each such stream (one direction of a connection) skipped"),
            "{:?}",
            r.warnings
        );
        assert_eq!(
            r.warnings[1],
            "streams ending in bytes that do not make a whole frame: 1 stream (first: connection 3 (terminal), 1 \
             bytes); those bytes left out"
        );
        assert_eq!(
            import(b"nope", dialect, "x", &opts()).unwrap_err(),
            PcapError::Magic(0x65706f6e)
        );
        // Cut inside the third packet's data: the error names packet 3, where its record starts, and the numbers.
        let f = pcap_file(&pkts);
        let third = f.len() - (16 + pkts[2].len());
        let e = import(&f[..f.len() - 2], dialect, "x", &opts()).unwrap_err();
        assert_eq!(
            e,
            PcapError::Truncated {
                packet: 3,
                offset: third,
                what: format!(
                    "the packet record announces {} captured bytes, {} remain",
                    pkts[2].len(),
                    pkts[2].len() - 2
                ),
            }
        );
        assert_eq!(
            e.to_string(),
            format!("truncated file at packet 3: the packet record announces 57 captured bytes, 55 remain (byte offset {third})")
        );
        // A record length no capture can have is named as damage, not as a cut.
        let mut bad = f.clone();
        bad[third + 8..third + 12].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        let e = import(&bad, dialect, "x", &opts()).unwrap_err();
        assert!(
            matches!(e, PcapError::Corrupt { packet: 3, offset, .. } if offset == third)
                && e.to_string()
                    .contains("announces 2147418112 captured bytes, more than the 262144 a capture holds"),
            "{e}"
        );
        // Cut inside a record header; and inside the file header.
        let e = import(&f[..third + 5], dialect, "x", &opts()).unwrap_err();
        assert!(
            e.to_string()
                .contains("packet 3: the packet record header needs 16 bytes, 5 remain"),
            "{e}"
        );
        let e = import(&f[..10], dialect, "x", &opts()).unwrap_err();
        assert!(
            e.to_string()
                .contains("pcap file header needs 24 bytes, the file has 10"),
            "{e}"
        );
    }

    /// A packet whose length on the wire is more than was captured, another link type, a fragment and broken
    /// headers are each skipped and reported once with their count, never read as stream bytes.
    #[test]
    fn skipped_packets_are_reported_once_per_reason_with_a_count() {
        let d = crate::iso8583::Dialects::builtin();
        let dialect = d.get("iso87-ascii").unwrap();
        let mut fragment = packet(40000, 9000, 100, 0x18, &[0, 1, b'F']);
        fragment[14 + 6] = 0x20; // more fragments
        let mut broken = packet(40000, 9000, 100, 0x18, &[0, 1, b'B']);
        broken[14] = 0x43; // IHL 3: shorter than an IPv4 header can be
        let pkts = vec![
            packet(40000, 9000, 99, 0x02, b""),
            fragment.clone(),
            broken.clone(),
            broken,
            packet(40000, 9000, 100, 0x18, &[0, 2, b'O', b'K']),
        ];
        let mut f = pcap_file(&pkts);
        // Packet 6: captured 20 bytes of 60.
        let cut = packet(40000, 9000, 102, 0x18, &[0, 1, b'C']);
        f.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0]);
        f.extend_from_slice(&(cut.len() as u32).to_le_bytes());
        f.extend_from_slice(&cut[..20]);
        let (c, r) = import(&f, dialect, "iso87-ascii", &opts()).unwrap();
        assert_eq!(c.records.len(), 1, "only OK");
        assert_eq!(&c.records[0].data[..], b"OK");
        assert_eq!((r.packets, r.skipped), (6, 4));
        let w = r.warnings.join("\n");
        assert!(
            w.contains("IP fragments (not reassembled): 1 packet (first: packet 2)"),
            "{w}"
        );
        assert!(
            w.contains("headers that do not parse: 2 packets (first: packet 3: "),
            "{w}"
        );
        assert!(
            w.contains("cut short by the capture's snap length: 1 packet (first: packet 6, 20 of 57 bytes)"),
            "{w}"
        );
        assert_eq!(r.warnings.len(), 3, "{w}");
    }

    /// The committed fixtures: tshark's, and those of tools/interop/make_pcap_fixtures.py.
    const FIXTURES: [(&str, &[u8]); 8] = [
        ("contract.pcap", include_bytes!("../../fixtures/pcap/contract.pcap")),
        ("contract.pcapng", include_bytes!("../../fixtures/pcap/contract.pcapng")),
        (
            "contract-sll.pcap",
            include_bytes!("../../fixtures/pcap/contract-sll.pcap"),
        ),
        (
            "contract-null.pcap",
            include_bytes!("../../fixtures/pcap/contract-null.pcap"),
        ),
        (
            "contract-raw.pcap",
            include_bytes!("../../fixtures/pcap/contract-raw.pcap"),
        ),
        (
            "contract-sll2.pcap",
            include_bytes!("../../fixtures/pcap/contract-sll2.pcap"),
        ),
        (
            "contract-vlan-ipv6.pcapng",
            include_bytes!("../../fixtures/pcap/contract-vlan-ipv6.pcapng"),
        ),
        (
            "foreign-host.pcapng",
            include_bytes!("../../fixtures/pcap/foreign-host.pcapng"),
        ),
    ];

    fn fixture_opts() -> ImportOptions {
        ImportOptions {
            port: 32785,
            pins: PinPolicy::Masked,
            ..opts()
        }
    }

    /// Every cut of every fixture, at every byte: the packets before the cut, or a typed error naming the packet
    /// being read where the file ends (its number, the byte offset of its record), never a panic nor "corrupt".
    #[test]
    fn every_truncation_of_the_fixtures_is_a_typed_error_or_the_packets_before_it() {
        let d = crate::iso8583::Dialects::builtin();
        let dialect = d.get("iso87-ascii-binbitmap").unwrap();
        for (name, f) in FIXTURES {
            let full = import(f, dialect, "x", &fixture_opts()).unwrap().1.packets;
            assert_eq!(full, 34, "{name}");
            let mut errors = 0;
            for cut in 0..f.len() {
                match import(&f[..cut], dialect, "x", &fixture_opts()) {
                    Ok((_, r)) => assert!(r.packets <= full, "{name} cut at {cut}"),
                    // Packet `full + 1`: a block after the last packet (pcapng's interface statistics) is cut.
                    Err(PcapError::Truncated { packet, offset, .. }) => {
                        assert!(
                            (1..=full + 1).contains(&packet) && offset <= cut,
                            "{name} cut at {cut}: {packet}"
                        );
                        errors += 1;
                    }
                    Err(e) => panic!("{name} cut at {cut}: {e}"),
                }
            }
            assert!(errors > f.len() / 2, "{name}: most cuts are inside a record");
        }
    }

    /// tshark's pcap rewritten in the other byte order and with nanosecond time stamps (the variants other
    /// writers produce) gives the same frames at the same times.
    #[test]
    fn pcap_in_either_byte_order_and_in_nanoseconds_reads_as_the_original() {
        let d = crate::iso8583::Dialects::builtin();
        let dialect = d.get("iso87-ascii-binbitmap").unwrap();
        let f = FIXTURES[0].1;
        let le = |at: usize| u32::from_le_bytes(f[at..at + 4].try_into().unwrap());
        let (orig, _) = import(f, dialect, "x", &fixture_opts()).unwrap();
        for (big, nanos) in [(true, false), (false, true), (true, true)] {
            let mut out = Vec::new();
            let put =
                |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&if big { x.to_be_bytes() } else { x.to_le_bytes() });
            put(&mut out, if nanos { 0xa1b23c4d } else { 0xa1b2c3d4 });
            let (major, minor) = (2u16, 4u16);
            for h in [major, minor] {
                out.extend_from_slice(&if big { h.to_be_bytes() } else { h.to_le_bytes() });
            }
            for at in [8, 12, 16, 20] {
                put(&mut out, le(at));
            }
            let mut at = 24;
            while at < f.len() {
                let caplen = le(at + 8) as usize;
                put(&mut out, le(at));
                put(&mut out, if nanos { le(at + 4) * 1000 } else { le(at + 4) });
                put(&mut out, le(at + 8));
                put(&mut out, le(at + 12));
                out.extend_from_slice(&f[at + 16..at + 16 + caplen]);
                at += 16 + caplen;
            }
            let (c, r) = import(&out, dialect, "x", &fixture_opts()).unwrap();
            assert!(r.warnings.is_empty(), "{:?}", r.warnings);
            assert_eq!(c.records, orig.records, "big-endian {big}, nanoseconds {nanos}");
        }
    }

    /// A pcapng block whose length is impossible, and one that names an interface the section lacks: a typed
    /// error naming the packet and where its block starts.
    #[test]
    fn a_corrupt_pcapng_block_is_named_with_its_packet_and_offset() {
        let d = crate::iso8583::Dialects::builtin();
        let dialect = d.get("iso87-ascii-binbitmap").unwrap();
        let f = FIXTURES[1].1;
        // The offsets of the enhanced packet blocks (type 6), walking the little-endian blocks.
        let mut epbs = Vec::new();
        let mut at = 0;
        while at < f.len() {
            let word = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
            if word(at) == 6 {
                epbs.push(at);
            }
            at += word(at + 4) as usize;
        }
        assert_eq!(epbs.len(), 34);
        let third = epbs[2];
        let mut bad = f.to_vec();
        bad[third + 4..third + 8].copy_from_slice(&16u32.to_le_bytes());
        let e = import(&bad, dialect, "x", &fixture_opts()).unwrap_err();
        assert!(
            matches!(e, PcapError::Corrupt { packet: 3, offset, .. } if offset == third),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("corrupt file at packet 3: the enhanced packet block of 16 bytes"),
            "{e}"
        );
        let mut bad = f.to_vec();
        bad[third + 8..third + 12].copy_from_slice(&7u32.to_le_bytes());
        let e = import(&bad, dialect, "x", &fixture_opts()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "corrupt file at packet 3: the packet names interface 7, the section describes 1 (byte offset {third})"
            )
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(384))]
        /// Bytes of a fixture changed anywhere, or among its first 64 (file header, first blocks' lengths): the
        /// import finishes, with a capture or a typed error naming a packet; never a panic.
        #[test]
        fn mutated_fixtures_give_a_capture_or_a_typed_error(
            which in 0..FIXTURES.len(),
            flips in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>()),
                1..8,
            ),
        ) {
            let d = crate::iso8583::Dialects::builtin();
            let dialect = d.get("iso87-ascii-binbitmap").unwrap();
            let mut f = FIXTURES[which].1.to_vec();
            for (i, b, head) in flips {
                let at = i.index(if head { 64 } else { f.len() });
                f[at] = b;
            }
            if let Err(e) = import(&f, dialect, "x", &fixture_opts()) {
                let t = e.to_string();
                proptest::prop_assert!(
                    t.starts_with("truncated file at packet ")
                        || t.starts_with("corrupt file at packet ")
                        || t.starts_with("not a pcap or pcapng file"),
                    "{}", t
                );
            }
        }
    }
}
