//! The namenode's status page and every server's Prometheus metrics, over real HTTP.

#![allow(clippy::unwrap_used)]

use lode_tests::{http_get, random_bytes, Cluster, ClusterSpec};

#[test]
fn status_page_and_metrics() {
    let c = Cluster::start(ClusterSpec {
        datanodes: 3,
        replication: 2,
        ..Default::default()
    });
    c.put_bytes("/m", &random_bytes(3 * 65536, 5), &[]);
    let report = c.report().unwrap();
    let nn = report["namenode"]["http_addr"]
        .as_str()
        .expect("the namenode reports its status page")
        .to_string();

    let (code, page) = http_get(&nn, "/").unwrap();
    assert_eq!(code, 200);
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

    let (code, metrics) = http_get(&nn, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("lode_namenode_datanodes{kind=\"live\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_namenode_requests_total{kind=\"Create\"} 1"),
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
