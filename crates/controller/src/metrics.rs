//! Prometheus metrics (docs/api.md#metrics): the controller's own (`GET /metrics`) and each
//! host's (`GET /v1/hosts/{name}/metrics`). Agents serve no HTTP: a host's metrics are
//! the answers its agent already gives (`host_stats`, `stats` per instance) turned into
//! series by the controller at each scrape.
//!
//! What is counted here lives as long as the controller process (migrations, API
//! requests); the rest is read at each scrape from the state or from the agents, whose
//! counters are totals since the agent started (or, for an instance, since its switch port
//! was attached), so they are exposed as counters: Prometheus sees a restart as a reset.
//! Everything goes through one collector per scrape, which writes families and series in
//! a fixed order (sorted maps, never a `HashMap`), so two scrapes of the same state read
//! the same.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use vane_proto::api::{InstanceState, Phases};

mod host;
pub(crate) use host::{host_text, InstanceSample};

/// The `Content-Type` of both endpoints: Prometheus's text format 0.0.4.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every metric name starts with this (and `_`).
const PREFIX: &str = "vane";

/// Bounds of the migration histograms, in seconds: a small program freezes for a few
/// hundred milliseconds, a large resident one for seconds (docs/migration.md).
const FREEZE_BUCKETS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// The phases of a migration's freeze, as `Phases` names them, in their order.
const PHASES: [&str; 5] = ["hold", "dump", "transfer", "restore", "switch"];

/// What the controller counts itself, since it started.
pub(crate) struct Metrics {
    migrations: Counter,
    migrations_failed: Counter,
    freeze: Histogram,
    phases: [Histogram; 5],
    /// API requests by (route template, method, status).
    requests: Mutex<BTreeMap<(String, &'static str, u16), u64>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let hist = || Histogram::new(FREEZE_BUCKETS);
        Metrics {
            migrations: Counter::default(),
            migrations_failed: Counter::default(),
            freeze: hist(),
            phases: [hist(), hist(), hist(), hist(), hist()],
            requests: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// A migration has started (the instance marked migrating).
    pub(crate) fn migration_started(&self) {
        self.migrations.inc();
    }

    /// A started migration failed, whatever it left (running on its source, or lost).
    pub(crate) fn migration_failed(&self) {
        self.migrations_failed.inc();
    }

    /// A migration completed with this freeze.
    pub(crate) fn migration_done(&self, freeze_ms: u64, phases: &Phases) {
        let secs = |ms: u64| ms as f64 / 1000.0;
        self.freeze.observe(secs(freeze_ms));
        let parts = [
            phases.hold_ms,
            phases.dump_ms,
            phases.transfer_ms,
            phases.restore_ms,
            phases.switch_ms,
        ];
        for (h, ms) in self.phases.iter().zip(parts) {
            h.observe(secs(ms));
        }
    }

    /// Migrations started, failed, and freezes observed: what the workflows' tests check.
    #[cfg(test)]
    pub(crate) fn migrations(&self) -> (u64, u64, u64) {
        let view = ControllerView {
            hosts: BTreeMap::new(),
            instances: BTreeMap::new(),
            nets: 0,
            policies: 0,
            agents_connected: 0,
        };
        let freezes = controller_text(&view, self)
            .lines()
            .find_map(|l| l.strip_prefix("vane_migration_freeze_seconds_count "))
            .and_then(|n| n.parse().ok())
            .expect("the freeze histogram's count");
        (self.migrations.get(), self.migrations_failed.get(), freezes)
    }

    /// One API request answered. `route` is the route's template (never the path asked
    /// for, so that the number of series stays bounded); an unknown method counts as
    /// `other` for the same reason.
    pub(crate) fn request(&self, route: &str, method: &axum::http::Method, status: u16) {
        use axum::http::Method;
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            Method::PATCH => "PATCH",
            _ => "other",
        };
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route.to_string(), method, status))
            .or_default() += 1;
    }
}

/// What a controller scrape reads from the state, taken under its lock.
pub(crate) struct ControllerView {
    pub hosts: BTreeMap<&'static str, u64>,
    pub instances: BTreeMap<&'static str, u64>,
    pub nets: u64,
    pub policies: u64,
    pub agents_connected: u64,
}

impl ControllerView {
    pub(crate) fn of(state: &crate::state::State, agents_connected: usize) -> ControllerView {
        // Every state is present, at zero too: a series that vanishes reads as "no data".
        let mut hosts: BTreeMap<&'static str, u64> = [("online", 0), ("offline", 0), ("dead", 0)]
            .into_iter()
            .collect();
        for h in state.hosts.values() {
            *hosts.entry(h.state.as_str()).or_default() += 1;
        }
        let mut instances: BTreeMap<&'static str, u64> = [
            InstanceState::Creating,
            InstanceState::Running,
            InstanceState::Exited,
            InstanceState::Lost,
        ]
        .into_iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        for i in state.instances.values() {
            *instances.entry(i.state.as_str()).or_default() += 1;
        }
        ControllerView {
            hosts,
            instances,
            nets: state.nets.len() as u64,
            policies: state.policies.len() as u64,
            agents_connected: agents_connected as u64,
        }
    }
}

