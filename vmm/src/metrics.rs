//! Process metrics for `GET /metrics` (Prometheus text format 0.0.4).
//!
//! A module registers what it counts once, by name, help text and labels, and keeps the
//! `&'static` [`Metric`] it gets back; updating one is a relaxed atomic add, cheap enough for
//! the vCPU exit path. Registering the same name and labels again returns the same metric.
//!
//! ```text
//! module ──register──▶ REGISTRY (name → family → labelled series) ◀──render── GET /metrics
//!    └──── inc()/add()/set() on its &'static Metric (atomic, lock-free)
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Whether a metric only goes up (a counter) or may go down (a gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic: totals since the process started.
    Counter,
    /// A current value.
    Gauge,
}

/// One time series: a value that modules update.
#[derive(Debug, Default)]
pub struct Metric(AtomicU64);

impl Metric {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the value (gauges).
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Family {
    help: &'static str,
    kind: MetricKind,
    /// Rendered label set (`{kind="io"}` or empty) → series.
    series: BTreeMap<String, &'static Metric>,
}

fn registry() -> &'static Mutex<BTreeMap<&'static str, Family>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<&'static str, Family>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Registers (or finds) the series `name{labels}`. `name` must be a Prometheus metric name;
/// label values are escaped.
pub fn register(
    name: &'static str,
    help: &'static str,
    kind: MetricKind,
    labels: &[(&str, &str)],
) -> &'static Metric {
    let mut key = String::new();
    if !labels.is_empty() {
        key.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(key, "{k}=\"{v}\"");
        }
        key.push('}');
    }
    // A poisoned lock only means a thread panicked while holding it; the map is still whole.
    let mut families = registry().lock().unwrap_or_else(|p| p.into_inner());
    let family = families.entry(name).or_insert_with(|| Family {
        help,
        kind,
        series: BTreeMap::new(),
    });
    family
        .series
        .entry(key)
        .or_insert_with(|| Box::leak(Box::default()))
}

/// A counter with no labels.
pub fn counter(name: &'static str, help: &'static str) -> &'static Metric {
    register(name, help, MetricKind::Counter, &[])
}

/// A gauge with no labels.
pub fn gauge(name: &'static str, help: &'static str) -> &'static Metric {
    register(name, help, MetricKind::Gauge, &[])
}

/// Every registered metric in the Prometheus text format.
pub fn render() -> String {
    let families = registry().lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for (name, family) in families.iter() {
        let kind = match family.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {}", family.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, metric) in &family.series {
            let _ = writeln!(out, "{name}{labels} {}", metric.get());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_once_and_renders_text_format() {
        let a = register(
            "arkvm_test_things_total",
            "Things.",
            MetricKind::Counter,
            &[("kind", "a\"b")],
        );
        let again = register(
            "arkvm_test_things_total",
            "Things.",
            MetricKind::Counter,
            &[("kind", "a\"b")],
        );
        assert!(std::ptr::eq(a, again));
        a.add(3);
        gauge("arkvm_test_level", "A level.").set(7);
        let text = render();
        assert!(text.contains("# TYPE arkvm_test_things_total counter\n"));
        assert!(
            text.contains("arkvm_test_things_total{kind=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE arkvm_test_level gauge\narkvm_test_level 7\n"));
    }
}
