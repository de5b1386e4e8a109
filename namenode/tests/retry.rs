//! A change sent with a request id is made once: a retry whose first try committed gets the
//! first answer and changes nothing, also after a restart (the answer is in the log and the
//! store, as it is in a group's replicated log); another user's request with the same id is
//! its own; answers older than the retry window are forgotten.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lode_namenode::editlog::EditLog;
use lode_namenode::http::Metrics;
use lode_namenode::namespace::{Namespace, ROOT};
use lode_namenode::perm::Caller;
use lode_namenode::state::{State, Timing};
use lode_namenode::store::{Overlay, SledStore};
use lode_namenode::writer::{Mutation, Writer};
use lode_namenode::{recover, Error};
use lode_protocol::messages::NamenodeReply;
use lode_protocol::{ErrorCode, RequestId};

const T0: u64 = 1_700_000_000_000;

fn writer(meta: &Path) -> Writer<SledStore, EditLog> {
    let (ns, log, ids, stored) = recover(meta).unwrap();
    let timing = Timing {
        stale_after: Duration::from_secs(10),
        dead_after: Duration::from_secs(30),
        lease_expiry: Duration::from_secs(60),
    };
    let mut state = State::new(timing, &stored, Instant::now());
    state.safemode_threshold = 0.0;
    Writer {
        ns: Namespace::open(Arc::new(Overlay::new(ns.store_arc()))).unwrap(),
        journal: log,
        ids,
        state: Arc::new(Mutex::new(state)),
        lease_ms: 60_000,
        metrics: Arc::new(Metrics::default()),
    }
}

fn user(name: &str) -> Caller {
    Caller {
        user: name.into(),
        groups: Default::default(),
        superuser: name == "admin",
    }
}

fn mkdir(by: &str, path: &str) -> Mutation {
    Mutation::Mkdir {
        caller: user(by),
        path: path.into(),
        parents: false,
        mode: 0o777,
    }
}

fn once(id: RequestId, by: &str, m: Mutation) -> Mutation {
    Mutation::Once {
        id,
        user: by.into(),
        mutation: Box::new(m),
    }
}

fn run(
    w: &mut Writer<SledStore, EditLog>,
    m: Mutation,
    at_ms: u64,
) -> Result<NamenodeReply, Error> {
    w.run_group(vec![m], Instant::now(), at_ms)
        .unwrap()
        .pop()
        .unwrap()
}

fn names(w: &Writer<SledStore, EditLog>) -> Vec<String> {
    w.ns.children(ROOT)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

fn code(r: Result<NamenodeReply, Error>) -> Option<ErrorCode> {
    match r {
        Err(Error::Refused { code, .. }) => Some(code),
        _ => None,
    }
}

#[test]
fn a_retried_change_is_answered_as_its_first_try_and_made_once() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = tmp.path().join("meta");
    let id = RequestId { client: 7, call: 1 };
    {
        let mut w = writer(&meta);
        run(&mut w, mkdir("admin", "/shared"), T0).unwrap();
        let first = run(&mut w, once(id, "alice", mkdir("admin", "/a")), T0).unwrap();
        assert_eq!(first, NamenodeReply::Ok);
        // Without the id, the same mkdir again is refused: it exists.
        assert_eq!(
            code(run(&mut w, mkdir("admin", "/a"), T0)),
            Some(ErrorCode::AlreadyExists)
        );
        // With it, the retry gets the first answer, and nothing changes.
        let seq = w.journal.last_seq();
        assert_eq!(
            run(&mut w, once(id, "alice", mkdir("admin", "/a")), T0 + 1).unwrap(),
            first
        );
        assert_eq!(w.journal.last_seq(), seq, "a retry logs nothing");
        // Two tries in one group: the second sees the first's answer.
        let both = w
            .run_group(
                vec![
                    once(
                        RequestId { client: 7, call: 2 },
                        "alice",
                        mkdir("admin", "/b"),
                    ),
                    once(
                        RequestId { client: 7, call: 2 },
                        "alice",
                        mkdir("admin", "/b"),
                    ),
                ],
                Instant::now(),
                T0 + 2,
            )
            .unwrap();
        assert!(
            both.iter()
                .all(|r| r.as_ref().ok() == Some(&NamenodeReply::Ok)),
            "{both:?}"
        );
        // A refused first try is not remembered: its retry is tried again.
        let refused = RequestId { client: 7, call: 3 };
        assert_eq!(
            code(run(
                &mut w,
                once(refused, "alice", mkdir("admin", "/no/such/parent")),
                T0
            )),
            Some(ErrorCode::NotFound)
        );
        run(&mut w, mkdir("admin", "/no"), T0).unwrap();
        run(&mut w, mkdir("admin", "/no/such"), T0).unwrap();
        run(
            &mut w,
            once(refused, "alice", mkdir("admin", "/no/such/parent")),
            T0,
        )
        .unwrap();
    }
    // After a restart (the answer came back from the log and the store), the retry still gets it;
    // the same id from another user is another request.
    let mut w = writer(&meta);
    assert_eq!(
        run(&mut w, once(id, "alice", mkdir("admin", "/a")), T0 + 3).unwrap(),
        NamenodeReply::Ok
    );
    assert_eq!(
        code(run(&mut w, once(id, "bob", mkdir("admin", "/a")), T0 + 3)),
        Some(ErrorCode::AlreadyExists)
    );
    assert_eq!(names(&w), ["a", "b", "no", "shared"]);
    // Past the retry window the answer is forgotten: the retry is a new mkdir, refused.
    run(
        &mut w,
        Mutation::ForgetRequests {
            before_ms: T0 + 60_000,
        },
        T0 + 60_000,
    )
    .unwrap();
    assert_eq!(
        code(run(
            &mut w,
            once(id, "alice", mkdir("admin", "/a")),
            T0 + 60_000
        )),
        Some(ErrorCode::AlreadyExists)
    );
    // A rename retried after its first try committed does not fail for a source now gone.
    let mv = RequestId { client: 8, call: 1 };
    let rename = || Mutation::Rename {
        caller: user("admin"),
        src: "/b".into(),
        dst: "/c".into(),
    };
    run(&mut w, once(mv, "admin", rename()), T0 + 60_001).unwrap();
    run(&mut w, once(mv, "admin", rename()), T0 + 60_002).unwrap();
    assert_eq!(
        code(run(&mut w, rename(), T0 + 60_003)),
        Some(ErrorCode::NotFound)
    );
}
