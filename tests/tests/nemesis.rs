//! The fault campaign (`lode_tests::nemesis`): a short seeded slice runs with the suite; longer
//! campaigns run through `deploy/scripts/nemesis.sh --seeds N --minutes M`, which sets
//! `LODE_NEMESIS_SEEDS`, `LODE_NEMESIS_MINUTES` and runs `long_campaign`. `LODE_NEMESIS_SEED=<n>`
//! replays one seed.

use std::time::{Duration, Instant};

use lode_tests::nemesis::{self, Plan};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Seeds for the suite's slice: fixed, so CI is repeatable; a replayed seed runs alone.
#[test]
fn seeded_slice() {
    let seeds: Vec<u64> = match env_u64("LODE_NEMESIS_SEED") {
        Some(s) => vec![s],
        None => vec![1, 2],
    };
    let steps = env_u64("LODE_NEMESIS_STEPS").unwrap_or(120) as usize;
    for seed in seeds {
        let out = nemesis::run(&Plan { seed, steps });
        assert!(out.acknowledged > 0 && out.reads > 0, "{out:?}");
    }
}

/// A long campaign: random seeds (printed) until the time is up.
#[test]
#[ignore = "long; run by deploy/scripts/nemesis.sh"]
fn long_campaign() {
    let seeds = env_u64("LODE_NEMESIS_SEEDS").unwrap_or(10);
    let minutes = env_u64("LODE_NEMESIS_MINUTES").unwrap_or(30);
    let steps = env_u64("LODE_NEMESIS_STEPS").unwrap_or(400) as usize;
    let until = Instant::now() + Duration::from_secs(minutes * 60);
    let mut ran = 0;
    let mut ops = 0;
    while ran < seeds && Instant::now() < until {
        let seed = env_u64("LODE_NEMESIS_SEED").unwrap_or_else(rand::random);
        let out = nemesis::run(&Plan { seed, steps });
        ops += out.acknowledged + out.reads;
        ran += 1;
        eprintln!("nemesis: {ran} seeds clean, {ops} operations so far");
    }
    assert!(ran > 0);
}
