//! The same checks on both backends: the embedded database, and a real etcd.

use super::*;
use test_etcd::TestEtcd;

fn net(id: u32, name: &str) -> Net {
    Net {
        id,
        name: name.into(),
        tenant: "a".into(),
        subnet: "10.10.2.0/24".parse().unwrap(),
        egress: false,
        created: 1,
    }
}

/// Records survive a reopen, deletions too, and counters with them.
fn survives_reopen(location: &StoreLocation, dir: &std::path::Path) {
    let red = net(1, "red");
    {
        let store = Store::open(location, dir).unwrap();
        let mut b = Batch::default();
        b.put(&red).counters(&Counters {
            net: 1,
            host: 0,
            policy: 0,
            term: 3,
        });
        store.commit(&b).unwrap();
    }
    let store = Store::open(location, dir).unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.nets, vec![red.clone()]);
    assert_eq!((snap.counters.net, snap.counters.term), (1, 3));
    let mut b = Batch::default();
    b.delete(&red);
    store.commit(&b).unwrap();
    drop(store);
    assert!(Store::open(location, dir)
        .unwrap()
        .load()
        .unwrap()
        .nets
        .is_empty());
}

#[test]
fn the_embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    survives_reopen(&StoreLocation::Embedded, dir.path());
}

#[test]
fn the_etcd_store_survives_reopen() {
    let etcd = TestEtcd::start();
    let dir = tempfile::tempdir().unwrap();
    survives_reopen(&etcd.url("t1").parse().unwrap(), dir.path());
}

#[test]
fn the_etcd_store_loads_more_than_a_page_and_batches_over_a_transaction() {
    let etcd = TestEtcd::start();
    let location: StoreLocation = etcd.url("many").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&location, dir.path()).unwrap();
    // 1200 nets: three pages to load, ten transactions to write.
    let nets: Vec<Net> = (1..=1200).map(|i| net(i, &format!("n{i:04}"))).collect();
    let mut b = Batch::default();
    for n in &nets {
        b.put(n);
    }
    store.commit(&b).unwrap();
    let mut loaded = Store::open(&location, dir.path())
        .unwrap()
        .load()
        .unwrap()
        .nets;
    loaded.sort_by_key(|n| n.id);
    assert_eq!(loaded, nets);
}

/// A batch that changes one record twice (planned, then given its request key) keeps the
/// last change, in both backends (etcd refuses a transaction naming a key twice).
fn the_last_change_of_a_record_counts(location: &StoreLocation, dir: &std::path::Path) {
    let store = Store::open(location, dir).unwrap();
    let (first, mut last) = (net(1, "red"), net(1, "red"));
    last.egress = true;
    let mut b = Batch::default();
    b.put(&first).put(&net(2, "blue")).put(&last);
    store.commit(&b).unwrap();
    let mut nets = store.load().unwrap().nets;
    nets.sort_by_key(|n| n.id);
    assert_eq!(nets, vec![last, net(2, "blue")]);
}

#[test]
fn the_last_change_of_a_record_counts_in_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    the_last_change_of_a_record_counts(&StoreLocation::Embedded, dir.path());
    let etcd = TestEtcd::start();
    the_last_change_of_a_record_counts(&etcd.url("twice").parse().unwrap(), dir.path());
}

/// Replicas on one etcd: one leads; a standby leads once the leader's lease is gone; the
/// deposed leader's commits are refused, the new one's are not.
#[test]
fn a_deposed_leader_commits_nothing() {
    let etcd = TestEtcd::start();
    let location: StoreLocation = etcd.url("ha").parse().unwrap();
    let StoreLocation::Etcd { endpoints, prefix } = &location else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut first = crate::leader::Elector::connect(endpoints, prefix, "https://c1")
            .await
            .unwrap();
        let mut second = crate::leader::Elector::connect(endpoints, prefix, "https://c2")
            .await
            .unwrap();
        let (fence1, _lost1) = first.lead().await.unwrap();
        assert_eq!(second.leader().await.as_deref(), Some("https://c1"));
        let campaign = tokio::spawn(async move {
            let won = second.lead().await.unwrap();
            (second, won)
        });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!campaign.is_finished(), "two leaders at once");
        let store1 = Store::open_fenced(&location, dir.path(), Some(fence1.clone())).unwrap();
        let mut b = Batch::default();
        b.put(&net(1, "red"));
        store1.commit(&b).unwrap();

        // The leader's lease goes (its process died, or etcd stopped hearing it).
        first.resign_for_tests(&fence1).await;
        let (mut second, (fence2, _lost2)) =
            tokio::time::timeout(std::time::Duration::from_secs(10), campaign)
                .await
                .expect("the standby took the lead")
                .unwrap();
        assert_eq!(second.leader().await.as_deref(), Some("https://c2"));
        assert!(fence2.rev > fence1.rev);

        let mut b = Batch::default();
        b.put(&net(2, "blue"));
        assert!(matches!(store1.commit(&b), Err(StoreError::Deposed)));
        let store2 = Store::open_fenced(&location, dir.path(), Some(fence2)).unwrap();
        store2.commit(&b).unwrap();
        let mut names: Vec<String> = store2
            .load()
            .unwrap()
            .nets
            .into_iter()
            .map(|n| n.name)
            .collect();
        names.sort();
        assert_eq!(names, ["blue", "red"]);
    });
}

