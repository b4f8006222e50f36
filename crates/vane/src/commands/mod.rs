//! The client commands: each builds a request, sends it, and prints the answer. One file
//! per kind of object:
//! - `nets`: nets and the policies between them;
//! - `gateways`: WireGuard gateways;
//! - `instances`: run, list, watch, inspect, stop, remove and read instances;
//! - `exec`: commands inside instances, with input and terminals;
//! - `moves`: migration, snapshots and restores of instances;
//! - `templates`: resource templates;
//! - `hosts`: hosts, their join tokens, and tenant credentials;
//! - `output`: tables, JSON and human units;
//! - `progress`: the progress of long work, on a terminal.
//!
//! This file keeps what they share: names as URL path segments.

use anyhow::{bail, Result};

mod exec;
mod gateways;
mod hosts;
mod instances;
mod moves;
mod nets;
mod output;
mod progress;
mod templates;

pub use exec::{exec, ExecArgs};
pub use gateways::gateway;
pub use hosts::{credential, host};
pub use instances::{inspect, logs, ps, rm, run, stats, stop, top};
pub use moves::{migrate, restore, snapshot};
pub use nets::{net, policy, service};
pub use templates::template;

fn path_segment(name: &str) -> Result<&str> {
    // Names travel in URL paths; anything outside the name rules is refused here already.
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("invalid name {name:?}: use lowercase letters, digits and '-'");
    }
    Ok(name)
}
