//! Untrusted input: the JSON body of a request to the controller's API, any bytes, from
//! any client that holds a credential: every request type the controller parses
//! (`NetSpec`, `TokenSpec`, `CredentialSpec`, `RunSpec`, `MigrateSpec`, `SnapshotSpec`,
//! `RestoreSpec`, `ExecSpec`, `PolicySpec`, `Template`), then what it computes from them
//! before any check of its own (limits and file-system settings over a template's, the
//! capability set). Asserts: no panic; a body that decodes encodes again, and that
//! encoding decodes to one that encodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use vane_proto::api::{
    CredentialSpec, ExecSpec, MigrateSpec, NetSpec, PolicySpec, RestoreSpec, RunSpec, SnapshotSpec,
    Template, TokenSpec,
};
use vane_proto::validate;

fn round_trip<T: DeserializeOwned + Serialize>(data: &[u8]) -> Option<T> {
    let spec: T = serde_json::from_slice(data).ok()?;
    let once = serde_json::to_vec(&spec).expect("a decoded body encodes");
    let again: T = serde_json::from_slice(&once).expect("an encoded body decodes");
    let twice = serde_json::to_vec(&again).expect("a decoded body encodes");
    assert_eq!(once, twice, "encoding changed across a round trip");
    Some(spec)
}

fuzz_target!(|data: &[u8]| {
    round_trip::<NetSpec>(data);
    round_trip::<TokenSpec>(data);
    round_trip::<CredentialSpec>(data);
    round_trip::<MigrateSpec>(data);
    round_trip::<SnapshotSpec>(data);
    round_trip::<RestoreSpec>(data);
    round_trip::<ExecSpec>(data);
    round_trip::<PolicySpec>(data);
    let template = round_trip::<Template>(data);
    if let Some(run) = round_trip::<RunSpec>(data) {
        let base = template.unwrap_or_default();
        let limits = base.limits.overridden_by(run.limits);
        let _ = limits.is_empty();
        let space = base.space.overridden_by(&run.space);
        let _ = validate::capability_set(&space.cap_add, &space.cap_drop);
    }
});