/// The controller's scrape: its state and what it counted.
pub(crate) fn controller_text(view: &ControllerView, m: &Metrics) -> String {
    let mut s = Scrape::default();
    s.family(
        "hosts",
        "Enrolled hosts by state (online: its agent's control stream is up)",
        Kind::Gauge,
    );
    for (state, n) in &view.hosts {
        s.sample(&[("state", state)], Value::Int(*n));
    }
    s.family("instances", "Instances by state", Kind::Gauge);
    for (state, n) in &view.instances {
        s.sample(&[("state", state)], Value::Int(*n));
    }
    s.family("nets", "Nets", Kind::Gauge);
    s.sample(&[], Value::Int(view.nets));
    s.family("policies", "Policies between nets", Kind::Gauge);
    s.sample(&[], Value::Int(view.policies));
    s.family(
        "agents_connected",
        "Agents whose control stream is connected to this controller",
        Kind::Gauge,
    );
    s.sample(&[], Value::Int(view.agents_connected));
    s.family(
        "migrations",
        "Live migrations started since the controller started",
        Kind::Counter,
    );
    s.sample(&[], Value::Int(m.migrations.get()));
    s.family(
        "migrations_failed",
        "Live migrations started since the controller started that failed (the instance runs on its source again, or was lost)",
        Kind::Counter,
    );
    s.sample(&[], Value::Int(m.migrations_failed.get()));
    s.family(
        "migration_freeze_seconds",
        "Freeze of completed live migrations: from the hold of what other hosts send to the instance until it runs on the destination and they send on",
        Kind::Histogram,
    );
    s.sample(&[], Value::Histogram(m.freeze.clone()));
    s.family(
        "migration_phase_seconds",
        "Parts of the freeze of completed live migrations, by phase (they add up to the freeze)",
        Kind::Histogram,
    );
    for (phase, h) in PHASES.iter().zip(&m.phases) {
        s.sample(&[("phase", phase)], Value::Histogram(h.clone()));
    }
    s.family(
        "api_requests",
        "API requests answered, by route template, method and status code",
        Kind::Counter,
    );
    let requests = m.requests.lock().expect("metrics lock").clone();
    for ((route, method, status), n) in &requests {
        let status = status.to_string();
        s.sample(
            &[("route", route), ("method", method), ("status", &status)],
            Value::Int(*n),
        );
    }
    s.encode()
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug)]
enum Value {
    Int(u64),
    Float(f64),
    Histogram(Histogram),
}

/// One metric family: its name without the prefix (and, for a counter, without
/// `_total`, which the encoder adds), help, type and series.
#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    series: Vec<(Vec<(String, String)>, Value)>,
}

/// The families of one scrape, in the order they are written.
#[derive(Debug, Default)]
struct Scrape(Vec<Family>);

impl Scrape {
    fn family(&mut self, name: &str, help: &str, kind: Kind) {
        self.0.push(Family {
            name: name.to_string(),
            help: help.to_string(),
            kind,
            series: Vec::new(),
        });
    }

    /// Adds a series to the last family.
    fn sample(&mut self, labels: &[(&str, &str)], v: Value) {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.push(labels, v);
    }

    fn sample_owned<const N: usize>(&mut self, labels: [(&str, String); N], v: Value) {
        let labels = labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        self.push(labels, v);
    }

    fn push(&mut self, labels: Vec<(String, String)>, v: Value) {
        if let Some(f) = self.0.last_mut() {
            f.series.push((labels, v));
        }
    }

    /// The text format, written by prometheus-client (names, escaping, histograms).
    fn encode(self) -> String {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing to a String cannot fail; the collector returns only the writer's errors.
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("metrics text written to a string");
        out
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, kind)?;
            for (labels, v) in &f.series {
                let series = metric.encode_family(labels)?;
                match (f.kind, v) {
                    (Kind::Counter, Value::Int(n)) => ConstCounter::new(*n).encode(series)?,
                    (Kind::Counter, Value::Float(x)) => ConstCounter::new(*x).encode(series)?,
                    (Kind::Gauge, Value::Int(n)) => ConstGauge::new(*n).encode(series)?,
                    (Kind::Gauge, Value::Float(x)) => ConstGauge::new(*x).encode(series)?,
                    (_, Value::Histogram(h)) => h.encode(series)?,
                    // Not made by this module's functions.
                    (Kind::Histogram, _) => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
