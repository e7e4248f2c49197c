//! `--sync-tenants N`: the size and build time of the flagd sync configuration
//! (`coresdk::openfeature::sync::document`) for N tenants, in-process: no server.
//!
//! The tenants follow the built-in rules' lifecycle table (README), in a fixed mix: free
//! tenants that never paid (no values of their own), paying tenants on a basic plan, on the
//! pro plan, enterprise tenants (pro, plus two values an operator set: a seat count and a
//! limits object), and tenants in arrears (paywall up).

use std::time::Instant;

use coresdk::flags::{FlagCache, FlagOrigin, FlagRecord, FlagValue};
use coresdk::openfeature::sync::{document, tenant_document};
use coresdk::rules::Rules;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// Builds of the document timed; the median is reported.
const BUILDS: usize = 5;

#[derive(Clone, Copy)]
enum Tenant {
    Free,
    Basic,
    Pro,
    Enterprise,
    Arrears,
}

impl Tenant {
    /// Out of 100: 30 free, 25 basic, 25 pro, 10 enterprise, 10 in arrears.
    fn pick(roll: u32) -> Self {
        match roll {
            0..30 => Self::Free,
            30..55 => Self::Basic,
            55..80 => Self::Pro,
            80..90 => Self::Enterprise,
            _ => Self::Arrears,
        }
    }

    /// Its flags as the lifecycle rules leave them (and, for enterprise, an operator).
    fn flags(self, rng: &mut StdRng) -> Vec<(&'static str, FlagValue)> {
        let on = |pro: bool, paywall: bool, analytics: bool| {
            vec![
                ("pro_features", FlagValue::Bool(pro)),
                ("paywall_active", FlagValue::Bool(paywall)),
                ("advanced_analytics", FlagValue::Bool(analytics)),
            ]
        };
        match self {
            Self::Free => Vec::new(),
            Self::Basic => on(true, false, false),
            Self::Pro => on(true, false, true),
            Self::Arrears => on(false, true, false),
            Self::Enterprise => {
                let mut flags = on(true, false, true);
                let seats = [50.0, 100.0, 250.0, 500.0][rng.gen_range(0..4)];
                let rps = [100, 500, 1000][rng.gen_range(0..3)];
                flags.push(("seats", FlagValue::Number(seats)));
                flags.push((
                    "limits",
                    FlagValue::Json(serde_json::json!({"rps": rps, "regions": ["eu", "us"]})),
                ));
                flags
            }
        }
    }
}

pub fn run(tenants: usize) -> Result<(), Box<dyn std::error::Error>> {
    let rules = Rules::built_in()?;
    let cache = FlagCache::new(rules.catalog().clone());
    let mut rng = StdRng::seed_from_u64(0x5eed_5c0d);
    let mut records = Vec::new();
    let mut with_values = 0;
    let mut id_bytes = 0;
    for n in 0..tenants {
        let tenant_id = format!("tenant-{n:06}");
        id_bytes += tenant_id.len();
        let flags = Tenant::pick(rng.gen_range(0..100)).flags(&mut rng);
        with_values += usize::from(!flags.is_empty());
        for (key, value) in flags {
            records.push(FlagRecord {
                tenant_id: tenant_id.clone(),
                key: key.to_owned(),
                value,
                version: records.len() as u64 + 1,
                order: Default::default(),
                origin: FlagOrigin::Rule,
                updated_at_ms: 0,
                updated_by: "bench".into(),
                source_event_id: String::new(),
            });
        }
    }
    let values = records.len();
    cache.load(records);

    let mut timings = Vec::with_capacity(BUILDS);
    let mut size = 0;
    for _ in 0..BUILDS {
        let started = Instant::now();
        size = document(&cache, "tenant_id").len();
        timings.push(started.elapsed());
    }
    timings.sort_unstable();
    let median = timings[BUILDS / 2];
    let one = tenant_document(&cache, "tenant-000000").len();
    println!(
        "flagd sync: {tenants} tenants ({with_values} with values of their own, {values} values; ids of {:.1} bytes on average)",
        id_bytes as f64 / tenants.max(1) as f64
    );
    println!(
        "  all-tenants document  {size} bytes ({:.1} bytes per tenant, {:.1} per tenant with values; uncompressed)",
        size as f64 / tenants.max(1) as f64,
        size as f64 / with_values.max(1) as f64,
    );
    println!(
        "  build                 {:.2} ms (median of {BUILDS}; min {:.2} ms, max {:.2} ms)",
        median.as_secs_f64() * 1e3,
        timings[0].as_secs_f64() * 1e3,
        timings[BUILDS - 1].as_secs_f64() * 1e3,
    );
    println!("  one tenant's document {one} bytes (selector tenant=<id>)");
    Ok(())
}
