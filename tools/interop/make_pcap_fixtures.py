#!/usr/bin/env python3
"""Packet captures made by independent tools, for `pingate-replay import` (see fixtures/pcap/README.md).

Reads the tshark capture ``fixtures/pcap/contract.pcap`` (the contract's scenario against ``pingate demo``, one
connection on port 32785) with scapy and writes the same conversation again in other link layers and as another
host would have answered it. scapy builds and writes every packet (headers, checksums, pcap records); tshark's
``editcap`` converts to pcapng; ``tshark`` reads each file back and the script checks it sees what was written.

- ``contract-sll.pcap``, ``contract-null.pcap``, ``contract-raw.pcap``: the original IPv4 packets under Linux
  cooked capture v1 (link type 113), BSD loopback/null (0) and raw IP (101).
- ``contract-sll2.pcap``: Linux cooked capture v2 (link type 276, what ``tcpdump -i any`` writes since libpcap
  1.10), IPv4, the original packets' addresses, sequence numbers and payloads.
- ``contract-vlan-ipv6.pcapng``: Ethernet with two VLAN tags (802.1ad outer 10, 802.1Q inner 100), IPv6 with a
  hop-by-hop and a destination options extension header before TCP; converted from pcap by editcap.
- ``foreign-host.pcapng``: the same requests, answered by a host that is not pingate: each approved answer's field
  63 in that host's own layout, elements in the ASCII TLV form pingate uses (2-character tag, 3-digit length,
  value) but with other tags: ``01`` the PIN (16 digits, first element, so at offset 5 of the field), ``02`` the
  serial, ``03`` a receipt line that prints the PIN again. The PINs are made up here (``FOREIGN_PINS``) and are not
  in pingate's layout, so an import without ``--pin-at`` masks field 63 whole. TCP sequence numbers of the host's
  direction are recomputed for the new lengths.

Made with scapy 2.8.0 (``pip install scapy==2.8.0``), Python 3.11 and tshark/editcap 4.0 (Debian 12 ``tshark``),
run from the repository's root as

    python3 tools/interop/make_pcap_fixtures.py
"""

import pathlib
import subprocess
import tempfile

from scapy.all import (
    IP,
    TCP,
    CookedLinux,
    CookedLinuxV2,
    Dot1AD,
    Dot1Q,
    Ether,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    Loopback,
    Raw,
    rdpcap,
    wrpcap,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PCAP = ROOT / "fixtures" / "pcap"
PORT = 32785
# Made-up PINs of the foreign host, one per approved answer in order; the test checks none reaches an import.
FOREIGN_PINS = [b"7301846259017734", b"7301846259028845", b"7301846259039956", b"7301846259040067"]


def segments():
    """The original TCP segments: (time, from terminal?, flags, seq, ack, payload, IPv4 header fields)."""
    out = []
    for p in rdpcap(str(PCAP / "contract.pcap")):
        ip, tcp = p[IP], p[TCP]
        out.append(
            dict(
                time=p.time,
                to_host=tcp.dport == PORT,
                sport=tcp.sport,
                dport=tcp.dport,
                flags=tcp.flags,
                seq=tcp.seq,
                ack=tcp.ack,
                window=tcp.window,
                payload=bytes(tcp.payload),
                src=ip.src,
                dst=ip.dst,
                ip_id=ip.id,
            )
        )
    return out


def tcp_of(s):
    return TCP(sport=s["sport"], dport=s["dport"], seq=s["seq"], ack=s["ack"], flags=s["flags"], window=s["window"])


def write(path, packets, times, linktype=None):
    for p, t in zip(packets, times):
        p.time = t
    wrpcap(str(path), packets, linktype=linktype)


def ipv4_links(segs):
    """The original IPv4 packets under three other link layers, each written as pcap by scapy."""
    for name, linktype, link in [
        # Linux cooked v1 (113): 16 bytes, packet type 0 (to us) or 4 (outgoing), ARPHRD_LOOPBACK, protocol IPv4.
        ("contract-sll.pcap", 113,
         lambda s: CookedLinux(pkttype=0 if s["to_host"] else 4, lladdrtype=772, lladdrlen=6, src=b"\x00" * 8,
                               proto=0x0800)),
        # BSD loopback/null (0): a 4-byte address family in the writer's byte order, 2 for IPv4.
        ("contract-null.pcap", 0, lambda s: Loopback(type=2)),
        # Raw IP (101): no link header at all.
        ("contract-raw.pcap", 101, None),
    ]:
        pkts = []
        for s in segs:
            p = IP(src=s["src"], dst=s["dst"], id=s["ip_id"], ttl=64, flags="DF") / tcp_of(s)
            if s["payload"]:
                p = p / Raw(s["payload"])
            pkts.append(link(s) / p if link else p)
        write(PCAP / name, pkts, [s["time"] for s in segs], linktype=linktype)


def sll2(segs):
    pkts = []
    for s in segs:
        # Loopback device: ARPHRD_LOOPBACK (772), packet type 0 (to us) for the terminal's, 4 (outgoing) for the host's.
        link = CookedLinuxV2(proto=0x0800, ifindex=1, lladdrtype=772, pkttype=0 if s["to_host"] else 4, lladdrlen=6,
                             src=b"\x00" * 8)
        ip = IP(src=s["src"], dst=s["dst"], id=s["ip_id"], ttl=64, flags="DF")
        pkts.append(link / ip / tcp_of(s) / Raw(s["payload"]) if s["payload"] else link / ip / tcp_of(s))
    write(PCAP / "contract-sll2.pcap", pkts, [s["time"] for s in segs], linktype=276)


def vlan_ipv6(segs):
    pkts = []
    term, host = "fd00:8583::10", "fd00:8583::1"
    for s in segs:
        src, dst = (term, host) if s["to_host"] else (host, term)
        p = (
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / Dot1AD(vlan=10)
            / Dot1Q(vlan=100)
            / IPv6(src=src, dst=dst, hlim=64)
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrDestOpt()
            / tcp_of(s)
        )
        if s["payload"]:
            p = p / Raw(s["payload"])
        pkts.append(p)
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d) / "vlan-ipv6.pcap"
        write(tmp, pkts, [s["time"] for s in segs])
        subprocess.run(["editcap", "-F", "pcapng", str(tmp), str(PCAP / "contract-vlan-ipv6.pcapng")], check=True)


