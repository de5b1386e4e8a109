//! The namenode's status page and every server's Prometheus metrics, over real HTTP.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lode_tests::{http_get, http_get_until, random_bytes, Cluster, ClusterSpec};

#[test]
fn status_page_and_metrics() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        ..Default::default()
    });
    c.put_bytes("/m", &random_bytes(3 * 65536, 5), &[]);
    let report = c.report().unwrap();
    // A namenode without a group is the one member, and its own leader.
    let namenodes = report["namenodes"]
        .as_array()
        .expect("namenodes in the report");
    assert_eq!(namenodes.len(), 1, "{report}");
    assert_eq!(namenodes[0]["name"], "namenode", "{report}");
    assert_eq!(namenodes[0]["role"], "leader", "{report}");
    assert_eq!(
        namenodes[0]["addr"],
        format!("127.0.0.1:{}", c.namenode_port),
        "{report}"
    );
    assert!(namenodes[0]["last_index"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(namenodes[0]["last_index"], namenodes[0]["applied_index"]);
    let nn = report["namenode"]["http_addr"]
        .as_str()
        .expect("the namenode reports its status page")
        .to_string();

    // The page and the cluster gauges are a snapshot refreshed every second: wait for one taken
    // after the put.
    let page = http_get_until(
        &nn,
        "/",
        "a status page listing every datanode",
        Duration::from_secs(10),
        |page| {
            (1..=3).all(|i| page.contains(&format!("<td>dn-{i}</td>")))
                && page.contains("registered")
        },
    );
    assert!(page.contains("<table id=\"datanodes\">"), "{page}");
    for i in 1..=3 {
        assert!(
            page.contains(&format!("<td>dn-{i}</td>")),
            "the datanodes table lists dn-{i}"
        );
    }
    assert!(
        page.contains("Recent events") && page.contains("registered"),
        "{page}"
    );

    let metrics = http_get_until(
        &nn,
        "/metrics",
        "the live-datanodes gauge",
        Duration::from_secs(10),
        |m| m.contains("lode_namenode_datanodes{kind=\"live\"} 3"),
    );
    assert!(
        metrics.contains("lode_namenode_requests_total{kind=\"Create\"} 1"),
        "{metrics}"
    );
    // Three 64 KiB blocks: the first came with the create, so only two AddBlocks.
    assert!(
        metrics.contains("lode_namenode_requests_total{kind=\"AddBlock\"} 2"),
        "{metrics}"
    );
    // Each block's two datanodes signed receipts, and the commits counted them.
    assert!(
        metrics.contains("lode_namenode_replica_receipts_total{kind=\"accepted\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_namenode_replica_receipts_total{kind=\"refused\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_namenode_request_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_namenode_editlog_syncs_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_namenode_datanode_heartbeat_age_seconds{kind=\"dn-1\"}"),
        "{metrics}"
    );

    // Every datanode serves its own metrics; together they wrote every replica.
    lode_tests::wait_until(
        "datanodes report their metrics address",
        std::time::Duration::from_secs(10),
        || {
            c.report().unwrap()["datanodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["http_addr"].is_string())
        },
    );
    let mut written = 0u64;
    for d in c.report().unwrap()["datanodes"].as_array().unwrap() {
        let (code, m) = http_get(d["http_addr"].as_str().unwrap(), "/metrics").unwrap();
        assert_eq!(code, 200);
        let line = m
            .lines()
            .find(|l| l.starts_with("lode_datanode_written_bytes_total"))
            .unwrap();
        written += line
            .split_whitespace()
            .last()
            .unwrap()
            .parse::<u64>()
            .unwrap();
        assert!(m.contains("lode_datanode_blocks"), "{m}");
    }
    assert_eq!(written, 2 * 3 * 65536);
}

/// The status page in a real browser (headless Chromium from Debian's packages; `.ci/run` installs
/// it). The screenshot is kept at `target/lode-status-page.png`.
#[test]
fn status_page_in_headless_chromium() {
    let browser = ["chromium", "chromium-browser"].iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(browser) = browser else {
        if std::env::var_os("LODE_SKIP_BROWSER").is_some() {
            eprintln!("LODE_SKIP_BROWSER set and no chromium: not testing in a browser");
            return;
        }
        panic!("chromium is not installed (apt-get install chromium), or set LODE_SKIP_BROWSER=1");
    };
    let c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        ..Default::default()
    });
    let url = format!(
        "http://{}/",
        c.report().unwrap()["namenode"]["http_addr"]
            .as_str()
            .unwrap()
    );
    // The page is a snapshot refreshed every second: wait for one with every datanode live.
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    http_get_until(
        &addr,
        "/",
        "a status page with three live datanodes",
        Duration::from_secs(10),
        |p| p.matches("class=\"live\"").count() == 3,
    );
    let profile = c.dir().join("chromium-profile");
    let run = |extra: &[&str]| {
        std::process::Command::new(browser)
            .args([
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    let dom = run(&["--dump-dom"]);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    let table = dom
        .split("<table id=\"datanodes\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_default();
    for i in 1..=3 {
        assert!(
            table.contains(&format!("<td>dn-{i}</td>")),
            "the rendered datanodes table lists dn-{i}: {table}"
        );
    }
    assert_eq!(table.matches("class=\"live\"").count(), 3, "{table}");
    let shot = c.dir().join("status.png");
    let out = run(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1280,900",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    let keep =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lode-status-page.png");
    std::fs::write(&keep, &png).unwrap();
}