#[test]
fn stores_under_other_prefixes_do_not_see_each_other() {
    let etcd = TestEtcd::start();
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&etcd.url("a").parse().unwrap(), dir.path()).unwrap();
    let mut b = Batch::default();
    b.put(&net(1, "red"));
    a.commit(&b).unwrap();
    // "a" is a prefix of "ab" as a string, not as a key path.
    let ab = Store::open(&etcd.url("ab").parse().unwrap(), dir.path()).unwrap();
    assert!(ab.load().unwrap().nets.is_empty());
    assert_eq!(a.load().unwrap().nets.len(), 1);
}

#[test]
fn a_corrupt_etcd_record_is_named() {
    let etcd = TestEtcd::start();
    let dir = tempfile::tempdir().unwrap();
    let location: StoreLocation = etcd.url("bad").parse().unwrap();
    let store = Store::open(&location, dir.path()).unwrap();
    let mut b = Batch::default();
    b.ops.push(Op {
        table: NETS,
        key: "red".into(),
        value: Some(b"{not json".to_vec()),
    });
    store.commit(&b).unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(err.contains("corrupt record \"red\" in nets"), "{err}");
}

#[test]
fn an_unreachable_etcd_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let location: StoreLocation = format!("etcd://127.0.0.1:{port}").parse().unwrap();
    let err = Store::open(&location, dir.path())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.starts_with(&format!("store at etcd http://127.0.0.1:{port}: ")),
        "{err}"
    );
}

#[test]
fn store_locations_parse_or_say_what_is_wrong() {
    assert_eq!("embedded".parse(), Ok(StoreLocation::Embedded));
    assert_eq!(
        "etcd://10.0.0.1:2379,10.0.0.2:2379".parse(),
        Ok(StoreLocation::Etcd {
            endpoints: vec!["http://10.0.0.1:2379".into(), "http://10.0.0.2:2379".into()],
            prefix: "vane".into(),
        })
    );
    assert_eq!(
        "etcd://e1:2379/prod/vane"
            .parse::<StoreLocation>()
            .map(|l| match l {
                StoreLocation::Etcd { prefix, .. } => prefix,
                StoreLocation::Embedded => String::new(),
            }),
        Ok("prod/vane".to_string())
    );
    for (bad, says) in [
        ("redb", "use `embedded` or etcd://"),
        ("etcd://e1", "invalid etcd member \"e1\""),
        ("etcd://e1:2379,:2379", "invalid etcd member \":2379\""),
        ("etcd://e1:99999", "invalid etcd member"),
        ("etcd://e1:2379/a b", "invalid etcd key prefix"),
    ] {
        let err = bad.parse::<StoreLocation>().unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

/// Gateways are a table of their own: put, loaded again, deleted.
fn gateways_survive_reopen(location: &StoreLocation, dir: &std::path::Path) {
    let gateway = Gateway {
        name: "laptop".into(),
        net: "red".into(),
        host: "h1".into(),
        ip: "10.10.2.7".parse().unwrap(),
        resolver: "10.10.2.254".parse().unwrap(),
        public_key: "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=".into(),
        created: 5,
    };
    {
        let store = Store::open(location, dir).unwrap();
        let mut b = Batch::default();
        b.put(&net(1, "red")).put(&gateway);
        store.commit(&b).unwrap();
    }
    let store = Store::open(location, dir).unwrap();
    assert_eq!(store.load().unwrap().gateways, vec![gateway.clone()]);
    let mut b = Batch::default();
    b.delete(&gateway);
    store.commit(&b).unwrap();
    assert!(store.load().unwrap().gateways.is_empty());
}

#[test]
fn gateways_survive_reopen_in_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    gateways_survive_reopen(&StoreLocation::Embedded, dir.path());
    let etcd = TestEtcd::start();
    gateways_survive_reopen(&etcd.url("gw").parse().unwrap(), dir.path());
}