def foreign_field63(pin, serial):
    """Field 63 as the foreign host writes it: tags 01 (PIN), 02 (serial), 03 (a receipt line)."""
    def el(tag, value):
        return tag + b"%03d" % len(value) + value

    return el(b"01", pin) + el(b"02", serial) + el(b"03", b"Dial *100*" + pin + b"# to top up")


def rewrite_answer(msg, pins):
    """An answer (iso87-ascii-binbitmap) with its field 63 in the foreign layout, if it has one.

    MTI (4 ASCII), bitmap (8 binary bytes, 16 when bit 1 says a secondary bitmap follows). In every answer of the
    contract that has field 63 it is the last field present (LLL, ASCII length), which the asserts check, so field
    63 is the message's tail."""
    size = 16 if msg[4] & 0x80 else 8
    bits = int.from_bytes(msg[4 : 4 + size], "big")
    has = lambda n: bits >> (size * 8 - n) & 1
    if not has(63):
        return msg
    assert not any(has(n) for n in range(64, size * 8 + 1)), "field 63 is the last field"
    # Find field 63's start: its length prefix is 3 ASCII digits and its value runs to the end of the message.
    for start in range(len(msg) - 5, 11, -1):
        prefix = msg[start : start + 3]
        if prefix.isdigit() and int(prefix) == len(msg) - start - 3 and msg[start + 3 : start + 5] == b"PN":
            break
    else:
        raise AssertionError("field 63 not found")
    old = msg[start + 3 :]
    serial = old[old.index(b"SN") + 5 : old.index(b"SN") + 5 + int(old[old.index(b"SN") + 2 : old.index(b"SN") + 5])]
    value = foreign_field63(pins.pop(0), serial)
    return msg[:start] + b"%03d" % len(value) + value


def foreign(segs):
    pins = list(FOREIGN_PINS)
    pkts, shift = [], 0
    for s in segs:
        payload = s["payload"]
        s = dict(s)
        if not s["to_host"]:
            s["seq"] = (s["seq"] + shift) % 2**32
            if payload:
                # binary2 framing: a 2-byte length, then the message; one frame per segment in this capture.
                assert int.from_bytes(payload[:2], "big") == len(payload) - 2, "one whole frame per segment"
                msg = rewrite_answer(payload[2:], pins)
                new = len(msg).to_bytes(2, "big") + msg
                shift += len(new) - len(payload)
                payload = new
        elif s["flags"] & 0x10:
            s["ack"] = (s["ack"] + shift) % 2**32
        p = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=s["src"], dst=s["dst"], id=s["ip_id"],
                                                                          ttl=64, flags="DF") / tcp_of(s)
        if payload:
            p = p / Raw(payload)
        pkts.append(p)
    assert not pins, "every foreign PIN placed"
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d) / "foreign.pcap"
        write(tmp, pkts, [s["time"] for s in segs])
        subprocess.run(["editcap", "-F", "pcapng", str(tmp), str(PCAP / "foreign-host.pcapng")], check=True)


def check(name, expect_payload_segments):
    """tshark reads the file back: every segment is TCP on the port, none malformed."""
    out = subprocess.run(
        ["tshark", "-r", str(PCAP / name), "-Y", f"tcp.port == {PORT} && tcp.len > 0 && !_ws.malformed",
         "-T", "fields", "-e", "tcp.len"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    assert len(out) == expect_payload_segments, (name, out)
    print(f"{name}: tshark reads {len(out)} TCP segments with payload on port {PORT}")


def main():
    segs = segments()
    n = sum(1 for s in segs if s["payload"])
    ipv4_links(segs)
    sll2(segs)
    vlan_ipv6(segs)
    foreign(segs)
    for name in ("contract-sll.pcap", "contract-null.pcap", "contract-raw.pcap", "contract-sll2.pcap",
                 "contract-vlan-ipv6.pcapng", "foreign-host.pcapng"):
        check(name, n)


if __name__ == "__main__":
    main()
