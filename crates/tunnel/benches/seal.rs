//! Encapsulation and encryption of one 1,400-byte packet, and the reverse, as the switch
//! does them for every packet that crosses hosts: the overlay frame header written in
//! front of the packet, the frame sealed in place into a data message; the message opened
//! in place, the frame split. For each cipher. Run: `cargo bench -p vane-tunnel`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vane_tunnel::{Cipher, Config, Keypair, Open, Seal, Tunnels, DATA_HEADER_LEN, TAG_LEN};
use vane_wire::overlay::{self, NETS_LEN};

const PACKET: usize = 1400;

/// The underlay addresses of hosts 0 and 1.
fn addr(host: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, host + 1], 7947))
}

/// Two hosts with a session from 0 to 1.
fn pair(cipher: Cipher) -> (Tunnels, Tunnels) {
    let cfg = Config {
        cipher,
        ..Config::default()
    };
    let (ka, kb) = (
        Keypair::from_private([1; 32]),
        Keypair::from_private([2; 32]),
    );
    let mut a = Tunnels::new(cfg.clone(), ka.clone());
    let mut b = Tunnels::new(cfg, kb.clone());
    a.set_peer(1, kb.public);
    b.set_peer(0, ka.public);
    let now = Instant::now();
    let (mut m1, mut m2) = (vec![0u8; 512], vec![0u8; 512]);
    let Seal::Handshake(n) = a.seal(1, b"", &mut m1, now, 1) else {
        panic!("expected a handshake")
    };
    let Open::Respond { len, .. } = b.open(&m1[..n], addr(0), &mut m2, now) else {
        panic!("expected a response")
    };
    let Open::Established { len: k, .. } = a.open(&m2[..len], addr(1), &mut m1, now) else {
        panic!("expected a session")
    };
    // The keepalive confirms the session to the responder.
    let _ = b.open(&m1[..k], addr(0), &mut m2, now);
    (a, b)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("1400-byte packet");
    g.throughput(Throughput::Bytes(PACKET as u64));
    for cipher in [Cipher::AesGcm, Cipher::ChaChaPoly] {
        let (mut a, mut b) = pair(cipher);
        let now = Instant::now();
        let inner = NETS_LEN + PACKET;
        let mut buf = vec![0x5au8; DATA_HEADER_LEN + inner + TAG_LEN];
        g.bench_function(format!("encapsulate+encrypt {}", cipher.name()), |bench| {
            bench.iter(|| {
                overlay::write_nets(&mut buf[DATA_HEADER_LEN..], 1, 2, 0);
                black_box(a.seal_in_place(1, &mut buf, inner, now))
            })
        });
        // Opening needs messages with fresh counters (the replay window refuses repeats):
        // seal a chunk, untimed, then time opening it.
        let mut chunk: Vec<Vec<u8>> = vec![vec![0u8; DATA_HEADER_LEN + inner + TAG_LEN]; 4096];
        let mut scratch = vec![0u8; 256];
        g.bench_function(format!("decrypt+decapsulate {}", cipher.name()), |bench| {
            bench.iter_custom(|iters| {
                let mut elapsed = std::time::Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    let n = left.min(chunk.len());
                    for m in &mut chunk[..n] {
                        m.resize(DATA_HEADER_LEN + inner + TAG_LEN, 0);
                        overlay::write_nets(&mut m[DATA_HEADER_LEN..], 1, 2, 0);
                        let Seal::Data(len) = a.seal_in_place(1, m, inner, now) else {
                            panic!("no session")
                        };
                        m.truncate(len);
                    }
                    let start = Instant::now();
                    for m in &mut chunk[..n] {
                        let opened = b.open_in_place(m, addr(0), &mut scratch, now);
                        let Open::Data { len, .. } = opened else {
                            panic!("not opened: {opened:?}")
                        };
                        black_box(overlay::split_frame(
                            &mut m[DATA_HEADER_LEN..DATA_HEADER_LEN + len],
                        ));
                    }
                    elapsed += start.elapsed();
                    left -= n;
                }
                elapsed
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
