//! Decode + re-encode of the reference PIN-purchase 0200 in each shipped dialect (the message `peers.md` measures
//! other libraries with: fields 2, 3, 4, 7, 11, 12, 13, 22, 25, 37, 41, 42, 49 and a 39-byte LLLVAR field 63).

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pingate::iso8583::{Dialects, Message, Mti};

fn reference() -> Message {
    let mut m = Message::new(Mti::SALE);
    m.set(2, "4111111111111111")
        .set(3, "000000")
        .set(4, "000000002000")
        .set(7, "1128173500")
        .set(11, "000123")
        .set(12, "173500")
        .set(13, "1128")
        .set(22, "021")
        .set(25, "00")
        .set(37, "332817000001")
        .set(41, "TERM0001")
        .set(42, "MERCHANT0000001")
        .set(49, "978")
        .set(63, "PN0161234567890123456SN010SER000000");
    m
}

fn codec(c: &mut Criterion) {
    let dialects = Dialects::builtin();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    for name in ["iso87-ascii", "iso87-ascii-binbitmap", "iso87-bcd", "iso87-ebcdic"] {
        let d = dialects.get(name).unwrap();
        let wire: Bytes = d.encode(&reference()).unwrap().freeze();
        let mut out = BytesMut::with_capacity(512);
        group.bench_function(format!("{name}/decode+encode ({} bytes)", wire.len()), |b| {
            b.iter(|| {
                let m = d.decode(black_box(&wire)).unwrap();
                out.clear();
                d.encode_into(&m, &mut out).unwrap();
                black_box(out.len())
            })
        });
        group.bench_function(format!("{name}/decode"), |b| {
            b.iter(|| black_box(d.decode(black_box(&wire)).unwrap()))
        });
        let m = d.decode(&wire).unwrap();
        group.bench_function(format!("{name}/encode"), |b| {
            b.iter(|| {
                out.clear();
                d.encode_into(black_box(&m), &mut out).unwrap();
                black_box(out.len())
            })
        });
    }
    // The floor in the same run: copying the same bytes in and out, with no parsing at all.
    let wire = dialects
        .get("iso87-ascii")
        .unwrap()
        .encode(&reference())
        .unwrap()
        .freeze();
    let mut out = BytesMut::with_capacity(512);
    group.bench_function(format!("baseline/copy in+out ({} bytes)", wire.len()), |b| {
        b.iter(|| {
            let copy = Bytes::copy_from_slice(black_box(&wire));
            out.clear();
            out.extend_from_slice(&copy);
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
