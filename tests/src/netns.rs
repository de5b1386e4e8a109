//! Hosts of their own on one machine: each in a network namespace (`ip netns`, from iproute2), with
//! one address on a bridge (a switch in a namespace of its own) that the test is plugged into too,
//! so the test reaches every host and the hosts reach each other as machines on a LAN would. A partition is real: blackhole routes in the
//! hosts' namespaces drop every packet between the two sides, both ways, while the test still
//! reaches both sides.
//!
//! Needs root (CAP_NET_ADMIN) and iproute2 (deploy/scripts/install-test-deps.sh installs it). Names
//! and the subnet carry the test process's id, so tests that run at once do not meet. Everything is
//! removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;

/// `n` hosts, `1..=n`.
pub struct Hosts {
    tag: String,
    subnet: u8,
    n: usize,
}

/// Runs `ip ARGS`, panicking with its output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `ip` (iproute2; deploy/scripts/install-test-deps.sh installs it): {e}")
    });
    assert!(
        out.status.success(),
        "`ip {}` failed (the partition tests need root and iproute2): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Hosts {
    /// Creates `n` hosts on a bridge of their own.
    pub fn new(n: usize) -> Hosts {
        let pid = std::process::id();
        let hosts = Hosts {
            tag: format!("{}", pid % 100_000),
            subnet: (pid % 200) as u8 + 20,
            n,
        };
        // The bridge is in a namespace of its own: in the test's namespace, a firewall's FORWARD
        // rules (Docker's drop, say) would apply to the bridged packets between hosts.
        let switch = hosts.switch();
        // Left by an earlier process of the same id that was killed before it could clean up.
        hosts.remove();
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        // The test's port on the switch.
        let test = format!("lv{}t", hosts.tag);
        ip(&[
            "link", "add", &test, "type", "veth", "peer", "name", "tport", "netns", &switch,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", hosts.test_addr()),
            "dev",
            &test,
        ]);
        ip(&["link", "set", &test, "up"]);
        ip(&[
            "-n", &switch, "link", "set", "dev", "tport", "master", "br0", "up",
        ]);
        for i in 1..=n {
            let ns = hosts.ns(i);
            let port = format!("h{i}");
            ip(&["netns", "add", &ns]);
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&[
                "-n", &switch, "link", "set", "dev", &port, "master", "br0", "up",
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", hosts.addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// Removes the namespaces (deleting the switch takes the veth pairs, and the test's port,
    /// with it).
    fn remove(&self) {
        for ns in (1..=self.n).map(|i| self.ns(i)).chain([self.switch()]) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }

    fn switch(&self) -> String {
        format!("lode-{}-sw", self.tag)
    }

    /// The name of host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("lode-{}-{i}", self.tag)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, i as u8)
    }

    /// The test's own address on the bridge.
    pub fn test_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 254)
    }

    /// A command that runs `program` on host `i`.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    fn routes(&self, verb: &str, side: &[usize]) {
        for &a in side {
            for b in (1..=self.n).filter(|b| !side.contains(b)) {
                for (from, to) in [(a, b), (b, a)] {
                    ip(&[
                        "-n",
                        &self.ns(from),
                        "route",
                        verb,
                        "blackhole",
                        &format!("{}/32", self.addr(to)),
                    ]);
                }
            }
        }
    }

    /// Cuts the hosts in `side` off from the others, both ways (the test reaches all of them).
    pub fn partition(&self, side: &[usize]) {
        self.routes("add", side);
    }

    /// Undoes [`Hosts::partition`] of the same `side`.
    pub fn heal(&self, side: &[usize]) {
        self.routes("del", side);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.remove();
    }
}
